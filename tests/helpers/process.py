"""One way to run a mist server as a subprocess in tests: `python -m services.<x>.server` on 127.0.0.1 port 0 with
the metrics port 0, MIST_* and GRPC_TRACE variables scrubbed from the environment (a server refuses unknown MIST_*
variables), stderr collected line by line on a thread (an undrained pipe would block the server once full), and
the ports read from the first log line, which every server makes its "listening on" line.

    server = ServiceProcess("services.tuner.server", "--extractor", target, ...)
    target, metrics_port = server.wait_listening()
    ... server.log(); server.terminate() (SIGTERM, drains) or server.kill() (SIGKILL) -- always one, by PID
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0  # torch + grpc imports on a loaded 2-core machine
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(metrics on 127\.0\.0\.1:(\d+)\)$")
_SCRUBBED = ("MIST_", "GRPC_TRACE", "GRPC_VERBOSITY")


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without MIST_* / GRPC_TRACE / GRPC_VERBOSITY, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED)}, **(extra or {})}


class ServiceProcess:
    """A server module started at construction; `wait_listening()` before use, `kill()` or `terminate()` after."""

    def __init__(self, module: str, *flags: str, env: Mapping[str, str] | None = None) -> None:
        self.module = module
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", *flags],
            cwd=ROOT, env=child_environment(env), stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.lines: list[str] = []
        self.port = self.metrics_port = 0
        self._first = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"{module}-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self._first.set()
        self._first.set()

    def wait_listening(self, timeout_s: float = START_TIMEOUT_S) -> tuple[str, int]:
        """(gRPC target, metrics port) from the first log line; AssertionError with the log when it did not start."""
        if not self._first.wait(timeout_s) or not self.lines:
            raise AssertionError(f"{self.module} printed nothing within {timeout_s:g}s (exit {self.proc.poll()})")
        match = _LISTENING.search(self.lines[0])
        if match is None:  # a start-up error: the server exits; its whole message is in the log once it has
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self._reader.join(5)
            raise AssertionError(f"{self.module} did not start (exit {self.proc.poll()}):\n{self.log()[-3000:]}")
        self.port, self.metrics_port = int(match.group(1)), int(match.group(2))
        return self.target, self.metrics_port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return "\n".join(self.lines)

    def terminate(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (the server drains), then its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL (what a crash or an OOM kill looks like) if it still runs, and reap it. Safe to call twice."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait(10)

    stop = kill

    def wait(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(5)
        return code

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


class LineWatcher:
    """The lines of a child's text stream (stdout or stderr), read on a thread as they come, so a test can wait for
    one and act at that point of the run; without a reader an undrained pipe would block the child once full."""

    def __init__(self, stream: IO[str], name: str = "lines") -> None:
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, args=(stream,), name=name, daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def wait_for(self, text: str, timeout_s: float = 120.0) -> str:
        """The first line containing `text`; AssertionError with every line so far if the stream ends without one
        or `timeout_s` passes."""

        def first() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self._changed:
            self._changed.wait_for(lambda: first() is not None or self.ended, timeout_s)
            found = first()
        if found is None:
            raise AssertionError(
                f"no line with {text!r} ({'stream ended' if self.ended else 'timed out'}):\n" + self.text()
            )
        return found

    def join(self, timeout_s: float = 10.0) -> list[str]:
        """Every line, once the stream has ended (the child closed it or exited)."""
        self._reader.join(timeout_s)
        return list(self.lines)

    def text(self) -> str:
        return "\n".join(self.lines)
