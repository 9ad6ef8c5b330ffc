"""Reliability and security checks of the real servers (issue 8): load, faults, hostile input, tokens and TLS.

This module holds what the test files share: run sizes (short in `make test`, larger under `-m stress`, scaled by
MIST_STRESS_SCALE), a figures reporter, process memory readings, latency percentiles and a /metrics scraper.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from services.common.config import ServerConfig
from services.common.serving.metrics import GrpcMetrics, metric_prefix, new_metrics_registry
from services.common.serving.server import ServiceSetup, create_server
from services.extractor.backbone import LoadedBackbone
from services.extractor.config import ExtractorConfig
from services.extractor.gather import gather
from services.extractor.preprocess import ImagePreprocessor

ScaleName = Literal["short", "stress"]
STRESS_SCALE_ENV = "MIST_STRESS_SCALE"  # multiplies every stress count and duration (0.1: smoke, 10: soak)
FIGURES_FILE_ENV = "MIST_FIGURES_FILE"  # when set, every test's figures are appended there as JSON lines
MiB = 1 << 20


def stress_factor() -> float:
    """MIST_STRESS_SCALE as a positive float (1.0 when unset); a bad value fails loudly, not silently as 1."""
    text = os.environ.get(STRESS_SCALE_ENV, "").strip()
    if not text:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{STRESS_SCALE_ENV} must be a positive number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{STRESS_SCALE_ENV} must be a positive number, got {text!r}")
    return value


@dataclass(frozen=True)
class Scale:
    """How big one run of a test is: the same test code runs `short` in `make test` and `stress` in `make stress`."""

    name: ScaleName  # "short": unmarked, seconds; "stress": @pytest.mark.stress, bounded soak
    factor: float = 1.0  # MIST_STRESS_SCALE, applied to stress sizes only

    @property
    def stress(self) -> bool:
        return self.name == "stress"

    def pick(self, short: int, stress: int, at_least: int = 1) -> int:
        """A count: `short`, or `stress` times the factor but no less than `at_least` (what the test needs)."""
        return short if not self.stress else max(at_least, round(stress * self.factor))

    def seconds(self, short: float, stress: float) -> float:
        """A duration: `short`, or `stress` times the factor."""
        return short if not self.stress else stress * self.factor


# ---------------------------------------------------------------------------------------------- figures


@dataclass
class Figures:
    """The numbers one test measured: printed as one line (seen with -s), kept for the session summary."""

    test: str  # the pytest node id
    values: dict[str, object] = field(default_factory=dict)

    def add(self, **values: object) -> None:
        self.values.update(values)

    def line(self) -> str:
        return f"[figures] {self.test}: " + ", ".join(f"{k}={_show(v)}" for k, v in self.values.items())

    def publish(self) -> None:
        """Print the line and append it to MIST_FIGURES_FILE when that is set."""
        if not self.values:
            return
        print("\n" + self.line(), flush=True)
        path = os.environ.get(FIGURES_FILE_ENV)
        if path:
            with Path(path).open("a", encoding="utf-8") as out:
                out.write(json.dumps({"test": self.test, **self.values}, default=str) + "\n")


def _show(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by the nearest-rank method; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


# ---------------------------------------------------------------------------------------------- references


def reference_gathers(
    backbone: LoadedBackbone, images: Sequence[bytes], ks: Sequence[int], batch_size: int = 64
) -> list[dict[int, np.ndarray]]:
    """What the extractor must answer for each image (MIST gathers at `ks`), computed here in batches.

    One torch thread meanwhile: on a shared 2-core machine several threads per process measured 25x slower
    (170 ms instead of 7 ms per image), and the servers under test need the cores.
    """
    preprocessor = ImagePreprocessor(backbone.data_config, resize=ExtractorConfig.resize)  # as the server does
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results: list[dict[int, np.ndarray]] = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([preprocessor.decode(image) for image in images[start : start + batch_size]])
            with backbone.autocast():
                out = gather(backbone.model, batch, "mist", ks)
            results += [{k: out[k][row].numpy() for k in ks} for row in range(len(batch))]
        return results
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- memory


def _status_kib(pid: int | str, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise LookupError(f"{key} not in /proc/{pid}/status")


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process now (VmRSS)."""
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Highest resident memory since start or since reset_peak_rss (VmHWM)."""
    return _status_kib(pid, "VmHWM") * 1024


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0, own process or root); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- metrics


def scrape(url: str, timeout_s: float = 10.0) -> str:
    """The text of a Prometheus endpoint (http://host:port/metrics)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0.0 when there are none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def label_values(text: str) -> set[str]:
    """Every label value of every sample in a scrape."""
    return {
        value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        for value in sample.labels.values()
    }


def lines_containing(lines: Iterable[str], needles: Iterable[str]) -> list[tuple[str, str]]:
    """(needle, line) for every line holding one of `needles` (empty needles are ignored)."""
    wanted = [needle for needle in needles if needle]
    return [(needle, line) for line in lines for needle in wanted if needle in line]


def wait_for(
    predicate: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.02, what: str = "condition"
) -> None:
    """Poll until `predicate()` is true; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s:g}s")
        time.sleep(interval_s)


# ---------------------------------------------------------------------------------------------- in-process servers


@contextlib.contextmanager
def serving(
    config: ServerConfig, build: Callable[..., Awaitable[ServiceSetup]], service_name: str
) -> Iterator[tuple[str, CollectorRegistry]]:
    """Any service's `build(config, registry)` behind the shared server factory, on an event loop thread here (as
    `serve()` runs it, minus signals); yields its 127.0.0.1 target and metrics registry; stops it all on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="reliability-server", daemon=True)
    thread.start()
    metrics = new_metrics_registry()

    async def start() -> tuple[object, ServiceSetup, int]:
        setup = await build(config, metrics)
        server, port, _ = await create_server(
            config,
            setup.add_services,
            token_validator=setup.token_validator,
            metrics=GrpcMetrics(metrics, metric_prefix(service_name)),
        )
        return server, setup, port

    async def stop(server, setup: ServiceSetup) -> None:
        await server.stop(0)
        if setup.on_shutdown is not None:
            await setup.on_shutdown()

    try:
        server, setup, port = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
        try:
            yield f"127.0.0.1:{port}", metrics
        finally:
            asyncio.run_coroutine_threadsafe(stop(server, setup), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
