"""What every benchmark section shares: run profiles, the backbones they use, timed concurrent Extract streams, and
robust summaries of repeated timings.

Kept free of torch and timm imports: the edge-link client (`python -m bench.link client`) imports this module
inside its namespace and must start fast.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
Profile = Literal["full", "quick", "smoke"]
PROFILES: tuple[Profile, ...] = ("full", "quick", "smoke")
MIB = 2**20


class BenchError(RuntimeError):
    """A benchmark could not measure what it set out to (a server that would not start, a failed stream)."""


class BenchSkipped(RuntimeError):
    """A section cannot run on this machine (no root for network namespaces, ...); the message says why."""


@dataclass(frozen=True)
class BackboneSpec:
    """A timm ViT as the benchmarks build it: always random init (nothing is downloaded)."""

    name: str  # timm model name
    model_kwargs: Mapping[str, object] = field(default_factory=dict)  # extra timm.create_model arguments
    label: str = ""  # how reports name it; defaults to the timm name

    @property
    def display(self) -> str:
        return self.label or self.name

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "model_kwargs": dict(self.model_kwargs), "label": self.display}


# The paper's backbone: 12 blocks, 197 tokens x 768 dims, ~17.6 GFLOPs per image.
VIT_B16 = BackboneSpec("vit_base_patch16_224", label="ViT-B/16 (random init)")
# A quarter of ViT-B's compute at the same 197 tokens (384 dims): the scaling runs finish on 2 cores.
VIT_S16 = BackboneSpec("vit_small_patch16_224", label="ViT-S/16 (random init)")
# 12 blocks at 224 px but 192 dims: quick runs keep the real depth and token count at a sixteenth of the cost.
VIT_TI16 = BackboneSpec("vit_tiny_patch16_224", label="ViT-Ti/16 (random init)")
# The test suite's micro ViT (4 blocks, 17 tokens x 32 dims, 32 px): the smoke profile only proves the plumbing.
VIT_MICRO = BackboneSpec(
    "vit_tiny_patch16_224",
    {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2},
    label="micro ViT (4 blocks, 32 px; smoke test)",
)


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Median and spread (min, max) of repeated measurements; medians resist a noisy neighbour on the machine."""
    if not values:
        raise BenchError("nothing measured")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise BenchError("nothing measured")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), which is what torch and the server get."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def child_env() -> dict[str, str]:
    """The environment of the processes we start: no MIST_* settings leaking in, nothing ever downloaded, and no
    HTTP proxy that gRPC would route loopback or namespace traffic through."""
    dropped = ("MIST_", "GRPC_TRACE", "GRPC_VERBOSITY")
    proxies = {"http_proxy", "https_proxy", "grpc_proxy", "all_proxy"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped) and k.lower() not in proxies}
    env.update(HF_HUB_OFFLINE="1", TIMM_OFFLINE="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return env


def stop_process(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM (a server drains), SIGKILL after `grace_s`, then reap. Safe to call twice."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def raise_interrupt(signum: int, frame: object) -> None:
    """A SIGTERM handler: turn the signal into KeyboardInterrupt, so that `finally` blocks stop what was started."""
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------------------------------- timed streams


@dataclass(frozen=True)
class StreamRun:
    """One or several concurrent Extract streams, timed from the common start to the last result."""

    seconds: float  # wall time: all streams start together, the clock stops at the last result
    images: int  # results received (all ok: a per-item error fails the measurement)
    payload_bytes: int  # serialized FeatureTensor bytes received (encoded_nbytes)
    latencies_s: tuple[float, ...]  # per image: from handing the request to gRPC to receiving its result
    cache_hits: int  # results the server answered from its cache

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def run_streams(
    target: str,
    image_sets: Sequence[Sequence[bytes]],
    *,
    mode: str = "mist",
    ks: Sequence[int] = (),
    codec: str = "i8o-zstd",
    window: int = 32,
    connect_timeout_s: float = 60.0,
) -> StreamRun:
    """One Extract stream per image set, each on its own channel and thread (like separate devices), with at most
    `window` images in flight per stream; every stream connects first, then all start at once.
    """
    from services.common.clients.extractor import ExtractorClient
    from services.common.wire.codec import encoded_nbytes

    count = len(image_sets)
    start = threading.Barrier(count + 1)
    ends: list[float] = [0.0] * count
    latencies: list[list[float]] = [[] for _ in range(count)]
    payload, hits = [0] * count, [0] * count
    failures: list[BaseException] = []

    def stream(index: int, images: Sequence[bytes]) -> None:
        try:
            with ExtractorClient(target) as client:
                client.describe(timeout_s=connect_timeout_s)  # connected before the clock starts
                start.wait()
                sent: dict[str, float] = {}

                def requests():
                    for number, image in enumerate(images):
                        item_id = f"s{index}-{number}"
                        sent[item_id] = time.perf_counter()
                        yield item_id, image

                for result in client.extract(requests(), mode=mode, ks=ks, codec=codec, max_in_flight=window):
                    now = time.perf_counter()
                    if not result.ok:
                        error = result.error
                        raise BenchError(f"image {result.item_id} failed: {error.reason}: {error.message}")
                    latencies[index].append(now - sent[result.item_id])
                    payload[index] += sum(encoded_nbytes(f) for f in result.features)
                    hits[index] += result.cache_hit
                ends[index] = time.perf_counter()
        except BaseException as error:  # noqa: BLE001 (reported by the caller's thread)
            failures.append(error)
            start.abort()

    threads = [
        threading.Thread(target=stream, args=(i, images), name=f"bench-stream-{i}", daemon=True)
        for i, images in enumerate(image_sets)
    ]
    for thread in threads:
        thread.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    if failures:
        raise BenchError(f"{len(failures)} of {count} streams failed; first: {failures[0]!r}") from failures[0]
    flat = tuple(latency for per_stream in latencies for latency in per_stream)
    return StreamRun(
        seconds=max(ends) - began, images=len(flat), payload_bytes=sum(payload), latencies_s=flat, cache_hits=sum(hits)
    )


def detect_device() -> Literal["cpu", "cuda"]:
    """cuda when torch sees a GPU, else cpu (imports torch: call it from the parent process only)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_description(device: str) -> str:
    """What the extractor benchmarks ran on, in words: the GPU's name, or the CPU model and its usable cores."""
    import torch

    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})"
    model = next(
        (line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
        "unknown CPU",
    )
    return f"cpu ({model}, {available_cpus()} cores usable, {torch.get_num_threads()} torch threads)"


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []
