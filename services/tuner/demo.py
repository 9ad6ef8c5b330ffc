"""`mist demo` (and `make demo`): the suite's main job on one machine, in a few minutes on 2 CPU cores.

Starts a registry (SQLite under the work folder), an extractor (a small timm ViT, randomly initialised) and a tuner
worker on 127.0.0.1 with free ports; writes the synthetic dataset; tunes a task with --k auto through the library;
promotes the version to `production`; predicts a few test images by alias, here and through the worker; prints the
test accuracy against chance and what one image costs on the wire against LST, LAST, Partial-1 and linear probing;
and stops everything it started (by PID, also on Ctrl-C). This process never imports timm: the servers do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from services.common.errors import UnavailableError
from services.tuner.options import DemoOptions

if TYPE_CHECKING:  # torch comes with them; the demo imports them when it tunes
    from services.tuner.reports import TransferSummary, TuneResult
    from services.tuner.segmentation import SegmentationTuneResult

# A ViT-Ti-shaped backbone shrunk to demo size: 32 px images cut into 4 px patches (64 patches + CLS = 65 tokens),
# 64 dims, 6 blocks. Small patches keep the random patch embedding close to lossless (48 -> 64 dims), which is what
# gives a random backbone's features any signal. Measured on the 8 synthetic classes (seed 0, 30 epochs, k auto):
# held-out accuracy 0.637 from 80 training images per class, 0.494 from 40, against 0.125 chance; 8 px patches
# of 64 px images gave 0.49-0.52 from 40. Extracting the 880 images takes seconds on 2 cores.
DEMO_BACKBONE = "vit_tiny_patch16_224"
DEMO_MODEL_KWARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4}
DEMO_TASK = "shapes"
DEMO_ALIAS = "production"
DEMO_IMAGE_SIZE = 64  # px of the written images; the extractor resizes them to the backbone's 32
DEMO_SPLIT = (80, 10, 20)  # train, val, test images per class: the whole demo runs in about a minute
PREDICTED_PER_CLASS = 1  # test images predicted by alias, per class
# Segmentation: pvt_v2_b0's layout with one block per stage, served at 256 px (an 8x8 grid of 256-dim tokens at the
# last stage), on 96 px pictures of discs, squares and bars (services/tuner/segmentation_data.py).
SEGMENTATION_BACKBONE = "pvt_v2_b0"
SEGMENTATION_MODEL_KWARGS: dict[str, object] = {"depths": [1, 1, 1, 1]}
SEGMENTATION_INPUT_SIZE = 256
SEGMENTATION_IMAGE_SIZE = 96
SEGMENTATION_SPLIT = (240, 60)  # training, validation images
SEGMENTATION_TASK = "scenes"
SEGMENTATION_PREDICTED = 4
# Per-pixel supervision on 240 pictures: measured 0.57-0.64 test mIoU after 40 epochs at 1e-2 on 64 training pictures
# with this backbone; the classifier's 1e-3 left it at the background after 30.
SEGMENTATION_LR = 1e-2
_LISTENING = re.compile(r"listening on (\S+):(\d+)")
_START_TIMEOUT_S = 120.0  # importing torch + timm on a loaded 2-core machine takes 5-20 s; leave room
_STOP_GRACE_S = 10.0


class ServerProcess:
    """One server started as `python -m MODULE ...`; its stderr goes to a log file; stopped by PID."""

    def __init__(self, name: str, module: str, args: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.address = ""
        self._lines: list[str] = []
        self._listening = threading.Event()
        env = {key: value for key, value in os.environ.items() if not key.startswith("MIST_")}  # flags say it all
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )  # Ctrl-C reaches us; we stop it in order
        self._reader = threading.Thread(target=self._drain, name=f"{name}-log", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        with self.log_path.open("w", encoding="utf-8") as log:
            for line in self.proc.stderr:  # type: ignore[union-attr]
                log.write(line)
                log.flush()
                self._lines.append(line.rstrip("\n"))
                match = _LISTENING.search(line)
                if match and not self.address:
                    self.address = f"{match.group(1)}:{match.group(2)}"
                    self._listening.set()
        self._listening.set()

    def wait_listening(self, timeout_s: float = _START_TIMEOUT_S) -> str:
        """HOST:PORT from its "listening on" line; UnavailableError (with its last log lines) if it died."""
        if not self._listening.wait(timeout_s) or not self.address:
            tail = " | ".join(self._lines[-3:]) or "no output"
            raise UnavailableError(f"{self.name} did not start (exit {self.proc.poll()}; log {self.log_path}): {tail}")
        return self.address

    def stop(self) -> None:
        """SIGTERM (the server drains), SIGKILL after the grace period; always reaped."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        self._reader.join(5)

    def kill(self) -> None:
        """SIGKILL now, without waiting (the last resort)."""
        if self.proc.poll() is None:
            self.proc.kill()


class _Say:
    """The demo's narrative on stdout."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._started = time.monotonic()

    def __call__(self, text: str = "") -> None:
        stamp = f"[{time.monotonic() - self._started:5.1f}s] " if text else ""
        self._stream.write(f"{stamp}{text}\n")
        self._stream.flush()

    def block(self, text: str) -> None:
        self._stream.write(text.rstrip("\n") + "\n")
        self._stream.flush()


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends the demo as Ctrl-C does: through the finally that stops the servers (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(options: DemoOptions, *, stream: TextIO | None = None) -> int:
    """Run the demo; returns 0. Every process it starts is stopped before it returns or raises."""
    say = _Say(stream or sys.stdout)
    workdir = Path(options.workdir).expanduser()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    started: list[ServerProcess] = []
    with _sigterm_interrupts():
        try:
            _run(options, workdir, started, say)
        finally:
            _stop_all(started)
            if started:
                say(f"stopped {', '.join(s.name for s in started)} (logs in {workdir / 'logs'})")
    return 0


def _stop_all(servers: list[ServerProcess]) -> None:
    """Stop in reverse start order; a second Ctrl-C while waiting kills the rest at once instead of leaking them."""
    try:
        for server in reversed(servers):
            server.stop()
    except BaseException:
        for server in servers:
            server.kill()
        raise


def _run(options: DemoOptions, workdir: Path, started: list[ServerProcess], say: _Say) -> None:
    if options.task == "segmentation":
        _run_segmentation(options, workdir, started, say)
        return
    registry, extractor = _start_servers(workdir, started, say)
    worker = _start_worker(workdir, extractor, registry, started) if options.worker else None
    data = _write_dataset(workdir, options.seed, say)
    result = _tune(data, extractor, registry, options, say)
    _predict(data, extractor, registry, worker, workdir, say)
    _report(result, say)


def _start_servers(
    workdir: Path,
    started: list[ServerProcess],
    say: _Say,
    *,
    backbone: str = DEMO_BACKBONE,
    model_kwargs: dict[str, object] = DEMO_MODEL_KWARGS,
    extra: Sequence[str] = (),
) -> tuple[str, str]:
    database = workdir / "registry.db"
    for stale in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        stale.unlink(missing_ok=True)  # a fresh registry each run: the story starts at version 1
    say(f"starting mist-registry (SQLite {database}) and mist-extractor ({backbone} {model_kwargs} {' '.join(extra)})")
    started.append(ServerProcess("mist-registry", "services.registry.server", [
        "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--db", f"sqlite:///{database.resolve()}",
    ], workdir / "logs" / "registry.log"))  # fmt: skip
    started.append(ServerProcess("mist-extractor", "services.extractor.server", [
        "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--backbone", backbone,
        "--model-kwargs", json.dumps(model_kwargs), "--max-queue-delay-ms", "2", *extra,
    ], workdir / "logs" / "extractor.log"))  # fmt: skip
    registry, extractor = started[0].wait_listening(), started[1].wait_listening()
    say(f"mist-registry on {registry}, mist-extractor on {extractor}")
    say(
        f"NOTE: the extractor runs a RANDOMLY INITIALISED {backbone} (no weights are downloaded), so its features "
        "carry little meaning: expect results clearly above the trivial answer, not good ones. Pass real weights to "
        "mist-extractor --weights PATH for that."
    )
    return registry, extractor


def _start_worker(workdir: Path, extractor: str, registry: str, started: list[ServerProcess]) -> ServerProcess:
    worker = ServerProcess("mist-tuner", "services.tuner.server", [
        "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--extractor", extractor,
        "--registry", registry, "--torch-threads", "1",
    ], workdir / "logs" / "tuner.log")  # fmt: skip
    started.append(worker)
    return worker


def _write_dataset(workdir: Path, seed: int, say: _Say) -> Path:
    from services.tuner.synthetic import SplitSizes, generate_dataset

    root = workdir / f"data-seed{seed}"
    say(
        f"writing the synthetic dataset to {root} ({DEMO_SPLIT[0]}/{DEMO_SPLIT[1]}/{DEMO_SPLIT[2]} train/val/test "
        "images per class)"
    )
    summary = generate_dataset(root, sizes=SplitSizes(*DEMO_SPLIT), image_size=DEMO_IMAGE_SIZE, seed=seed)
    say(f"{len(summary.classes)} classes: {', '.join(summary.classes)}")
    return root


def _tune(data: Path, extractor: str, registry: str, options: DemoOptions, say: _Say) -> TuneResult:
    from services.tuner.config import Endpoints
    from services.tuner.progress import ProgressReporter
    from services.tuner.reports import ReporterObserver
    from services.tuner.tune import TuneOptions, tune_path, tuner_identity

    say(
        f"mist tune --task {DEMO_TASK} --data {data} --k auto --epochs {options.epochs} --alias {DEMO_ALIAS} "
        f"--seed {options.seed}  (progress on stderr)"
    )
    tune_options = TuneOptions(
        task=DEMO_TASK,
        epochs=options.epochs,
        seed=options.seed,
        alias=DEMO_ALIAS,
        description="mist demo: synthetic shapes, counts, orientations, colours",
        tuner=tuner_identity("cli"),
    )
    endpoints = Endpoints(extractor=extractor, registry=registry)
    with ProgressReporter("auto") as reporter, endpoints.extractor_client() as x, endpoints.registry_client() as r:
        result = tune_path(data, tune_options, x, r, ReporterObserver(reporter))
    say.block(result.summary())
    return result


def _sample_images(data: Path) -> list[Path]:
    images = []
    for folder in sorted(p for p in (data / "test").iterdir() if p.is_dir()):
        images.extend(sorted(folder.glob("*.png"))[:PREDICTED_PER_CLASS])
    return images


def _predict(data: Path, extractor: str, registry: str, worker: ServerProcess | None, workdir: Path, say: _Say) -> None:
    from services.tuner.config import Endpoints
    from services.tuner.predict import file_items, load_version, predict_images

    images = _sample_images(data)
    say(f"mist predict --task {DEMO_TASK} --alias {DEMO_ALIAS} <{len(images)} test images>")
    endpoints = Endpoints(extractor=extractor, registry=registry, cache_dir=str(workdir / "cache"))
    with endpoints.extractor_client() as x, endpoints.registry_client() as r:
        loaded = load_version(r, DEMO_TASK, alias=DEMO_ALIAS)
        predictions = list(predict_images(loaded, x, file_items(images), top_k=3))
    remote = _predict_through_worker(worker, images, say) if worker is not None else None
    rows = [("image", "true class", "predicted", "p", *(["worker says"] if remote else []))]
    for index, (path, prediction) in enumerate(zip(images, predictions, strict=True)):
        row = (path.name, path.parent.name, prediction.label, f"{prediction.probability:.2f}")
        rows.append(row + ((remote[index],) if remote else ()))
    say.block(_table(rows))
    right = sum(p.label == path.parent.name for path, p in zip(images, predictions, strict=True))
    say(
        f"{right} of {len(images)} right with version {loaded.version.number} (k={loaded.k}, {loaded.codec})"
        + (
            "; the worker, running the same code, agrees on every image"
            if remote and all(remote[i] == p.label for i, p in enumerate(predictions))
            else ""
        )
    )


def _predict_through_worker(worker: ServerProcess, images: list[Path], say: _Say) -> list[str]:
    import grpc

    from services.common.clients.channel import create_channel
    from services.common.pb import registry_pb2, tuner_pb2, tuner_pb2_grpc

    address = worker.wait_listening()
    say(f"the same images through the stateless tuner worker (mist-tuner on {address}, gRPC Predict)")

    def requests() -> Iterator[tuner_pb2.PredictRequest]:
        ref = registry_pb2.VersionRef(alias=DEMO_ALIAS)
        yield tuner_pb2.PredictRequest(spec=tuner_pb2.PredictSpec(task=DEMO_TASK, ref=ref, top_k=3))
        for path in images:
            yield tuner_pb2.PredictRequest(item=tuner_pb2.PredictItem(item_id=path.name, image=path.read_bytes()))

    with create_channel(address) as channel:
        try:
            responses = list(tuner_pb2_grpc.TunerStub(channel).Predict(requests(), timeout=120))
        except grpc.RpcError as error:
            raise UnavailableError(f"the tuner worker failed: {error.code().name}: {error.details()}") from None
    return [response.label or f"error: {response.error.reason}" for response in responses]


def _report(result: TuneResult, say: _Say) -> None:
    test, chance = result.test, 1 / result.num_classes
    if test is not None:
        say(
            f"held-out test accuracy {test.accuracy:.3f} on {test.count} images, chance {chance:.3f} "
            f"({test.accuracy / chance:.1f}x chance)"
        )
    transfer = result.transfer
    say(
        "what one image costs on the wire for this backbone (measured for MIST, float32 sizes from Describe for "
        "the rest):"
    )
    say.block(_table(transfer_rows(transfer)))


# ---------------------------------------------------------------------------------------------- segmentation


def _run_segmentation(options: DemoOptions, workdir: Path, started: list[ServerProcess], say: _Say) -> None:
    """`mist demo --task segmentation`: the same story on a pvt_v2 and the ADE20K-style synthetic layout."""
    from services.tuner.config import Endpoints
    from services.tuner.predict import load_version
    from services.tuner.progress import ProgressReporter
    from services.tuner.reports import ReporterObserver
    from services.tuner.segmentation import segment_files
    from services.tuner.segmentation_data import write_synthetic_segmentation
    from services.tuner.tune import TuneOptions, tune_path, tuner_identity

    registry, extractor = _start_servers(workdir, started, say, backbone=SEGMENTATION_BACKBONE,
                                         model_kwargs=SEGMENTATION_MODEL_KWARGS,
                                         extra=("--input-size", str(SEGMENTATION_INPUT_SIZE)))  # fmt: skip
    data = workdir / f"segmentation-seed{options.seed}"
    training, validation = SEGMENTATION_SPLIT
    say(f"writing the synthetic segmentation layout to {data} ({training} training / {validation} validation "
        f"images of {SEGMENTATION_IMAGE_SIZE} px, masks in annotations/)")  # fmt: skip
    write_synthetic_segmentation(data, per_split={"training": training, "validation": validation},
                                 size=SEGMENTATION_IMAGE_SIZE, seed=options.seed)  # fmt: skip
    say(f"mist tune --task {SEGMENTATION_TASK} --data {data} --epochs {options.epochs} --lr {SEGMENTATION_LR:g} "
        f"--alias {DEMO_ALIAS} --seed {options.seed}  (progress on stderr)")  # fmt: skip
    tune_options = TuneOptions(task=SEGMENTATION_TASK, epochs=options.epochs, seed=options.seed, alias=DEMO_ALIAS,
                               lr=SEGMENTATION_LR, description="mist demo: synthetic discs, squares and bars per pixel",
                               tuner=tuner_identity("cli"))  # fmt: skip
    endpoints = Endpoints(extractor=extractor, registry=registry, cache_dir=str(workdir / "cache"))
    with ProgressReporter("auto") as reporter, endpoints.extractor_client() as x, endpoints.registry_client() as r:
        result = tune_path(data, tune_options, x, r, ReporterObserver(reporter))
        say.block(result.summary())
        images = sorted((data / "images" / "validation").glob("*.png"))[:SEGMENTATION_PREDICTED]
        output = workdir / "segmentation-out"
        say(f"mist predict --task {SEGMENTATION_TASK} --alias {DEMO_ALIAS} --output-dir {output} --overlay "
            f"<{len(images)} validation images>")  # fmt: skip
        loaded = load_version(r, SEGMENTATION_TASK, alias=DEMO_ALIAS)
        rows = [("image", "label map", "classes (share of pixels)")]
        for answer in segment_files(loaded, x, images, output_dir=output, overlay=True):
            shares = ", ".join(f"{name} {share:.2f}" for name, share in answer.classes.items())
            rows.append((Path(answer.item_id).name, Path(answer.labels).name, shares))
    say.block(_table(rows))
    say(f"label maps and colour overlays are in {output}")
    _report_segmentation(result, say)  # type: ignore[arg-type]


def _report_segmentation(result: SegmentationTuneResult, say: _Say) -> None:
    test = result.test
    if test is not None:
        background = test.scores.iou[0] or 0.0
        say(f"held-out mIoU {test.scores.miou:.3f} and pixel accuracy {test.scores.pixel_accuracy:.3f} on "
            f"{test.images} images ({result.label_size}x{result.label_size} labels); background IoU {background:.3f}")  # fmt: skip
    received, baselines = result.bytes_per_image, result.baselines
    say("what one image costs on the wire for this backbone (measured for MIST, float32 sizes from Describe):")
    rows = [("method", "bytes/image", "vs MIST as received")]
    for name, size in (
        ("MIST aggregate as received", received),
        ("MIST aggregate uncompressed (float32)", baselines.get("mist_f32")),
        ("every stage's output (side network, LST-like)", baselines.get("stages")),
        ("last stage only (frozen encoder)", baselines.get("last_stage")),
    ):
        if size:
            rows.append((name, f"{size:,.0f}", f"{size / received:.2f}x"))
    say.block(_table(rows))


def transfer_rows(transfer: TransferSummary) -> list[tuple[str, ...]]:
    """The transfer table: method, bytes per image, and how that compares with what MIST received."""
    received, baselines = transfer.bytes_per_image, transfer.baselines
    methods = [
        (f"MIST as received ({transfer.codec}, k={transfer.k})", received),
        ("MIST uncompressed (float32)", baselines.get("mist_f32")),
        ("LST", baselines.get("lst")),
        ("LAST", baselines.get("last")),
        ("Partial-1", baselines.get("partial")),
        ("linear probing (CLS only)", baselines.get("cls")),
    ]
    rows = [("method", "bytes/image", "vs MIST as received")]
    for name, size in methods:
        if size:
            rows.append((name, f"{size:,.0f}", f"{size / received:.2f}x"))
    return rows


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.insert(1, "  " + "  ".join("-" * width for width in widths))
    return "\n".join(lines)
