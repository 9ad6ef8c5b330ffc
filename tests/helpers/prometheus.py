"""A real Prometheus server for tests (Debian's `prometheus` package; installed as root when missing), started on
127.0.0.1 at a free port with a temporary TSDB, queried through its HTTP API, and promtool.

    with PrometheusServer.start(config, tmp_path) as prom:      # raises PrometheusUnavailable saying why
        prom.wait_for("up == 1", lambda s: len(s) == 2)
        scrapes = prom.wait_scraped_after(time.time(), ["api", "db"])   # job -> its latest scrape time
        samples = prom.query('sum by (mode) (rate(x_total[30s]))', at=time.time())   # [Sample(labels, value)]
        prom.rules(), prom.alert_states()                               # /api/v1/rules
    run_promtool("test", "rules", "deploy/prometheus/mist-rules.test.yml")
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

Tool = Literal["prometheus", "promtool"]
T = TypeVar("T")
_INSTALL_TIMEOUT_S = 600
_START_TIMEOUT_S = 30
_STOP_TIMEOUT_S = 10
_START_ATTEMPTS = 3  # a free port can be taken between probing it and Prometheus binding it


class PrometheusUnavailable(RuntimeError):
    """Prometheus cannot be installed or started here; the message says why (tests skip with it)."""


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector (or a scalar, with no labels)."""

    labels: Mapping[str, str]  # without __name__ for computed series
    value: float  # NaN and ±Inf stay floats

    @property
    def finite(self) -> bool:
        return math.isfinite(self.value)


def find_tool(name: Tool) -> str | None:
    return shutil.which(name)


def ensure_installed() -> None:
    """prometheus and promtool on PATH, installing Debian's `prometheus` package first when we are root."""
    if find_tool("prometheus") and find_tool("promtool"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise PrometheusUnavailable(
            "prometheus/promtool not found and cannot apt-get install them (not root or no "
            "apt); install Debian's `prometheus` package or run `make system-deps`"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S)
        if done.returncode != 0:
            raise PrometheusUnavailable(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    # Where an init system runs, the package starts a server of its own on :9090; tests start private ones.
    if shutil.which("systemctl"):
        subprocess.run(["systemctl", "stop", "prometheus"], capture_output=True, timeout=60)
    if not (find_tool("prometheus") and find_tool("promtool")):
        raise PrometheusUnavailable("installed the prometheus package but found no prometheus/promtool on PATH")


def run_promtool(*args: str, cwd: Path | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """`promtool ARGS` (ensure_installed() first); the completed process, whatever its exit code."""
    ensure_installed()
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout_s)


def eventually(probe: Callable[[], T], predicate: Callable[[T], bool], timeout_s: float = 15.0) -> T:
    """probe() until predicate(result) holds; after `timeout_s`, the last result anyway (the test's Assert decides)."""
    deadline = time.monotonic() + timeout_s
    while not predicate(result := probe()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return result


def _up(jobs: Sequence[str]) -> str:
    """The `up` series of these jobs (plain names such as "mist-extractor": no regex characters)."""
    if not all(re.fullmatch(r"[\w.-]+", job) for job in jobs):
        raise ValueError(f"job names must be plain names, got {list(jobs)}")
    return f'up{{job=~"{"|".join(jobs)}"}}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusServer:
    """One running server; use PrometheusServer.start() as a context manager (or call stop())."""

    def __init__(self, proc: subprocess.Popen, port: int, root: Path) -> None:
        self.proc = proc
        self.port = port
        self.root = root  # holds prometheus.yml, data/ and prometheus.log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, config: Mapping[str, Any], root: Path) -> PrometheusServer:
        """Write `config` (a prometheus.yml as a dict; relative rule_files resolve against `root`) and serve it."""
        ensure_installed()
        root.mkdir(parents=True, exist_ok=True)
        (root / "prometheus.yml").write_text(yaml.safe_dump(dict(config), sort_keys=False))
        failure = ""
        for _ in range(_START_ATTEMPTS):
            server = cls._spawn(root, free_port())
            try:
                server._wait_ready()
                return server
            except PrometheusUnavailable as error:
                failure = str(error)
                server.stop()
        raise PrometheusUnavailable(failure)

    @classmethod
    def _spawn(cls, root: Path, port: int) -> PrometheusServer:
        log = (root / "prometheus.log").open("w")
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
        log.close()  # the child holds its own descriptor
        return cls(proc, port, root)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusUnavailable(f"prometheus exited with {self.proc.returncode}: {self.log()[-1500:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise PrometheusUnavailable(f"prometheus not ready within {_START_TIMEOUT_S}s: {self.log()[-1500:]}")

    def log(self) -> str:
        path = self.root / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def api(self, endpoint: str, **params: str) -> Any:
        """GET /api/v1/<endpoint>; its `data`, or AssertionError with Prometheus's error (a bad query, ...)."""
        url = f"{self.url}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            body = json.load(error)
        if body.get("status") != "success":
            raise AssertionError(f"{endpoint} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """An instant query, at Unix time `at` (default: now)."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise AssertionError(f"{expr!r} gave a {data['resultType']}, not an instant vector")
        return [Sample(item["metric"], float(item["value"][1])) for item in data["result"]]

    def wait_for(self, expr: str, predicate: Callable[[list[Sample]], bool], timeout_s: float = 20.0) -> list[Sample]:
        """Query `expr` until `predicate` holds for its result; AssertionError with the last result after timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            samples = self.query(expr)
            if predicate(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr!r} still {samples} after {timeout_s}s")
            time.sleep(0.1)

    def scrape_times(self, jobs: Sequence[str]) -> dict[str, float]:
        """Job -> the time of its latest scrape (Unix seconds), for those of `jobs` scraped so far."""
        return {s.labels["job"]: s.value for s in self.query(f"timestamp({_up(jobs)})")}

    def wait_scraped_after(self, moment: float, jobs: Sequence[str], timeout_s: float = 20.0) -> dict[str, float]:
        """scrape_times() once every job answered a scrape that started after `moment` (a scrape then sees every
        change made before it)."""
        self.wait_for(f"{_up(jobs)} == 1", lambda up: len(up) == len(jobs), timeout_s)
        scrapes = eventually(lambda: self.scrape_times(jobs), lambda found: min(found.values()) > moment, timeout_s)
        if min(scrapes.values()) <= moment:
            raise AssertionError(f"not every job of {list(jobs)} was scraped after {moment}: {scrapes}")
        return scrapes

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule with its health, lastError and (alerts) state, from /api/v1/rules."""
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def alert_states(self) -> dict[str, str]:
        """Alert name -> "inactive", "pending" or "firing"."""
        return {rule["name"]: rule["state"] for rule in self.rules() if rule["type"] == "alerting"}

    def stop(self) -> None:
        """SIGTERM (Prometheus flushes and exits), SIGKILL if it hangs; always reaps the process."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> PrometheusServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
