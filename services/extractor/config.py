"""Settings of `mist-extractor`: the backbone it serves, dynamic batching, per-stream flow control, the feature
cache, image limits and thread counts. Every field is a flag and a MIST_* environment variable.

    mist-extractor --listen 127.0.0.1:50051 --metrics-listen 127.0.0.1:9101 --backbone vit_base_patch16_224 \\
        --weights vit_b16.safetensors --max-batch-size 32 --max-queue-delay-ms 5
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from services.common.config import ConfigError, ServerConfig, check_existing_file, setting
from services.extractor.preprocess import DEFAULT_MAX_IMAGE_PIXELS

_MiB = 1024 * 1024
# One image must fit in one request message with room for the other fields: 15 MiB under the 16 MiB default
# message limit, so an oversized image within the message limit gets a per-item error, not a failed stream.
DEFAULT_MAX_IMAGE_BYTES = 15 * _MiB
_MAX_UINT32 = 2**32 - 1  # Describe reports the image limits as uint32
_INPUT_SIZE_MULTIPLE = 32  # --input-size: whole token grids at every stage of a pvt_v2
_MAX_AUTO_DECODE_THREADS = 4  # decoding a 224 px image takes ~2 ms: four threads keep up with a GPU at batch 32


def check_json_object(text: str) -> str:
    """'' or a JSON object of keyword arguments (e.g. '{"img_size": 32, "depth": 4}'); raises ValueError."""
    if not text.strip():
        return ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object such as '{{\"depth\": 4}}', got {type(value).__name__}")
    return text


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers set), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, kw_only=True)
class ExtractorConfig(ServerConfig):
    """mist-extractor: a frozen timm ViT or pvt_v2 as a streaming gRPC service (gathered features, dynamic batching, cache)."""

    backbone: str = setting(
        "vit_base_patch16_224",
        help="timm model name (a ViT, vit_* / deit_*, or a hierarchical pvt_v2_*), optionally with a pretrained tag",
        metavar="NAME",
    )
    weights: str = setting(
        "",
        help="weights file (.safetensors or a timm checkpoint); empty: the local timm/HF "
        "cache, else a random init with a loud warning. Nothing is ever downloaded",
        parser=check_existing_file,
        metavar="PATH",
    )
    device: Literal["cpu", "cuda"] = setting("cpu", help="where the backbone runs")
    precision: Literal["fp32", "bf16", "fp16"] = setting(
        "fp32",
        help="compute precision of the forward pass (torch autocast; fp16 needs cuda); parameters and the "
        "gathered sums stay float32",
    )
    image_decode: Literal["host", "cuda"] = setting(
        "host",
        help="where JPEG images are decoded: host (Pillow, then timm's resize and crop on the CPU) or cuda "
        "(nvJPEG through torchvision, resize and crop on the GPU; needs --device cuda). PNG and WebP always "
        "decode on the host",
    )
    resize: Literal["torch", "pillow"] = setting(
        "torch",
        help="which kernels resize images on the host: torch (its antialiased uint8 kernels, about twice as fast; "
        "within 2 levels of Pillow's per value, on a few %% of the values) or pillow (timm's eval transform bit for "
        "bit). Geometries torch cannot match (squash, border crops, non-square inputs) always use Pillow",
    )
    workers: int = setting(
        1,
        help="serving processes on this node sharing --listen (SO_REUSEPORT) and the device, each with its own "
        "copy of the backbone; /metrics adds up all of them. A worker that dies is restarted",
        minimum=1,
        maximum=64,
        metavar="N",
    )
    seed: int = setting(0, help="seed of the random init used when no weights are found", minimum=0)
    model_kwargs: str = setting(
        "",
        help="JSON object of extra timm.create_model arguments, e.g. "
        '\'{"img_size":32,"patch_size":8,"embed_dim":32,"depth":4,"num_heads":2}\'',
        parser=check_json_object,
        metavar="JSON",
    )
    input_size: int = setting(
        0,
        help="side in pixels of the square a hierarchical backbone (pvt_v2_*) serves: every image is squashed to it "
        "whole, as segmentation masks are; a multiple of 32; 0 = 512. A ViT keeps the size it is built with "
        "(--model-kwargs img_size)",
        minimum=0,
        metavar="PIXELS",
    )
    max_batch_size: int = setting(
        32, help="images per forward pass, gathered across all streams", minimum=1, metavar="N"
    )
    max_queue_delay_ms: float = setting(
        5.0, help="longest an image waits for its batch to fill before it runs anyway", minimum=0.0, metavar="MS"
    )
    max_queue_items: int = setting(
        0,
        help="images waiting for a forward pass over all streams; beyond it a stream "
        "fails with RESOURCE_EXHAUSTED; 0 = --max-streams x --max-items-in-flight, "
        "which never refuses",
        minimum=0,
        metavar="N",
    )
    max_items_in_flight: int = setting(
        32,
        help="images of one stream being processed at once; when full the "
        "server stops reading that stream, so a slow reader slows its sender",
        minimum=1,
        metavar="N",
    )
    max_streams: int = setting(
        64, help="concurrent Extract streams; more fail with RESOURCE_EXHAUSTED", minimum=1, metavar="N"
    )
    stream_idle_timeout_s: float = setting(
        30.0,
        help="end an Extract stream with DEADLINE_EXCEEDED when nothing "
        "moves on it for this long: no request arrives while none is in progress, "
        "or an answer is not read; frees its --max-streams slot (the client "
        "library opens a new stream by itself). 0 = never",
        minimum=0.0,
        metavar="SECONDS",
    )
    cache_max_bytes: int = setting(
        256 * _MiB, help="LRU cache of encoded features, in bytes; 0 disables it", minimum=0, metavar="BYTES"
    )
    max_image_bytes: int = setting(
        DEFAULT_MAX_IMAGE_BYTES,
        help="largest image accepted (bytes); larger ones get "
        "a per-item RESOURCE_EXHAUSTED error. Must be below --max-message-bytes",
        minimum=1,
        maximum=_MAX_UINT32,
        metavar="BYTES",
    )
    max_image_pixels: int = setting(
        DEFAULT_MAX_IMAGE_PIXELS,
        help="largest image accepted (width x height), checked from the header before decoding",
        minimum=1,
        maximum=_MAX_UINT32,
        metavar="PIXELS",
    )
    decode_threads: int = setting(
        0,
        help="threads decoding images and encoding features (one torch thread each); "
        f"0 = min({_MAX_AUTO_DECODE_THREADS}, CPUs)",
        minimum=0,
        metavar="N",
    )
    torch_threads: int = setting(
        0, help="torch intra-op threads of the forward pass; 0 = every CPU of the process", minimum=0, metavar="N"
    )

    def check(self) -> None:
        super().check()
        if self.device == "cpu" and self.precision == "fp16":
            raise ConfigError("precision", "fp16 needs --device cuda; on CPU use bf16 or fp32")
        if self.device == "cpu" and self.image_decode == "cuda":
            raise ConfigError("image_decode", "cuda needs --device cuda; on CPU images decode on the host")
        if self.input_size and (self.input_size < _INPUT_SIZE_MULTIPLE or self.input_size % _INPUT_SIZE_MULTIPLE):
            raise ConfigError(
                "input_size",
                f"must be a multiple of {_INPUT_SIZE_MULTIPLE} (the stride of a pvt_v2's last stage), or 0 for 512; "
                f"got {self.input_size}",
            )
        if self.max_queue_items and self.max_queue_items < self.max_batch_size:
            raise ConfigError(
                "max_queue_items",
                f"must be at least --max-batch-size ({self.max_batch_size}) "
                f"or no batch could ever fill; got {self.max_queue_items}",
            )
        if self.max_image_bytes >= self.max_message_bytes:
            raise ConfigError(
                "max_image_bytes",
                f"must be below --max-message-bytes ({self.max_message_bytes}), "
                f"or an oversized image would end its stream instead of failing one item; "
                f"got {self.max_image_bytes}",
            )

    @property
    def model_kwargs_dict(self) -> dict[str, Any]:
        """--model-kwargs parsed ({} when empty)."""
        return json.loads(self.model_kwargs) if self.model_kwargs else {}

    @property
    def queue_items(self) -> int:
        """The batcher's queue bound, with 0 resolved."""
        return self.max_queue_items or max(self.max_streams * self.max_items_in_flight, self.max_batch_size)

    @property
    def worker_threads(self) -> int:
        """Decode / encode threads, with 0 resolved."""
        return self.decode_threads or min(_MAX_AUTO_DECODE_THREADS, available_cpus())

    @property
    def forward_threads(self) -> int:
        """torch intra-op threads of the forward pass, with 0 resolved."""
        return self.torch_threads or available_cpus()
