"""Test helpers for the extractor: a real server in this process on 127.0.0.1 (its own event loop on a thread, so
blocking and asyncio clients both work from a test), a `python -m services.extractor.server` subprocess for the
SIGTERM tests, test images, and the in-process reference features to compare the service with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import threading
import time
from collections.abc import Sequence

import grpc
import numpy as np
from PIL import Image

from services.common.clients.channel import create_channel
from services.common.pb import extractor_pb2, extractor_pb2_grpc
from services.common.serving.metrics import GrpcMetrics, new_metrics_registry
from services.common.serving.server import ServiceSetup, create_server
from services.common.wire.codec import CodecConfig
from services.common.wire.gather_modes import GatherModeName
from services.extractor.backbone import LoadedBackbone, load_backbone
from services.extractor.config import ExtractorConfig
from services.extractor.gather import gather
from services.extractor.preprocess import ImagePreprocessor
from services.extractor.server import build
from services.tuner.synthetic import CLASS_NAMES, render_image
from tests.conftest import TINY_VIT_KWARGS
from tests.helpers.process import ServiceProcess

TINY_BACKBONE = "vit_tiny_patch16_224"
TINY_MODEL_KWARGS_JSON = json.dumps(TINY_VIT_KWARGS)
# A tiny hierarchical backbone: pvt_v2_b0's layout with one block per stage and narrow stages. At 64 px its stage grids
# are 16x16, 8x8, 4x4 and 2x2 with 16, 24, 32 and 48 dims.
TINY_PVT_BACKBONE = "pvt_v2_b0"
TINY_PVT_KWARGS = dict(
    depths=(1, 1, 1, 1), embed_dims=(16, 24, 32, 48), num_heads=(1, 1, 1, 2), mlp_ratios=(2, 2, 2, 2)
)
TINY_PVT_INPUT_SIZE = 64


def load_tiny_backbone(seed: int = 0) -> LoadedBackbone:
    """The suite's tiny random ViT: N=4 blocks, T=17 tokens, D=32 dims, 32x32 input."""
    return load_backbone(TINY_BACKBONE, seed=seed, model_kwargs=TINY_VIT_KWARGS)


def load_tiny_pvt(seed: int = 0, input_size: int = TINY_PVT_INPUT_SIZE) -> LoadedBackbone:
    """The suite's tiny random pvt_v2 (S=4 stages), served at `input_size` pixels squared."""
    return load_backbone(TINY_PVT_BACKBONE, seed=seed, model_kwargs=TINY_PVT_KWARGS, input_size=input_size)


def tiny_pvt_config(**overrides: object) -> ExtractorConfig:
    """tiny_config for the tiny pvt_v2 (--backbone pvt_v2_b0 --model-kwargs ... --input-size 64)."""
    values: dict[str, object] = dict(
        backbone=TINY_PVT_BACKBONE, model_kwargs=json.dumps(TINY_PVT_KWARGS), input_size=TINY_PVT_INPUT_SIZE
    )
    values.update(overrides)
    return tiny_config(**values)


def tiny_config(**overrides: object) -> ExtractorConfig:
    """A config for the tiny ViT on loopback; small thread counts, since the test machine has 2 cores."""
    values: dict[str, object] = dict(
        backbone=TINY_BACKBONE,
        model_kwargs=TINY_MODEL_KWARGS_JSON,
        listen="127.0.0.1:0",
        metrics_listen="off",
        decode_threads=2,
        torch_threads=1,
        grace_s=1.0,
    )
    values.update(overrides)
    return ExtractorConfig(**values)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- images


def png_image(seed: int, size: int = 48) -> bytes:
    """A distinct synthetic picture per seed, as PNG bytes."""
    rng = np.random.default_rng(seed)
    image = render_image(CLASS_NAMES[seed % len(CLASS_NAMES)], rng, size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def huge_blank_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A 1-bit PNG of a few KB that would decode to width x height pixels."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def reference_features(
    backbone: LoadedBackbone, image: bytes, mode: GatherModeName, ks: Sequence[int] = ()
) -> dict[int, np.ndarray]:
    """What the service must send for one image, computed here with the same preprocessing and gather (ViT or
    hierarchical: `ks` is used by mist only)."""
    tensor = ImagePreprocessor(backbone.data_config, resize=ExtractorConfig.resize).decode(image)  # the server's
    with backbone.autocast():
        out = gather(backbone.model, tensor[None], mode, ks if mode == "mist" else ())
    return {k: value[0].numpy() for k, value in out.items()}


# ---------------------------------------------------------------------------------------------- in-process server


class ExtractorServer:
    """A started extractor (via server.build, like `mist-extractor`) in this process, stopped by `stop()`."""

    def __init__(self, config: ExtractorConfig, *, backbone: LoadedBackbone | None = None, port: int = 0) -> None:
        host = config.listen.rpartition(":")[0]
        self.config = dataclasses.replace(config, listen=f"{host}:{port}")
        self.backbone = backbone
        self.registry = new_metrics_registry()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="extractor-test-server", daemon=True)
        self._server = None
        self._setup: ServiceSetup | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> ExtractorServer:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout_s)
        return self

    async def _start(self) -> int:
        self._setup = await build(self.config, self.registry, backbone=self.backbone)
        self._server, port, _ = await create_server(
            self.config, self._setup.add_services, metrics=GrpcMetrics(self.registry, "mist_extractor")
        )
        return port

    def stop(self, grace_s: float = 0.0, timeout_s: float = 30.0) -> None:
        """Stop the gRPC server (cancelling calls after `grace_s`), drain the engine, end the loop thread."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._stop(grace_s), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        self._loop.close()

    async def _stop(self, grace_s: float) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._setup is not None and self._setup.on_shutdown is not None:
            await self._setup.on_shutdown()

    def metric(self, name: str, **labels: str) -> float:
        """A sample of this server's registry; 0.0 when it does not exist (yet)."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def __enter__(self) -> ExtractorServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def extract_request(
    item_id: str, image: bytes, *, ks: Sequence[int] = (4,), mode: int = 1, codec: str = "f32-none", **fields: object
) -> extractor_pb2.ExtractRequest:
    """An ExtractRequest with the codec given by name (mode 1 = GATHER_MODE_MIST)."""
    return extractor_pb2.ExtractRequest(
        item_id=item_id, image=image, mode=mode, ks=list(ks), codec=CodecConfig.parse(codec).to_proto(), **fields
    )


# ---------------------------------------------------------------------------------------------- subprocess


class ExtractorProcess(ServiceProcess):
    """`python -m services.extractor.server` with the tiny ViT (helpers.process.ServiceProcess)."""

    def __init__(self, *flags: str) -> None:
        super().__init__(
            "services.extractor.server",
            "--backbone",
            TINY_BACKBONE,
            "--model-kwargs",
            TINY_MODEL_KWARGS_JSON,
            "--decode-threads",
            "1",
            "--torch-threads",
            "1",
            *flags,
        )


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.01) -> None:
    """Poll a blocking predicate until it holds; AssertionError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval_s)


def status_of(target: str, requests: list[extractor_pb2.ExtractRequest]) -> tuple[list[str], grpc.StatusCode, str]:
    """(item ids answered, final status code, details) of one stream.

    Blocking API on purpose: grpc.aio's client marks a call INTERNAL when one of its writes races with the server's
    status, which would hide the code the server actually sent.
    """
    answered: list[str] = []
    with create_channel(target, retried_methods=()) as channel:  # no retry: the first status is the one wanted
        try:
            for response in extractor_pb2_grpc.ExtractorStub(channel).Extract(iter(requests), timeout=30):
                answered.append(response.item_id)
        except grpc.RpcError as error:
            return answered, error.code(), error.details()
    return answered, grpc.StatusCode.OK, ""
