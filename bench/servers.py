"""The extractor as the benchmarks run it: `python -m services.extractor.server` in its own process (optionally
inside a network namespace), as deployed; or, for the smoke profile only, the same server in this process, which
starts in a second instead of several (its timings are meaningless, which the smoke profile's numbers are anyway).

    with extractor_server(VIT_B16, "full", flags=["--cache-max-bytes", "0"]) as server:
        run_streams(server.target, ...); server.metrics()["mist_extractor_batch_size_images_count"]
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.common import ROOT, BackboneSpec, BenchError, Profile, child_env, stop_process

# "mist-extractor listening on HOST:PORT (metrics on HOST:PORT)" or "(metrics off)": the server's first log line.
_LISTENING = re.compile(r"listening on (\S+):(\d+) \(metrics (?:on (\S+):(\d+)|off)\)")
_STDERR_LINES_KEPT = 200  # enough to explain a failed start; a long run logs little after that


def _server_flags(backbone: BackboneSpec, listen: str, metrics_listen: str, flags: Sequence[str]) -> list[str]:
    return [
        "--listen",
        listen,
        "--metrics-listen",
        metrics_listen,
        "--backbone",
        backbone.name,
        "--model-kwargs",
        json.dumps(dict(backbone.model_kwargs)),
        *flags,
    ]


class ServerProcess:
    """`python -m services.extractor.server` for one backbone, started by `start()`, ended by `stop()` (by PID).

    `prefix` runs it through another command, e.g. ("ip", "netns", "exec", NS): `ip netns exec` replaces itself
    with the server, so the PID we hold is the server's own.
    """

    def __init__(
        self,
        backbone: BackboneSpec,
        *,
        listen: str = "127.0.0.1:0",
        metrics: bool = True,
        flags: Sequence[str] = (),
        prefix: Sequence[str] = (),
    ) -> None:
        host = listen.rpartition(":")[0]
        self.command = [
            *prefix,
            sys.executable,
            "-m",
            "services.extractor.server",
            *_server_flags(backbone, listen, f"{host}:0" if metrics else "off", flags),
        ]
        self.target = ""  # host:port once started
        self.metrics_url = ""  # http://host:port/metrics once started (empty with metrics off)
        self.lines: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self, timeout_s: float = 180.0) -> ServerProcess:
        """Start and wait for the "listening on" line; BenchError (with the server's last words) otherwise."""
        self._proc = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name="bench-server-log", daemon=True)
        self._reader.start()
        try:
            match = self._wait_listening(timeout_s)
        except BaseException:  # Ctrl-C while it loads: no orphan left behind
            self.stop()
            raise
        if match is None:
            self.stop()
            tail = "\n".join(self.lines[-15:])
            raise BenchError(f"the extractor did not start within {timeout_s:g}s: {' '.join(self.command)}\n{tail}")
        self.target = f"{match.group(1)}:{match.group(2)}"
        if match.group(3):
            self.metrics_url = f"http://{match.group(3)}:{match.group(4)}/metrics"
        return self

    def _wait_listening(self, timeout_s: float) -> re.Match[str] | None:
        """The "listening on" line, or None when the server exits or the time is up."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = next((m for line in list(self.lines) if (m := _LISTENING.search(line))), None)
            if match is not None or self._proc.poll() is not None:
                return match
            time.sleep(0.05)
        return None

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self.lines.append(line.rstrip("\n"))
            del self.lines[:-_STDERR_LINES_KEPT]

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (the server drains), SIGKILL after `grace_s`, then reap. Safe to call twice."""
        proc = self._proc
        if proc is None:
            return
        stop_process(proc, grace_s)
        if self._reader is not None:
            self._reader.join(5)

    def metrics(self) -> dict[str, float]:
        """This server's Prometheus samples, summed over labels: {"mist_extractor_batch_size_images_sum": ...}."""
        if not self.metrics_url:
            raise BenchError("this server was started with metrics off")
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:  # noqa: S310 (our own loopback URL)
            return parse_prometheus_text(response.read().decode())

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class InProcessServer:
    """The same server (services.extractor.server.build + the shared server factory) on an event loop thread here."""

    def __init__(self, backbone: BackboneSpec, *, metrics: bool = True, flags: Sequence[str] = ()) -> None:
        self.argv = _server_flags(backbone, "127.0.0.1:0", "off", flags)
        self.target = ""
        self._metrics = metrics
        self._registry: Any = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-server", daemon=True)
        self._stoppers: list[Callable[[], Any]] = []

    def start(self, timeout_s: float = 60.0) -> InProcessServer:
        from services.common.config import parse_config
        from services.extractor.config import ExtractorConfig

        config = parse_config(ExtractorConfig, self.argv, {})
        self._thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(config), self._loop).result(timeout_s)
        self.target = f"127.0.0.1:{port}"
        return self

    async def _start(self, config: Any) -> int:
        from services.common.serving.server import GrpcMetrics, create_server, new_metrics_registry
        from services.extractor.server import build

        self._registry = new_metrics_registry()
        setup = await build(config, self._registry)
        if setup.on_shutdown is not None:
            self._stoppers.append(setup.on_shutdown)
        server, port, _ = await create_server(
            config, setup.add_services, metrics=GrpcMetrics(self._registry, "mist_extractor")
        )
        self._stoppers.insert(0, lambda: server.stop(0))  # the gRPC server first, then the engine it feeds
        return port

    def stop(self, timeout_s: float = 30.0) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)
        self._loop.close()

    async def _stop(self) -> None:
        for stopper in self._stoppers:
            await stopper()

    def metrics(self) -> dict[str, float]:
        if not self._metrics or self._registry is None:
            raise BenchError("this server was started with metrics off")
        from prometheus_client import generate_latest

        return parse_prometheus_text(generate_latest(self._registry).decode())

    def __enter__(self) -> InProcessServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def extractor_server(
    backbone: BackboneSpec, profile: Profile, *, metrics: bool = True, flags: Sequence[str] = ()
) -> ServerProcess | InProcessServer:
    """An extractor on 127.0.0.1 (not started): its own process, except under the smoke profile."""
    if profile == "smoke":
        return InProcessServer(backbone, metrics=metrics, flags=flags)
    return ServerProcess(backbone, metrics=metrics, flags=flags)


def parse_prometheus_text(text: str) -> dict[str, float]:
    """Sample name -> value summed over every label set (enough for counters and histogram sums / counts)."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_and_labels, _, value = line.rpartition(" ")
        name = name_and_labels.split("{", 1)[0]
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return totals


def mean_batch_size(before: Mapping[str, float], after: Mapping[str, float]) -> float | None:
    """Images per forward pass between two scrapes of the extractor's batch-size histogram."""
    name = "mist_extractor_batch_size_images"
    batches = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    if batches <= 0:
        return None
    return (after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)) / batches
