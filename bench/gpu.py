"""The accelerator benchmark: the extractor service against a direct `gather` on the same device and precision,
for bf16 and fp32, with batching gain, early exit, bf16's feature error against fp32 and, on CUDA, host vs nvJPEG
decoding. One command, bounded in time, meant for the day a GPU machine is available.

    python -m bench.gpu                   # CUDA: ViT-B/16 (random init), under 8 min; no CUDA: the micro ViT on CPU
    python -m bench.gpu --smoke           # the micro ViT, short measurements: the plumbing in about a minute
    python -m bench.gpu --out /tmp/gpu    # writes gpu.json and GPU.md there (default bench/results/)

The same tables go to stdout; the exit status is 0 when every measurement ran (or was skipped, saying why), 1 when
one failed, 130 on Ctrl-C or SIGTERM. Servers are stopped by PID in `finally` blocks, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import math
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from bench.common import (
    VIT_B16,
    VIT_MICRO,
    BackboneSpec,
    BenchError,
    available_cpus,
    detect_device,
    device_description,
    raise_interrupt,
    run_streams,
    summarize,
)
from bench.run import git_commit, machine_info, write_json
from bench.servers import ServerProcess, mean_batch_size
from services.common.clients.extractor import ExtractorClient
from services.common.wire.codec import DEFAULT_CODEC
from services.common.wire.gather_modes import candidate_ks
from services.extractor.backbone import LoadedBackbone, PrecisionName, load_backbone
from services.extractor.gather import gather
from services.extractor.preprocess import ImagePreprocessor
from services.extractor.transfer import synthetic_png_images

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
JSON_NAME, MARKDOWN_NAME = "gpu.json", "GPU.md"
Kind = Literal["cuda", "cpu", "smoke"]


@dataclass(frozen=True)
class GpuSettings:
    """How big each measurement is; chosen by what the machine has (`settings_for`)."""

    backbone: BackboneSpec  # served and run directly: the same timm model, the same seed
    batch_images: int  # images of the direct batch; also the server's --max-batch-size
    precisions: tuple[PrecisionName, ...]  # measured in this order; fp32 is also the feature-error reference
    service_streams: int  # concurrent streams of the service side: streams x window images in flight fill batches
    service_window: int  # images in flight per service stream
    batching_streams: int  # streams of the batching measurement, one image in flight each (vs one such stream)
    reps: int  # repetitions of each timed run, alternating which side goes first
    measure_s: float  # target wall time of one timed run; image counts are sized from the previous run's rate
    image_pool: int  # distinct synthetic images, cycled (the server's cache is off, so repeats are not hits)
    budget_s: float  # measurements that would not fit are skipped, saying so; see HARD_SLACK_S for the rest
    server_start_s: float  # what a server start usually takes, to decide whether a measurement still fits
    torch_threads: int  # of the server's forward pass and of the direct side; 0 = every CPU


# fmt: off
SETTINGS: dict[Kind, GpuSettings] = {
    # ViT-B/16: 8 streams x 16 in flight keep four batches of 32 queued. 380 s, the slack, a slow first CUDA import and
    # the last server's stop stay under 8 minutes; a run as sized here should take about 5.
    "cuda": GpuSettings(VIT_B16, batch_images=32, precisions=("bf16", "fp32"), service_streams=8, service_window=16,
                        batching_streams=32, reps=3, measure_s=2.0, image_pool=64, budget_s=380, server_start_s=30,
                        torch_threads=0),
    # No GPU: the micro ViT, so the run still finishes in a couple of minutes on a laptop. One torch thread: its
    # ops are too small to split, and on a shared machine each op would wait for a second thread's busy core.
    "cpu": GpuSettings(VIT_MICRO, batch_images=32, precisions=("bf16", "fp32"), service_streams=4, service_window=8,
                       batching_streams=16, reps=3, measure_s=1.0, image_pool=64, budget_s=240, server_start_s=15,
                       torch_threads=1),
    "smoke": GpuSettings(VIT_MICRO, batch_images=32, precisions=("bf16", "fp32"), service_streams=4, service_window=8,
                         batching_streams=8, reps=2, measure_s=0.25, image_pool=32, budget_s=90, server_start_s=15,
                         torch_threads=1),
}
# fmt: on
HARD_SLACK_S = 30.0  # a measurement still running this long after the budget is cut short (BudgetExceeded)
_MAX_RUN_IMAGES = 20_000  # a timed service run never sends more, whatever the last rate said
_MAX_DIRECT_ITERATIONS = 500

METHOD_TEXT = (
    "The server runs as its own process (`python -m services.extractor.server --device D --precision P "
    "--cache-max-bytes 0 --max-batch-size B`: cache off, so the same images can be sent again without hits); "
    "clients are the project's `ExtractorClient`, one channel and thread per stream, in the benchmark process. "
    "The direct side is `services.extractor.gather.gather` in the benchmark process on the same backbone (same timm "
    "model and seed, fingerprint checked against the server's), same device and precision, on one batch of B "
    "images decoded beforehand, the result copied to the host; on CUDA `torch.cuda.synchronize()` brackets the "
    "clock. **Service vs direct** = service images/s (S streams x W images in flight; PNG decoding, batching, "
    "encoding with the default codec and gRPC included) / direct images/s, at k = N. **Batching gain** = images/s "
    "of the batching streams with one image in flight each / images/s of one such stream. **Early exit** = images/s "
    "at k / images/s at k = N (ideal N/k). **Feature error** = the gathered MIST features of the same B images at "
    "precision P against fp32 on the same device: max and mean of |x - x_fp32| / max|row of x_fp32| (per token "
    "row, as the codecs' error is measured) and ||x - x_fp32|| / ||x_fp32||. **Decode** (CUDA only): service "
    "images/s on JPEG images with `--image-decode host` vs `cuda`. Image counts are sized from the previous run's "
    "rate so each run lasts about the target time; every figure is the median of the repetitions (min..max, n), "
    "the side that goes first alternating."
)


def settings_for(device: str, smoke: bool) -> tuple[Kind, GpuSettings]:
    kind: Kind = "smoke" if smoke else ("cuda" if device == "cuda" else "cpu")
    return kind, SETTINGS[kind]


# ---------------------------------------------------------------------------------------------- time budget


class BudgetExceeded(BenchError):
    """The run's hard time limit passed in the middle of a measurement."""


class Budget:
    """The whole run's time: measurements ask before they start, and one that overruns is cut short."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def allows(self, need_s: float) -> bool:
        return self.left() >= need_s

    @contextlib.contextmanager
    def hard_limit(self) -> Iterator[None]:
        """BudgetExceeded in this (main) thread once the budget and HARD_SLACK_S are spent; disarmed on the way out,
        before the caller's `finally` stops its server."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGALRM, _raise_budget)
        signal.setitimer(signal.ITIMER_REAL, max(0.1, self.left() + HARD_SLACK_S))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _raise_budget(signum: int, frame: object) -> None:
    raise BudgetExceeded(f"the time budget plus {HARD_SLACK_S:g} s ran out in the middle of a measurement")


# ---------------------------------------------------------------------------------------------- the two sides


def image_pools(count: int, size: int) -> tuple[list[bytes], list[bytes]]:
    """`count` synthetic PNGs and the same pictures as JPEG (quality 90), the format nvJPEG decodes."""
    pngs = synthetic_png_images(count, size, seed=7)
    jpegs = []
    for png in pngs:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return pngs, jpegs


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class DirectSide:
    """The bare forward pass: `gather` on one preprocessed batch, in this process, on the server's device."""

    def __init__(self, backbone: LoadedBackbone, images: Sequence[bytes]) -> None:
        self.backbone = backbone
        preprocessor = ImagePreprocessor(backbone.data_config)
        self.batch = torch.stack([preprocessor.decode(image) for image in images]).to(backbone.device)
        self.iterations: dict[int, int] = {}  # k -> gathers per timed run, sized on the first call

    def features(self, ks: Sequence[int]) -> dict[int, np.ndarray]:
        """The MIST prefix sums at every k, on the host in float32 (one forward serves them all)."""
        with self.backbone.autocast():
            gathered = gather(self.backbone.model, self.batch, "mist", ks=tuple(ks))
        return {k: tensor.float().cpu().numpy() for k, tensor in gathered.items()}

    def _seconds(self, k: int, iterations: int) -> float:
        _synchronize(self.backbone.device)
        started = time.perf_counter()
        for _ in range(iterations):
            with self.backbone.autocast():
                features = gather(self.backbone.model, self.batch, "mist", ks=(k,))
            features[k].cpu()  # the service copies to the host too
        _synchronize(self.backbone.device)
        return time.perf_counter() - started

    def images_per_s(self, k: int, measure_s: float) -> float:
        """One timed run of about `measure_s` in whole batches (the first call at each k warms up and sizes)."""
        if k not in self.iterations:
            self._seconds(k, 1)  # first-call allocations and kernel selection
            once = min(self._seconds(k, 1) for _ in range(3))
            self.iterations[k] = max(1, min(_MAX_DIRECT_ITERATIONS, round(measure_s / max(once, 1e-6))))
        iterations = self.iterations[k]
        return iterations * self.batch.shape[0] / self._seconds(k, iterations)


@dataclass(frozen=True)
class ServiceRun:
    images_per_s: float
    mean_batch: float | None  # images per forward pass during the run, from the server's histogram


class ServiceSide:
    """The service through gRPC: `streams` concurrent streams with `window` images in flight each, cycling a pool."""

    def __init__(self, server: ServerProcess, pool: Sequence[bytes], measure_s: float) -> None:
        self.server, self.pool, self.measure_s = server, pool, measure_s
        # (k, streams, window) -> images/s of the last such run; k = 0: of any k, for a k not run yet
        self.rates: dict[tuple[int, int, int], float] = {}

    def run(self, k: int, streams: int, window: int, *, images: int | None = None) -> ServiceRun:
        """One timed run; without `images`, as many as the last such run's rate fills `measure_s` with."""
        if images is None:
            rate = self.rates.get((k, streams, window)) or self.rates.get((0, streams, window))
            images = streams * window * 2 if rate is None else round(rate * self.measure_s)
        per_stream = max(window * 2, math.ceil(min(images, _MAX_RUN_IMAGES) / streams))
        cycle = itertools.cycle(self.pool)
        image_sets = [[next(cycle) for _ in range(per_stream)] for _ in range(streams)]
        before = self.server.metrics()
        result = run_streams(self.server.target, image_sets, ks=(k,), codec=DEFAULT_CODEC.name, window=window)
        self.rates[(k, streams, window)] = self.rates[(0, streams, window)] = result.images_per_s
        return ServiceRun(result.images_per_s, mean_batch_size(before, self.server.metrics()))


def _server(settings: GpuSettings, device: str, backbone: LoadedBackbone, extra: Sequence[str] = ()) -> ServerProcess:
    flags = ["--device", device, "--precision", precision_of(backbone), "--cache-max-bytes", "0", "--grace-s", "1"]
    flags += ["--max-batch-size", str(settings.batch_images), "--torch-threads", str(settings.torch_threads)]
    return ServerProcess(settings.backbone, flags=[*flags, *extra])


@contextlib.contextmanager
def _running(server: ServerProcess, backbone: LoadedBackbone, budget: Budget) -> Iterator[ServerProcess]:
    """The server, started within what the budget has left and checked to run the direct side's weights; stopped
    by PID on the way out, whatever happens."""
    try:
        server.start(timeout_s=max(10.0, budget.left() + HARD_SLACK_S))
        with ExtractorClient(server.target) as client:
            served = client.describe().backbone.weights_fingerprint
        if served != backbone.weights_fingerprint:
            raise BenchError(
                f"the server runs other weights ({served}) than the direct side ({backbone.weights_fingerprint})"
            )
        yield server
    finally:
        try:
            server.stop()
        except BudgetExceeded:  # the one-shot hard limit went off while it drained: stop it again, then report
            server.stop()
            raise


def precision_of(backbone: LoadedBackbone) -> PrecisionName:
    names: dict[torch.dtype | None, PrecisionName] = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names[backbone.autocast_dtype]


# ---------------------------------------------------------------------------------------------- measurements


def feature_errors(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """`other` against `reference` ([..., D] features): per token row scaled by its largest magnitude, and overall."""
    rows = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    diff = np.abs(other.reshape(rows.shape).astype(np.float64) - rows)
    scaled = diff / np.maximum(np.abs(rows).max(axis=1, keepdims=True), 1e-12)
    return {
        "max_relative_error": float(scaled.max()),
        "mean_relative_error": float(scaled.mean()),
        "norm_relative_error": float(np.linalg.norm(diff) / max(float(np.linalg.norm(rows)), 1e-12)),
    }


@dataclass
class _Samples:
    """Every repetition's figures, paired by position (repetition r of one list ran next to r of the other)."""

    direct: dict[int, list[float]]  # k -> images/s of the direct gather
    service: dict[int, list[float]]  # k -> images/s through the service
    service_batch: list[float] = field(default_factory=list)  # mean server batch at k = N
    single: list[float] = field(default_factory=list)  # images/s, one stream with one image in flight
    concurrent: list[float] = field(default_factory=list)  # images/s, `batching_streams` such streams
    single_batch: list[float] = field(default_factory=list)
    concurrent_batch: list[float] = field(default_factory=list)


def measure_precision(
    settings: GpuSettings, direct: DirectSide, ks: list[int], pool: Sequence[bytes], budget: Budget
) -> dict[str, Any]:
    """Service vs direct, early exit and batching gain at one precision, against one server of that precision."""
    with _running(_server(settings, direct.backbone.device, direct.backbone), direct.backbone, budget) as server:
        service = ServiceSide(server, pool, settings.measure_s)
        service.run(ks[0], settings.service_streams, settings.service_window)  # warm-ups, which size the timed runs
        service.run(ks[0], 1, 1, images=4)
        service.run(ks[0], settings.batching_streams, 1)
        samples = _Samples(direct={k: [] for k in ks}, service={k: [] for k in ks})
        one_rep_s = settings.measure_s * (2 * len(ks) + 2) * 1.5
        for rep in range(settings.reps):
            if rep and not budget.allows(one_rep_s):
                break  # fewer repetitions rather than a run over its budget
            _rep(settings, direct, service, ks, samples, other_first=rep % 2 == 1)
    return _precision_summary(ks, samples)


def _rep(
    settings: GpuSettings, direct: DirectSide, service: ServiceSide, ks: list[int], samples: _Samples, other_first: bool
) -> None:
    """One repetition: each k on both sides, then one stream vs the batching streams."""
    for k in ks:
        for side in ("service", "direct") if other_first else ("direct", "service"):
            if side == "direct":
                samples.direct[k].append(direct.images_per_s(k, settings.measure_s))
                continue
            run = service.run(k, settings.service_streams, settings.service_window)
            samples.service[k].append(run.images_per_s)
            if k == ks[0] and run.mean_batch is not None:
                samples.service_batch.append(run.mean_batch)
    for side in ("concurrent", "single") if other_first else ("single", "concurrent"):
        run = service.run(ks[0], settings.batching_streams if side == "concurrent" else 1, 1)
        getattr(samples, side).append(run.images_per_s)
        getattr(samples, f"{side}_batch").append(run.mean_batch or 0.0)


def _ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


def _precision_summary(ks: list[int], samples: _Samples) -> dict[str, Any]:
    depth, early = ks[0], ks[1:]
    return {
        "direct_images_per_s": {str(k): summarize(samples.direct[k]) for k in ks},
        "service_images_per_s": {str(k): summarize(samples.service[k]) for k in ks},
        "service_vs_direct": summarize(_ratios(samples.service[depth], samples.direct[depth])),
        "service_mean_batch_size": summarize(samples.service_batch) if samples.service_batch else None,
        "early_exit_speedup_direct": {
            str(k): summarize(_ratios(samples.direct[k], samples.direct[depth])) for k in early
        },
        "early_exit_speedup_service": {
            str(k): summarize(_ratios(samples.service[k], samples.service[depth])) for k in early
        },
        "early_exit_ideal": {str(k): depth / k for k in early},
        "single_stream_images_per_s": summarize(samples.single),
        "concurrent_images_per_s": summarize(samples.concurrent),
        "batching_gain": summarize(_ratios(samples.concurrent, samples.single)),
        "single_stream_mean_batch_size": summarize(samples.single_batch),
        "concurrent_mean_batch_size": summarize(samples.concurrent_batch),
        "reps": len(samples.single),
    }


def measure_decode(
    settings: GpuSettings, backbone: LoadedBackbone, jpegs: Sequence[bytes], budget: Budget
) -> dict[str, Any]:
    """Service images/s on JPEG images with --image-decode host, then cuda (one server each), at k = N."""
    depth = backbone.geometry.num_blocks
    rates: dict[str, list[float]] = {}
    for decode in ("host", "cuda"):
        server = _server(settings, backbone.device, backbone, ("--image-decode", decode))
        with _running(server, backbone, budget):
            service = ServiceSide(server, jpegs, settings.measure_s)
            service.run(depth, settings.service_streams, settings.service_window)  # warm-up and sizing
            rates[decode] = [
                service.run(depth, settings.service_streams, settings.service_window).images_per_s
                for _ in range(settings.reps)
            ]
    return {
        "status": "ok",
        "precision": precision_of(backbone),
        "host_images_per_s": summarize(rates["host"]),
        "cuda_images_per_s": summarize(rates["cuda"]),
        "cuda_vs_host": summarize(_ratios(rates["cuda"], rates["host"])),
    }


# ---------------------------------------------------------------------------------------------- the run


class Phases:
    """Named measurements in order, each bounded by the budget; each records ok / skipped / error and its time,
    and none stops the run (a failed measurement's traceback goes to stderr)."""

    def __init__(self, budget: Budget, say: Callable[[str], None]) -> None:
        self.budget, self.say = budget, say
        self.status: dict[str, dict[str, Any]] = {}

    def run(self, name: str, need_s: float, measure: Callable[[], Any]) -> Any:
        """`measure()`'s result, or None when it was skipped (it would not fit in the budget) or failed."""
        if not self.budget.allows(need_s):
            reason = f"time budget: {max(0.0, self.budget.left()):.0f} s left, needs about {need_s:.0f} s"
            return self._record(name, "skipped", 0.0, reason)
        self.say(f"[{self.budget.elapsed():5.1f} s] {name} ...")
        started = time.perf_counter()
        try:
            with self.budget.hard_limit():
                result = measure()
        except BudgetExceeded as error:
            return self._record(name, "skipped", time.perf_counter() - started, f"cut short: {error}")
        except Exception as error:  # one failed measurement must not lose the others
            traceback.print_exc()
            return self._record(name, "error", time.perf_counter() - started, f"{type(error).__name__}: {error}")
        self._record(name, "ok", time.perf_counter() - started, "")
        return result

    def _record(self, name: str, status: str, seconds: float, error: str) -> None:
        self.status[name] = {"status": status, "seconds": round(seconds, 2), "error": error}
        if status != "ok":
            self.say(f"[{self.budget.elapsed():5.1f} s] {name}: {status}: {error}")


def accelerator_info(device: str) -> dict[str, Any]:
    """The machine as bench.run describes it, plus what accelerator figures depend on."""
    info: dict[str, Any] = {**machine_info(), "device": device_description(device), "torch_cuda": torch.version.cuda}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu_count=torch.cuda.device_count(),
            gpu_memory_bytes=props.total_memory,
            gpu_capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,  # fp32 matmuls stay fp32 unless this is on
            tf32_cudnn=torch.backends.cudnn.allow_tf32,  # the patch embedding is a convolution: TF32 by default
            nvidia_driver=_nvidia_driver(),
        )
    return info


def _nvidia_driver() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip().splitlines() or [None])[0]


def run(settings: GpuSettings, kind: Kind, device: str, say: Callable[[str], None]) -> dict[str, Any]:
    """Every measurement, as the dict gpu.json holds; the budget starts now."""
    budget = Budget(settings.budget_s)
    phases = Phases(budget, say)
    commit, dirty = git_commit()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.torch_threads or available_cpus())  # what the server's forward pass gets
    try:
        results: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
            "commit": commit,
            "commit_dirty": dirty,
            "kind": kind,
            "machine": accelerator_info(device),  # after set_num_threads: it names the torch threads
            "settings": _settings_dict(settings, device),
            "precisions": {},
            "feature_error": {},
            "image_decode": None,
        }
        _run_phases(settings, device, phases, results)
    finally:
        torch.set_num_threads(previous_threads)
    results["phases"] = phases.status
    results["seconds"] = round(budget.elapsed(), 1)
    results["method"] = METHOD_TEXT
    return results


def _run_phases(settings: GpuSettings, device: str, phases: Phases, results: dict[str, Any]) -> None:
    spec = settings.backbone
    backbones: dict[str, LoadedBackbone] = {}
    for precision in dict.fromkeys(("fp32", *settings.precisions)):  # fp32 always: the feature-error reference
        loaded = phases.run(
            f"load {precision}",
            5.0,
            lambda p=precision: load_backbone(
                spec.name, device=device, precision=p, model_kwargs=dict(spec.model_kwargs)
            ),
        )
        if loaded is not None:
            backbones[precision] = loaded
    if not backbones:
        return
    any_backbone = next(iter(backbones.values()))
    pools = phases.run(
        "images", 5.0, lambda: image_pools(settings.image_pool, int(any_backbone.data_config["input_size"][-1]))
    )
    if pools is None:
        return
    pngs, jpegs = pools
    depth = any_backbone.geometry.num_blocks
    ks = [depth, *(k for k in candidate_ks(depth) if k != depth)]  # k = N first: the reference of every ratio
    results["settings"]["ks"] = ks
    directs = {p: DirectSide(backbone, pngs[: settings.batch_images]) for p, backbone in backbones.items()}
    _feature_error_phases(settings, directs, ks, phases, results)
    for precision in settings.precisions:
        if precision in directs:
            results["precisions"][precision] = phases.run(
                f"service vs direct, {precision}",
                settings.server_start_s + settings.measure_s * (2 * len(ks) + 2) * (settings.reps + 1),
                lambda p=precision: measure_precision(settings, directs[p], ks, pngs, phases.budget),
            )
    first = backbones.get(settings.precisions[0])
    if device != "cuda":
        results["image_decode"] = {"status": "skipped", "reason": "--image-decode cuda needs a CUDA device"}
    if device != "cuda" or first is None:  # a backbone that did not load is listed with its error already
        return
    results["image_decode"] = phases.run(
        "image decode host vs cuda",
        2 * settings.server_start_s + 2 * settings.measure_s * (settings.reps + 1),
        lambda: measure_decode(settings, first, jpegs, phases.budget),
    )


def _feature_error_phases(
    settings: GpuSettings, directs: Mapping[str, DirectSide], ks: list[int], phases: Phases, results: dict[str, Any]
) -> None:
    """Each precision's gathered features at every k against fp32's, on the same images and device."""
    reference = phases.run("features, fp32", 5.0, lambda: directs["fp32"].features(ks)) if "fp32" in directs else None
    if reference is None:
        return
    for precision in settings.precisions:
        if precision == "fp32" or precision not in directs:
            continue
        other = phases.run(f"features, {precision}", 5.0, lambda p=precision: directs[p].features(ks))
        if other is not None:
            results["feature_error"][precision] = {str(k): feature_errors(reference[k], other[k]) for k in sorted(ks)}


def _settings_dict(settings: GpuSettings, device: str) -> dict[str, Any]:
    return {
        "device": device,
        "backbone": settings.backbone.to_dict(),
        "batch_images": settings.batch_images,
        "precisions": list(settings.precisions),
        "service_streams": settings.service_streams,
        "service_window": settings.service_window,
        "batching_streams": settings.batching_streams,
        "reps": settings.reps,
        "measure_s": settings.measure_s,
        "image_pool": settings.image_pool,
        "budget_s": settings.budget_s,
        "torch_threads": settings.torch_threads or available_cpus(),
        "codec": DEFAULT_CODEC.name,
    }


# ---------------------------------------------------------------------------------------------- report


def _spread(value: Mapping[str, float] | None, digits: int = 3) -> str:
    if not value:
        return "-"
    return f"{value['median']:.{digits}g} ({value['min']:.{digits}g}..{value['max']:.{digits}g}, n={value['n']})"


def _median(value: Mapping[str, float] | None, fmt: str = ".1f") -> str:
    return "-" if not value else format(value["median"], fmt)


def markdown(results: Mapping[str, Any], *, method: bool = True) -> str:
    """GPU.md; stdout gets the same without the method paragraph."""
    machine, settings = results["machine"], results["settings"]
    backbone = settings["backbone"]["label"]
    lines = [
        "# Accelerator benchmark (`make bench-gpu`)",
        "",
        f"{results['date']}, commit {results['commit'][:12]}{' (uncommitted changes)' if results['commit_dirty'] else ''}"
        f". Device: {machine['device']}; torch {machine['torch']}, CUDA {machine['torch_cuda'] or 'none'}"
        + (f", cuDNN {machine['cudnn']}, driver {machine['nvidia_driver']}" if "cudnn" in machine else "")
        + f"; {machine['cpu']}, {machine['cpus_usable']} CPUs usable. Backbone: {backbone}, batches of "
        f"{settings['batch_images']}, codec {settings['codec']}, {settings['reps']} repetitions of about "
        f"{settings['measure_s']:g} s each.",
        "",
        "## Service vs direct, batching",
        "",
        f"| precision | direct img/s (k = N) | service img/s ({settings['service_streams']} streams x "
        f"{settings['service_window']}) | service / direct | mean batch | 1 stream img/s | "
        f"{settings['batching_streams']} streams img/s | batching gain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    measured = {p: s for p, s in results["precisions"].items() if s}
    for precision, section in measured.items():
        depth = str(settings["ks"][0])
        lines.append(
            f"| {precision} | {_median(section['direct_images_per_s'][depth])} | "
            f"{_median(section['service_images_per_s'][depth])} | {_spread(section['service_vs_direct'])} | "
            f"{_median(section['service_mean_batch_size'])} | {_median(section['single_stream_images_per_s'])} | "
            f"{_median(section['concurrent_images_per_s'])} | {_spread(section['batching_gain'])} |"
        )
    lines += ["", "## Early exit (images/s at k over images/s at k = N)", ""]
    lines += ["| precision | k | direct img/s | speed-up, direct | speed-up, via the service | ideal N/k |"]
    lines += ["|---|---:|---:|---:|---:|---:|"]
    for precision, section in measured.items():
        for k, speedup in section["early_exit_speedup_direct"].items():
            lines.append(
                f"| {precision} | {k} | {_median(section['direct_images_per_s'][k])} | {_spread(speedup)} | "
                f"{_spread(section['early_exit_speedup_service'][k])} | {section['early_exit_ideal'][k]:.2f} |"
            )
    lines += ["", "## Feature error against fp32 (the same images on the same device)", ""]
    lines += ["| precision | k | max relative | mean relative | norm relative |", "|---|---:|---:|---:|---:|"]
    for precision, per_k in results["feature_error"].items():
        for k, error in per_k.items():
            lines.append(
                f"| {precision} | {k} | {error['max_relative_error']:.3g} | {error['mean_relative_error']:.3g} | "
                f"{error['norm_relative_error']:.3g} |"
            )
    lines += ["", "## JPEG decode on the GPU (`--image-decode`)", "", _decode_text(results.get("image_decode"))]
    problems = [(name, phase) for name, phase in results["phases"].items() if phase["status"] != "ok"]
    if problems:
        lines += ["", "## Not measured", "", "| measurement | status | why |", "|---|---|---|"]
        lines += [f"| {name} | {phase['status']} | {phase['error']} |" for name, phase in problems]
    lines += ["", f"Elapsed: {results['seconds']:.1f} s of measurements (budget {settings['budget_s']:g} s)."]
    if method:
        lines += ["", f"*Method.* {results['method']}"]
    return "\n".join(lines) + "\n"


def _decode_text(decode: Mapping[str, Any] | None) -> str:
    if not decode:
        return "Not measured (see below)."
    if decode.get("status") != "ok":
        return f"Not measured: {decode.get('reason', decode.get('status'))}."
    return "\n".join(
        [
            f"| decode ({decode['precision']}, k = N) | service img/s on JPEG | vs host |",
            "|---|---:|---:|",
            f"| host (Pillow) | {_median(decode['host_images_per_s'])} | 1 |",
            f"| cuda (nvJPEG) | {_median(decode['cuda_images_per_s'])} | {_spread(decode['cuda_vs_host'])} |",
        ]
    )


# ---------------------------------------------------------------------------------------------- main


def _process_age_s() -> float | None:
    """Seconds since this process started (interpreter start-up and imports included), from /proc on Linux."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the micro ViT and short measurements (~1 min on 2 CPUs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument(
        "--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: cuda if torch sees one"
    )
    parser.add_argument(
        "--budget-s", type=float, help="time for the measurements (default: 380 on CUDA, 240 on CPU, 90 with --smoke)"
    )
    parser.add_argument(
        "--precisions", default="", help="comma-separated, of fp32, bf16, fp16 (CUDA only); default bf16,fp32"
    )
    args = parser.parse_args(argv)
    args.precisions = tuple(p.strip() for p in args.precisions.split(",") if p.strip())
    if unknown := [p for p in args.precisions if p not in ("fp32", "bf16", "fp16")]:
        parser.error(f"unknown precision(s) {', '.join(unknown)}; choose from fp32, bf16, fp16")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error("--budget-s must be positive")
    return args


def main(argv: Sequence[str] | None = None, *, log: Callable[[str], None] | None = None) -> int:
    args = _parse_args(argv)
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    device = detect_device() if args.device == "auto" else args.device
    kind, settings = settings_for(device, args.smoke)
    settings = replace(
        settings, budget_s=args.budget_s or settings.budget_s, precisions=args.precisions or settings.precisions
    )
    args.out.mkdir(parents=True, exist_ok=True)
    say(f"bench.gpu: {kind} profile on {device}, {settings.backbone.display}, budget {settings.budget_s:g} s")
    previous_handler = signal.signal(signal.SIGTERM, raise_interrupt)  # finally blocks stop servers on SIGTERM too
    try:
        results = run(settings, kind, device, say)
    except KeyboardInterrupt:
        say("interrupted: servers stopped; no results written")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    results["process_seconds"] = _process_age_s()
    write_json(args.out / JSON_NAME, results)
    (args.out / MARKDOWN_NAME).write_text(markdown(results))
    print(markdown(results, method=False), flush=True)
    age = results["process_seconds"]
    print(
        f"elapsed: {age if age is not None else results['seconds']:.1f} s in all; wrote {args.out / JSON_NAME} "
        f"and {args.out / MARKDOWN_NAME}",
        flush=True,
    )
    return 1 if any(phase["status"] == "error" for phase in results["phases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
