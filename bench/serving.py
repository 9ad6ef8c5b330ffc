"""Section 7: the serving path's own cost per image, side by side with a bare gRPC echo in the same run: the extractor
with a free forward pass (bench/free_forward_server.py) at the benchmark backbone's geometry, its stages timed alone,
the tiny model's cache misses and hits against the echo, and `--workers N` against one process.

    python -m bench.run --only serving

Every pass sends fresh distinct images (a counter drawn into the pixels), so a miss is a miss with the cache on, as
deployed; the hits are a second pass over the same images. The sides of each comparison alternate which runs first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any, TypeVar

import grpc

from bench.common import VIT_B16, VIT_MICRO, BackboneSpec, BenchError, Profile, available_cpus, summarize
from bench.echo_server import write_features
from bench.servers import ServerProcess
from bench.serving_load import (
    ClientPool,
    EchoProcess,
    ImageFormat,
    LoadRun,
    connections_by_process,
    distinct_images,
    listening_processes,
    process_tree,
    write_requests,
)
from bench.serving_stages import measure_stages, stage_sum_ms
from services.common.pb import extractor_pb2, extractor_pb2_grpc, feature_pb2
from services.extractor.config import ExtractorConfig

TARGET_CPU_MS = 2.0  # the issue: server CPU per image with a negligible forward at ViT-B/16 geometry
TARGET_OVER_STAGES_MS = 0.5  # ... and at most the isolated stages plus this much orchestration
TARGET_MISS_VS_ECHO = 0.4  # tiny model, 32 px PNGs: cache misses' images/s against the echo's
TARGET_HIT_VS_ECHO = 0.8  # ... and cache hits'
TARGET_WORKERS_SCALING = 1.3  # --workers 2 against one process on two cores, the client sharing them
_SEED_IMAGES = 4  # distinct answers captured from each server for its echo
_WORKERS_WAIT_S = 180.0  # every worker loads its own backbone (ViT-B: several seconds each on a busy machine)
_NO_WORKERS_AFTER_S = 10.0  # a server with no child process this long after it listens spawned no workers
_BALANCE_TRIES = 20  # reconnections allowed until the kernel spreads the clients' connections evenly
_STOP_GRACE_S = 20.0  # servers drain for --grace-s 1; a supervisor waits for its workers
# A filling cache keeps taking fresh memory (and glibc puts its entries in the holes the batches' buffers left, so
# those are faulted in afresh too): measured 2.25-2.47 ms of server CPU per ViT-B image while it fills, 1.49-1.70
# once full. The warm-up fills it, with this margin for the kernel's uneven spread of clients over workers.
_FILL_MARGIN = 1.1
_MAX_FILL_IMAGES = 16_384


@dataclass(frozen=True)
class ServingSettings:
    """Sizes of section 7's measurements."""

    geometry: BackboneSpec  # served with a free forward pass: only its answers' shape and size matter
    tiny: BackboneSpec  # served as it is (its forward is tiny) for the cache miss / hit ratios
    clients: int  # load-client processes, each with its own TCP connection and one stream per pass
    window: int  # requests in flight per stream (the server's per-stream window is 32)
    warmup_images: int  # per client and server, before anything is measured (the first batches, the caches)
    images: int  # per client in each measured pass at the geometry
    tiny_images: int  # per client in each tiny-model pass
    reps: int  # repetitions of every pass, the order rotating
    workers: int  # serving processes of the --workers measurement
    stage_images: int  # images each isolated stage runs over
    stage_reps: int  # passes per isolated stage (median)


TINY = dataclasses.replace(VIT_MICRO, label="micro ViT (4 blocks, 32 px)")  # the test suite's tiny model
SETTINGS: dict[Profile, ServingSettings] = {
    "full": ServingSettings(
        VIT_B16, TINY, clients=4, warmup_images=64, images=1024, tiny_images=2048, reps=3, stage_images=64,
        stage_reps=5, workers=2, window=32,
    ),
    "quick": ServingSettings(
        VIT_B16, TINY, clients=2, warmup_images=32, images=512, tiny_images=1024, reps=2, stage_images=32,
        stage_reps=3, workers=2, window=32,
    ),
    # The micro ViT at both places, one repetition: proves the plumbing (and the test suite runs it) in seconds.
    "smoke": ServingSettings(
        VIT_MICRO, TINY, clients=2, warmup_images=16, images=256, tiny_images=256, reps=1, stage_images=16,
        stage_reps=2, workers=2, window=16,
    ),
}  # fmt: skip
SERVER_FLAGS = ("--device", "cpu", "--grace-s", "1")  # everything else at the product's defaults

METHOD_TEXT = (
    "Servers run as their own processes on 127.0.0.1: the extractor with a free forward pass (`python -m "
    "bench.free_forward_server`, the real server with `engine.gather` returning precomputed real features of the "
    "same backbone, so answers have their real sizes), a bare grpc.aio echo (`python -m bench.echo_server`: same "
    "method, message types and server options, answering each request at once with a prebuilt answer captured from "
    "the real server), and for the ratios the real extractor with the tiny model. C client processes (own channel "
    "and TCP connection each, one bidi stream per pass, W requests in flight, prebuilt request bytes) send fresh "
    "distinct images every pass (224 px JPEG at ViT-B/16, 32 px PNG for the tiny model), after a warm-up pass; at the "
    "benchmark geometry the extractors' warm-up also fills their feature caches (default 256 MiB, one per worker; "
    "`cache_fill_images` in the JSON), so the passes see a long-running server where every fresh image evicts one "
    "(a filling cache costs more: fresh pages). "
    "**images/s** = images of all clients / (last client's end - first client's start). **Server CPU per image** = "
    "utime + stime of the server's process tree (/proc/<pid>/stat, a supervisor and its workers summed) over the "
    "pass / images (the free forward's one real gather runs before any measured pass); **voluntary switches** "
    "likewise from every thread's /proc status. **Stages** are timed alone in "
    "the benchmark process (time.thread_time, one torch thread) on the same JPEGs and the server's own answers: "
    "cache lookup (sha256 + FeatureCache.get), decode to uint8, normalise (per batch of 32), quantize (per batch), "
    "encode (per image), answer build + serialize; their sum adds the echo's CPU per message (gRPC's share; it also "
    "serializes an answer, counted twice, a few microseconds), timed after each round of passes. **Orchestration** = "
    "measured - sum, per round (median). **Hits / misses "
    "vs echo**: the tiny model's pass over fresh images (all misses), the same images again (all hits), and an echo "
    "pass, per repetition (tiny model: the micro ViT of the test suite, its real forward). **Workers**: the "
    "free-forward server with `--workers N` against one process, same load, the clients reconnecting until the "
    "kernel spread their connections evenly over the workers; not evaluated where the tree has fewer serving "
    "processes than asked (found by their listening sockets). Each figure: median over the repetitions (min..max)."
)


def run(profile: Profile, out_dir: Path) -> dict[str, Any]:
    settings = SETTINGS[profile]
    with TemporaryDirectory(prefix="mist-serving-") as scratch, ClientPool(settings.clients) as clients:
        bench = _Bench(settings, Path(scratch), clients)
        geometry = bench.geometry_part()
        tiny = bench.tiny_part()
    return _summary(settings, geometry, tiny)


class FreeForwardServer(ServerProcess):
    """`python -m bench.free_forward_server` with the flags ServerProcess builds for the real server."""

    def __init__(self, backbone: BackboneSpec, *, flags: Sequence[str]) -> None:
        super().__init__(backbone, flags=flags)
        self.command[self.command.index("services.extractor.server")] = "bench.free_forward_server"


def _popen(process: ServerProcess | EchoProcess) -> subprocess.Popen[str] | None:
    if isinstance(process, EchoProcess):
        return process.proc
    return process._proc  # noqa: SLF001 (ServerProcess has no public pid yet)


def _pid(server: ServerProcess | EchoProcess) -> int:
    proc = _popen(server)
    if proc is None:
        raise BenchError("the server is not running")
    return proc.pid


Started = TypeVar("Started", ServerProcess, EchoProcess)


def _started(processes: list[ServerProcess | EchoProcess], process: Started) -> Started:
    """Start `process`, listed first in `processes` so that _stop_together stops it even if the start fails."""
    processes.append(process)
    process.start()
    return process


def _stop_together(processes: Sequence[ServerProcess | EchoProcess]) -> None:
    """SIGTERM to all at once, so that they drain side by side, then each one's own stop() (SIGKILL if need be)."""
    running = [p for p in (_popen(process) for process in processes) if p is not None and p.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
    for process in processes:
        process.stop()


def _port(target: str) -> int:
    return int(target.rpartition(":")[2])


@dataclass
class _Geometry:
    """What the geometry part measured."""

    info: extractor_pb2.BackboneInfo
    answer_bytes: int  # one serialized FeatureTensor as the server encodes it
    request_bytes: float  # mean JPEG size sent
    runs: dict[str, list[LoadRun]]  # "free_forward", "echo", and "workers" when the tree had N serving processes
    serving_processes: int  # found in the --workers N server's tree
    connections_by_worker: list[int]  # the clients' connections per worker, once spread
    stages: list[dict[str, Any]]  # the isolated stages, measured once per round of passes
    cache_fill_images: dict[str, int]  # per side: fresh images sent in its warm-up to fill the feature cache(s)


@dataclass
class _Tiny:
    info: extractor_pb2.BackboneInfo
    answer_bytes: int
    runs: dict[str, list[LoadRun]]  # "miss", "hit", "echo"


class _Bench:
    def __init__(self, settings: ServingSettings, scratch: Path, clients: ClientPool) -> None:
        self.settings, self.scratch, self.clients = settings, scratch, clients
        self.next_image = 0  # every image drawn so far is numbered below this: fresh images never repeat
        self.next_file = 0

    def images(self, count: int, size: int, image_format: ImageFormat) -> list[bytes]:
        first, self.next_image = self.next_image, self.next_image + count
        return distinct_images(count, size, image_format, first=first)

    def request_files(self, count: int, size: int, image_format: ImageFormat, k: int) -> list[Path]:
        """One file of `count` fresh images per client."""
        files = []
        for _ in range(self.settings.clients):
            self.next_file += 1
            path = self.scratch / f"requests-{self.next_file}.pkl"
            files.append(write_requests(path, self.images(count, size, image_format), prefix=path.stem, k=k))
        return files

    def stop(self, processes: Sequence[ServerProcess | EchoProcess]) -> None:
        """The clients' connections closed first (a server with none stops in a second), then the servers."""
        try:
            self.clients.disconnect()
        finally:
            _stop_together(processes)

    def measure(self, target: str, pid: int, files: list[Path]) -> LoadRun:
        try:
            return self.clients.run(target, files, window=self.settings.window, server_pid=pid)
        finally:
            for path in files:
                path.unlink(missing_ok=True)

    def warm_up(
        self,
        target: str,
        pid: int,
        size: int,
        image_format: ImageFormat,
        k: int,
        workers: Sequence[int] = (),
        fill_images: int = 0,
    ) -> list[int]:
        """Connect every client and send one pass; with `workers`, reconnect until the kernel has spread the
        connections evenly over them (what many devices get on average); then `fill_images` more fresh images over
        all clients (the feature cache filled: see _cache_fill_images). Returns the connections per worker."""
        files = self.request_files(self.settings.warmup_images, size, image_format, k)
        self.clients.connect(target, files)
        spread: list[int] = []
        for _ in range(_BALANCE_TRIES if workers else 0):
            counts = connections_by_process(pid, _port(target))
            spread = [counts.get(worker, 0) for worker in workers]
            if max(spread) - min(spread) <= 1:
                break
            self.clients.connect(target, files, fresh=True)
        self.measure(target, pid, files)
        if fill_images > 0:
            per_client = -(-fill_images // self.settings.clients)
            self.measure(target, pid, self.request_files(per_client, size, image_format, k))
        return spread

    # ---- the benchmark backbone's geometry, free forward --------------------------------------------------------

    def geometry_part(self) -> _Geometry:
        settings = self.settings
        processes: list[ServerProcess | EchoProcess] = []
        try:
            single = _started(processes, FreeForwardServer(settings.geometry, flags=SERVER_FLAGS))
            info, answers = self.seed(single.target, "jpeg")
            echo = _started(processes, EchoProcess(self.features_file("geometry", answers)))
            sides = {"free_forward": (single.target, _pid(single)), "echo": (echo.target, echo.pid)}
            workers_flags = [*SERVER_FLAGS, "--workers", str(settings.workers)]
            multi = _started(processes, FreeForwardServer(settings.geometry, flags=workers_flags))
            serving = _serving_processes(multi, settings.workers)
            if len(serving) >= settings.workers:
                sides["workers"] = (multi.target, _pid(multi))
            else:
                multi.stop()  # one process like the first: measuring it again says nothing about workers
            fill = {
                "free_forward": _cache_fill_images(answers[0].ByteSize(), 1),
                "workers": _cache_fill_images(answers[0].ByteSize(), max(1, len(serving))),
            }
            runs, request_bytes, spread, stages = self.measure_sides(sides, info, answers, serving, fill)
        finally:
            self.stop(processes)
        return _Geometry(info, answers[0].ByteSize(), request_bytes, runs, len(serving), spread, stages, fill)

    def seed(
        self, target: str, image_format: ImageFormat
    ) -> tuple[extractor_pb2.BackboneInfo, list[feature_pb2.FeatureTensor]]:
        """The server's BackboneInfo and its answers to a few fresh images (what its echo will send back)."""
        info = _describe(target)
        return info, _capture(target, self.images(_SEED_IMAGES, _input_size(info), image_format), info.num_blocks)

    def features_file(self, name: str, answers: Sequence[feature_pb2.FeatureTensor]) -> Path:
        path = self.scratch / f"{name}.features"
        write_features(path, answers)
        return path

    def measure_sides(
        self,
        sides: Mapping[str, tuple[str, int]],
        info: extractor_pb2.BackboneInfo,
        answers: Sequence[feature_pb2.FeatureTensor],
        workers: Sequence[int],
        fill: Mapping[str, int],
    ) -> tuple[dict[str, list[LoadRun]], float, list[int], list[dict[str, Any]]]:
        """Warm every side up, then `reps` passes of fresh JPEGs on each, the order rotating, and after each round
        the stages alone (paired with that round's passes: a shared machine's speed drifts between rounds).
        Returns (runs per side, mean request bytes, connections per worker, stages per round)."""
        size, k, count = _input_size(info), int(info.num_blocks), self.settings.images
        stage_images = self.images(self.settings.stage_images, size, "jpeg")
        stages = []
        spread: list[int] = []
        for name, (target, pid) in sides.items():
            spread = (
                self.warm_up(target, pid, size, "jpeg", k, workers if name == "workers" else (), fill.get(name, 0))
                or spread
            )
        runs: dict[str, list[LoadRun]] = {name: [] for name in sides}
        request_bytes = []
        for rep in range(self.settings.reps):
            for name in _rotated(list(sides), rep):
                files = self.request_files(count, size, "jpeg", k)
                request_bytes.append(sum(f.stat().st_size for f in files) / (count * len(files)))
                runs[name].append(self.measure(*sides[name], files))
            stages.append(measure_stages(stage_images, info, answers, reps=self.settings.stage_reps))
        return runs, sum(request_bytes) / len(request_bytes), spread, stages

    # ---- the tiny model, real forward: cache misses and hits against the echo ----------------------------------

    def tiny_part(self) -> _Tiny:
        settings = self.settings
        processes: list[ServerProcess | EchoProcess] = []
        try:
            server = _started(processes, ServerProcess(settings.tiny, flags=SERVER_FLAGS))
            info, answers = self.seed(server.target, "png")
            echo = _started(processes, EchoProcess(self.features_file("tiny", answers)))
            size, k, pid = _input_size(info), int(info.num_blocks), _pid(server)
            self.warm_up(server.target, pid, size, "png", k)
            self.warm_up(echo.target, echo.pid, size, "png", k)
            runs: dict[str, list[LoadRun]] = {"miss": [], "hit": [], "echo": []}
            for rep in range(settings.reps):
                for side in _rotated(["server", "echo"], rep):
                    files = self.request_files(settings.tiny_images, size, "png", k)
                    if side == "echo":
                        runs["echo"].append(self.measure(echo.target, echo.pid, files))
                        continue
                    runs["miss"].append(self.clients.run(server.target, files, window=settings.window, server_pid=pid))
                    runs["hit"].append(self.measure(server.target, pid, files))
                    _check_cache(runs["miss"][-1], runs["hit"][-1])
        finally:
            self.stop(processes)
        return _Tiny(info, answers[0].ByteSize(), runs)


def _cache_fill_images(answer_bytes: int, processes: int) -> int:
    """Fresh images that fill `processes` extractors' feature caches (the default --cache-max-bytes each), so that
    measured passes see a long-running server, where every fresh image evicts one; 0 where that would take more
    than _MAX_FILL_IMAGES (the tiny model's answers are a few hundred bytes: its cache is never full in a run)."""
    per_process = math.ceil(ExtractorConfig().cache_max_bytes / max(1, answer_bytes) * _FILL_MARGIN)
    images = per_process * processes
    return images if images <= _MAX_FILL_IMAGES else 0


def _input_size(info: extractor_pb2.BackboneInfo) -> int:
    return int(info.data_config.input_size[-1])


def _rotated(names: list[str], rep: int) -> list[str]:
    shift = rep % len(names)
    return names[shift:] + names[:shift]


def _check_cache(miss: LoadRun, hit: LoadRun) -> None:
    if miss.cache_hits or hit.cache_hits != hit.images:
        raise BenchError(
            f"expected no cache hit on fresh images and {hit.images} on the second pass; got {miss.cache_hits} and "
            f"{hit.cache_hits}"
        )


@contextlib.contextmanager
def _channel(target: str) -> Iterator[extractor_pb2_grpc.ExtractorStub]:
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
    try:
        yield extractor_pb2_grpc.ExtractorStub(channel)
    finally:
        channel.close()


def _describe(target: str) -> extractor_pb2.BackboneInfo:
    with _channel(target) as stub:
        return stub.Describe(extractor_pb2.DescribeRequest(), timeout=60)


def _capture(target: str, images: Sequence[bytes], k: int) -> list[feature_pb2.FeatureTensor]:
    """The server's answers (MIST at `k`, the default codec) to `images`: what its echo sends back."""
    requests = [
        extractor_pb2.ExtractRequest(item_id=str(i), image=image, mode=feature_pb2.GATHER_MODE_MIST, ks=[k])
        for i, image in enumerate(images)
    ]
    with _channel(target) as stub:
        answers = list(stub.Extract(iter(requests), timeout=300))
    failed = [a.error.reason for a in answers if a.HasField("error")]
    if failed or len(answers) != len(images):
        raise BenchError(f"the server did not answer the seed images: {len(answers)} answers, errors {failed}")
    return [answer.features[0] for answer in answers]


def _serving_processes(server: ServerProcess, workers: int) -> list[int]:
    """Processes of the server's tree listening on its port, once `workers` of them do (or it is clear they won't)."""
    root, port = _pid(server), _port(server.target)
    started = time.monotonic()
    while True:
        serving = listening_processes(root, port)
        elapsed = time.monotonic() - started
        if len(serving) >= workers or elapsed > _WORKERS_WAIT_S:
            return serving
        if len(process_tree(root)) == 1 and elapsed > _NO_WORKERS_AFTER_S:
            return serving
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------- summary


def _figures(runs: Sequence[LoadRun]) -> dict[str, Any]:
    return {
        "images_per_s": summarize([r.images_per_s for r in runs]),
        "cpu_ms_per_image": summarize([r.cpu_ms_per_image for r in runs]),
        "voluntary_switches_per_image": summarize([r.voluntary_switches_per_image for r in runs]),
        "answer_bytes_per_image": runs[0].answer_bytes / runs[0].images,
        "images_per_pass": runs[0].images,
    }


def _ratio(numerators: Sequence[LoadRun], denominators: Sequence[LoadRun]) -> dict[str, float | int]:
    return summarize([n.images_per_s / d.images_per_s for n, d in zip(numerators, denominators, strict=True)])


def _target(name: str, target: str, measured: str, passed: bool | None) -> dict[str, Any]:
    return {"name": name, "target": target, "measured": measured, "passed": passed}


def _stage_summary(geometry: _Geometry) -> dict[str, Any]:
    """The stages (median per stage over the rounds) and orchestration = measured - (stages + echo), per round."""
    rounds = geometry.stages
    stages_ms = {
        name: statistics.median(values) if None not in (values := [r["stages_ms"][name] for r in rounds]) else None
        for name in rounds[0]["stages_ms"]
    }
    sums = [
        stage_sum_ms(r["stages_ms"], echo.cpu_ms_per_image)
        for r, echo in zip(rounds, geometry.runs["echo"], strict=True)
    ]
    orchestration = [
        free.cpu_ms_per_image - total for free, total in zip(geometry.runs["free_forward"], sums, strict=True)
    ]
    return {
        "stages_ms": stages_ms,
        "stage_apis": rounds[-1]["apis"],
        "missing_apis": rounds[-1]["missing"],
        "legacy_stages_ms": {
            name: statistics.median(r["legacy_ms"][name] for r in rounds) for name in rounds[0]["legacy_ms"]
        },
        "stage_sum_ms": statistics.median(sums),
        "orchestration_ms": statistics.median(orchestration),
        "orchestration_spread": summarize(orchestration),
    }


def _summary(settings: ServingSettings, geometry: _Geometry, tiny: _Tiny) -> dict[str, Any]:
    free, echo = _figures(geometry.runs["free_forward"]), _figures(geometry.runs["echo"])
    measured = free["cpu_ms_per_image"]["median"]
    stages = _stage_summary(geometry)
    total, orchestration = stages["stage_sum_ms"], stages["orchestration_ms"]
    miss_vs_echo = _ratio(tiny.runs["miss"], tiny.runs["echo"])
    hit_vs_echo = _ratio(tiny.runs["hit"], tiny.runs["echo"])
    workers = _workers_summary(settings, geometry)
    label = settings.geometry.display
    scaling = workers["scaling"]
    targets = [
        _target(f"server CPU per image, free forward, {label}", f"<= {TARGET_CPU_MS} ms", f"{measured:.2f} ms",
                measured <= TARGET_CPU_MS),
        _target(f"server CPU per image minus its isolated stages + echo ({total:.2f} ms), {label}",
                f"<= {TARGET_OVER_STAGES_MS} ms", f"{orchestration:+.2f} ms", orchestration <= TARGET_OVER_STAGES_MS),
        _target(f"cache misses vs echo images/s, {settings.tiny.display}", f">= {TARGET_MISS_VS_ECHO}x",
                f"{miss_vs_echo['median']:.2f}x", miss_vs_echo["median"] >= TARGET_MISS_VS_ECHO),
        _target(f"cache hits vs echo images/s, {settings.tiny.display}", f">= {TARGET_HIT_VS_ECHO}x",
                f"{hit_vs_echo['median']:.2f}x", hit_vs_echo["median"] >= TARGET_HIT_VS_ECHO),
        _target(f"--workers {settings.workers} vs 1 process images/s, free forward, {label}",
                f">= {TARGET_WORKERS_SCALING}x",
                f"{scaling['median']:.2f}x" if scaling else f"not measured: {workers['note']}",
                scaling["median"] >= TARGET_WORKERS_SCALING if scaling else None),
    ]  # fmt: skip
    return {
        "backbone": label,
        "tiny_backbone": settings.tiny.display,
        "free_forward": free,
        "echo": echo,
        "request_bytes_per_image": geometry.request_bytes,
        "feature_bytes_per_image": geometry.answer_bytes,
        "cache_fill_images": geometry.cache_fill_images,
        **stages,
        "echo_cpu_ms_per_message": echo["cpu_ms_per_image"]["median"],
        "measured_cpu_ms_per_image": measured,
        "tiny": {
            "miss": _figures(tiny.runs["miss"]),
            "hit": _figures(tiny.runs["hit"]),
            "echo": _figures(tiny.runs["echo"]),
            "miss_vs_echo": miss_vs_echo,
            "hit_vs_echo": hit_vs_echo,
            "feature_bytes_per_image": tiny.answer_bytes,
        },
        "workers": workers,
        "clients": settings.clients,
        "window": settings.window,
        "reps": settings.reps,
        "cpus": available_cpus(),
        "targets": targets,
        "method": METHOD_TEXT,
    }


def _workers_summary(settings: ServingSettings, geometry: _Geometry) -> dict[str, Any]:
    runs = geometry.runs.get("workers")
    found = geometry.serving_processes
    if not runs:
        return {
            "requested": settings.workers,
            "serving_processes": found,
            "scaling": None,
            "note": f"--workers {settings.workers} gave {found} serving process(es) in this tree",
        }
    last = runs[-1]
    total = sum(last.server_cpu_s.values()) or 1.0
    return {
        "requested": settings.workers,
        "serving_processes": found,
        "scaling": _ratio(runs, geometry.runs["free_forward"]),
        "figures": _figures(runs),
        "cpu_share_by_process": sorted((round(s / total, 3) for s in last.server_cpu_s.values()), reverse=True),
        "connections_by_worker": geometry.connections_by_worker,
        "note": "",
    }


# ---------------------------------------------------------------------------------------------- report


def _number(value: float) -> str:
    """Three significant digits without an exponent: 5,460 / 2.55 / 0.117."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 0.001 else f"{value:.1e}"


def _spread(value: Mapping[str, float]) -> str:
    return f"{_number(value['median'])} ({_number(value['min'])}..{_number(value['max'])})"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(section: Mapping[str, Any]) -> str:
    free, echo, tiny, workers = section["free_forward"], section["echo"], section["tiny"], section["workers"]
    lines = [
        f"{section['clients']} client processes x window {section['window']}, {section['reps']} repetitions, "
        f"{section['cpus']} usable CPUs. {section['backbone']}: {section['request_bytes_per_image'] / 1024:.1f} KiB "
        f"JPEG in, {section['feature_bytes_per_image'] / 1024:.1f} KiB FeatureTensor out.\n",
        "| server | images/s | server CPU ms / image | voluntary switches / image |",
        "|---|---:|---:|---:|",
    ]
    rows = [(f"extractor, free forward ({section['backbone']})", free), ("bare gRPC echo, same answers", echo)]
    if workers.get("figures"):
        rows.append((f"extractor, free forward, --workers {workers['requested']}", workers["figures"]))
    rows += [
        (f"extractor, {section['tiny_backbone']}, cache misses", tiny["miss"]),
        (f"extractor, {section['tiny_backbone']}, cache hits", tiny["hit"]),
        ("bare gRPC echo, tiny answers", tiny["echo"]),
    ]
    for name, figures in rows:
        lines.append(
            f"| {name} | {_spread(figures['images_per_s'])} | {_spread(figures['cpu_ms_per_image'])} | "
            f"{_spread(figures['voluntary_switches_per_image'])} |"
        )
    lines += ["", "| stage (alone, one thread) | ms / image | API |", "|---|---:|---|"]
    for name, value in section["stages_ms"].items():
        lines.append(f"| {name} | {_ms(value)} | {section['stage_apis'].get(name, '')} |")
    lines += [
        f"| echo's CPU per message (gRPC) | {_ms(section['echo_cpu_ms_per_message'])} | bench.echo_server |",
        f"| **sum** | **{_ms(section['stage_sum_ms'])}** | |",
        f"| measured, free forward | {_ms(section['measured_cpu_ms_per_image'])} | |",
        f"| orchestration = measured - sum, per round | {_spread(section['orchestration_spread'])} | |",
        "",
        f"Tiny model vs echo: misses {_spread(tiny['miss_vs_echo'])}x, hits {_spread(tiny['hit_vs_echo'])}x. "
        + (
            f"--workers {workers['requested']} vs 1: {_spread(workers['scaling'])}x, CPU split "
            f"{workers['cpu_share_by_process']}, connections per worker {workers['connections_by_worker']}."
            if workers.get("scaling")
            else f"--workers: not measured ({workers['note']})."
        ),
    ]
    if section["missing_apis"]:
        lines.append(f"Missing in this tree (older stages used instead): {', '.join(section['missing_apis'])}.")
    legacy = section["legacy_stages_ms"]
    lines.append(
        f"Older path for comparison: decode to float32 {_ms(legacy['decode_float32'])} ms, FeatureCodec.encode "
        f"(numpy quantize + compress) {_ms(legacy['encode_float32'])} ms per image."
    )
    return "\n".join(lines) + f"\n\n*Method.* {section['method']}"
