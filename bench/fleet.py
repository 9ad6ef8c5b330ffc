"""Section 9: a fleet of devices following an alias, against a real registry process: how fast a promote, a
rollback and a staged rollout reach every device, what one watcher costs the registry, and what a SIGKILL of the
registry does to the fleet.

    python -m bench.run --only fleet --merge        # the full fleet: 4 client processes x 250 devices
    python -m bench.run --only fleet --quick        # 2 x 50 devices, ~10 s

Method. The registry runs as deployed (`python -m services.registry.server`, SQLite in a temporary directory) on a
fixed free loopback port, so that it can be killed and restarted on the same address. The simulated devices are
real gRPC clients: client processes (`python -m bench.fleet client`, only grpc and protobuf imported), each with a
few grpc.aio channels (each its own TCP connection: `grpc.use_local_subchannel_pool`, since gRPC Python otherwise
shares one connection per process and target) and one WatchAlias stream per device, well under the server's
--max-concurrent-streams (1000 per connection). A device watches its alias with its own name; on an event whose
`version` differs from what it runs it pulls that version (sha256 of the bytes checked against the header; it keeps
the version it ran before, so going back to it sends that copy's `have_sha256` and gets the header alone), records
the swap's time and then reports the version in use (ReportDevice, as an agent does). On a stream error it
reconnects with `since_revision` = the newest revision it got, after a capped exponential backoff with jitter (0.25 s
doubling to 4 s, each delay drawn uniformly from its upper half); the channels' own reconnect backoff is capped likewise
(gRPC's default grows to 120 s, which would measure gRPC's backoff, not the registry).

Times are time.monotonic() (one clock for every process of the machine): the parent takes t0 just before the
SetAlias call, the clients stamp each event and swap; latencies are differences of the two. Percentiles
interpolate over every device; a device that did not swap within the phase's timeout counts as never (and fails
the target). Registry memory is VmRSS from /proc/PID/status with no watcher (after the task, three versions and
the alias exist and each version was pulled once) and again with every device attached, each after a settle;
the difference over the device count is the cost of one watcher, its share of the connections included. The
devices start with version 1 on disk and reported, as a fleet does when the registry restarts or is redeployed, so
attaching costs no pull and no report: those bursts raise the heap's high-water mark, which is not a cost per
watcher (the RSS after the promote, when every device pulled and reported, is shown next to it).

The restart: SIGKILL by PID (no drain: every stream just breaks), the same command on the same port at once, and a
move (version 1 to 2) as soon as it listens, which a device gets live or, when it re-attaches later, on resume.
Re-attached: a device's first event on a stream opened after the kill; caught up: its swap to that move's version;
both from the kill. Then a promote to version 3, which every device must get.

Correctness is judged afterwards on every device's full record against AliasHistory: no event with a
revision lower than one the device already had, every swap to exactly the version the alias (and the rollout's
stable hash, services.registry.records.in_rollout) gave that device at that revision, and every move after a
device's first event received by it (moves made while it was away included: they come on resume).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import fleet_load
from bench.common import ROOT, BenchError, Profile, child_env, percentile, stop_process
from services.common.pb import registry_pb2

TASK = "fleet-bench"
ALIAS = "production"
TARGET_SWAP_S = 5.0  # the issue: 99 % of the devices run a promoted (or rolled back) version within 5 s
TARGET_SWAP_SHARE = 0.99
TARGET_WATCHER_BYTES = 50_000  # registry RSS per attached watcher
TARGET_REATTACH_S = 30.0  # after a SIGKILL and restart: 99 % re-attached and caught up within this
TARGET_REATTACH_SHARE = 0.99
ROLLOUT_PERCENT = 10
_BACKOFF_FIRST_S, _BACKOFF_CAP_S = 0.25, 4.0
_POLL_S = 0.1  # how often the parent asks the clients how far they are
_ASK_TIMEOUT_S = 60.0
_STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class FleetSettings:
    """Sizes of the fleet section."""

    processes: int  # client processes
    devices_per_process: int
    channels_per_process: int  # TCP connections per process; its devices' streams are spread over them
    settle_s: float  # before each RSS reading
    move_timeout_s: float  # a phase gives up waiting after this (the missing devices count as never)
    attach_timeout_s: float  # every device attached and running the first version
    report: bool = True  # devices call ReportDevice after each swap, as an agent would

    @property
    def devices(self) -> int:
        return self.processes * self.devices_per_process


SETTINGS: dict[Profile, FleetSettings] = {
    "full": FleetSettings(4, 250, 4, settle_s=3.0, move_timeout_s=60.0, attach_timeout_s=120.0),
    "quick": FleetSettings(2, 50, 2, settle_s=1.0, move_timeout_s=30.0, attach_timeout_s=60.0),
    "smoke": FleetSettings(2, 10, 1, settle_s=0.5, move_timeout_s=30.0, attach_timeout_s=60.0),
}


# ---------------------------------------------------------------------------------------------- the task


def task_definition() -> registry_pb2.Task:
    """A tiny task: i8-zstd MIST features of 17 tokens x 32 dims, 3 classes, a 2-block rank-4 edge network."""
    from services.common.pb import feature_pb2

    return registry_pb2.Task(
        name=TASK,
        backbone=feature_pb2.BackboneId(name="vit_tiny_patch16_224", weights_fingerprint="fleet-bench"),
        mode=feature_pb2.GATHER_MODE_MIST,
        k=2,
        codec=feature_pb2.CodecSpec(dtype=feature_pb2.DTYPE_I8, compression=feature_pb2.COMPRESSION_ZSTD),
        class_names=["a", "b", "c"],
        edge=_edge_config().to_proto(),
        description="bench/fleet.py: devices following an alias",
    )


def _edge_config() -> Any:
    from services.common.wire.edge_spec import EdgeNetworkConfig

    return EdgeNetworkConfig(dims=32, tokens=17, num_classes=3, num_blocks=2, rank=4)


def weights_blob(seed: int) -> bytes:
    """Safetensors weights of the task's edge network (about 7 KB), random float32 drawn from `seed`."""
    import numpy as np
    import safetensors.numpy

    from services.common.wire.edge_spec import state_shapes

    rng = np.random.default_rng(seed)
    tensors = {
        name: rng.standard_normal(shape).astype(np.float32) for name, shape in state_shapes(_edge_config()).items()
    }
    return safetensors.numpy.save(tensors)


# ---------------------------------------------------------------------------------------------- the registry


class RegistryServer:
    """`python -m services.registry.server` on a fixed loopback port; kill() and start() again keep the address."""

    def __init__(self, port: int, db_url: str) -> None:
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.db_url = db_url
        self.metrics_url = ""
        self.lines: list[str] = []
        self._proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise BenchError("the registry is not running")
        return self._proc.pid

    def start(self, timeout_s: float = 60.0) -> float:
        """Start it and wait for its "listening on" line; returns the seconds that took."""
        began = time.monotonic()
        command = [sys.executable, "-m", "services.registry.server", "--listen", self.target,
                   "--metrics-listen", "127.0.0.1:0", "--db", self.db_url, "--grace-s", "1"]  # fmt: skip
        self.lines = []
        self._proc = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        threading.Thread(target=self._read, args=(self._proc,), name="bench-fleet-registry", daemon=True).start()
        while time.monotonic() - began < timeout_s:
            line = next((line for line in list(self.lines) if "listening on" in line), None)
            if line is not None:
                self.metrics_url = f"http://{line.rsplit('metrics on ', 1)[-1].rstrip(')')}/metrics"
                return time.monotonic() - began
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise BenchError(f"the registry did not start on {self.target}:\n" + "\n".join(self.lines[-15:]))

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line.rstrip("\n"))
            del self.lines[:-200]

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise BenchError("no VmRSS in /proc/PID/status")

    def metric(self, name: str) -> float:
        from bench.servers import parse_prometheus_text

        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:  # noqa: S310 (our own loopback URL)
            return parse_prometheus_text(response.read().decode()).get(name, float("nan"))

    def kill(self) -> None:
        """SIGKILL, by PID: no drain, the streams just break."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, _STOP_GRACE_S)


def _started_registry(db_url: str) -> RegistryServer:
    registry = RegistryServer(free_port(), db_url)
    registry.start()
    return registry


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Admin:
    """The operator's side: a plain (sync) channel for setup, alias moves and the history."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._connect()

    def _connect(self) -> None:
        import grpc

        from services.common.pb import registry_pb2_grpc

        self._channel = grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = registry_pb2_grpc.RegistryStub(self._channel)

    def reconnect(self) -> None:
        """A fresh channel (after the registry was restarted), not one in reconnect backoff."""
        self._channel.close()
        self._connect()

    def push(self, blob: bytes, parent: int) -> registry_pb2.Version:
        header = registry_pb2.PushHeader(task=TASK, parent_version=parent, sha256=hashlib.sha256(blob).hexdigest(),
                                         size_bytes=len(blob))  # fmt: skip
        parts = [registry_pb2.PushVersionRequest(header=header), registry_pb2.PushVersionRequest(chunk=blob)]
        return self.stub.PushVersion(iter(parts), timeout=30)

    def move(self, version: int, *, percent: int = 0, expected: int | None = None) -> registry_pb2.Alias:
        request = registry_pb2.SetAliasRequest(task=TASK, name=ALIAS, version=version, percent=percent,
                                               has_expected_version=expected is not None,
                                               expected_version=expected or 0)  # fmt: skip
        return self.stub.SetAlias(request, timeout=30)

    def history(self) -> list[registry_pb2.AliasMove]:
        request = registry_pb2.AliasHistoryRequest(task=TASK, name=ALIAS, limit=1000)
        return list(self.stub.AliasHistory(request, timeout=30).moves)

    def close(self) -> None:
        self._channel.close()


# ---------------------------------------------------------------------------------------------- client processes


class ClientProcess:
    """One `python -m bench.fleet client` process: its devices start watching at once; one JSON command per stdin
    line, one JSON reply per stdout line."""

    def __init__(self, target: str, first: int, count: int, flags: Sequence[str], log_path: Path) -> None:
        command = [sys.executable, "-m", "bench.fleet", "client", "--target", target, "--first", str(first),
                   "--count", str(count), *flags]  # fmt: skip
        self._log_path = log_path
        self._log = log_path.open("w")
        self._proc = subprocess.Popen(command, cwd=ROOT, env=child_env(), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log)  # fmt: skip
        self._buffer = b""

    def ask(self, command: str, timeout_s: float = _ASK_TIMEOUT_S, **arguments: object) -> dict[str, Any]:
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps({"cmd": command, **arguments}).encode() + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"a fleet client exited: {self._tail()}") from None
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"a fleet client did not answer {command!r} within {timeout_s:g} s")
            ready, _, _ = select.select([proc.stdout], [], [], remaining)
            if ready:
                data = os.read(proc.stdout.fileno(), 1 << 20)
                if not data:
                    raise BenchError(f"a fleet client exited: {self._tail()}")
                self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def _tail(self) -> str:
        self._log.flush()
        return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-10:])

    def stop(self) -> None:
        """Ask it to stop (it closes its channels), then SIGTERM / SIGKILL by PID; safe to call twice."""
        if self._proc.poll() is None:
            try:
                self.ask("stop", timeout_s=5)
            except (BenchError, OSError, ValueError):
                pass
        stop_process(self._proc, 5)
        self._log.close()


class Fleet:
    """Every client process, asked together."""

    def __init__(self, clients: Sequence[ClientProcess]) -> None:
        self.clients = clients

    def ask(self, command: str, **arguments: object) -> list[dict[str, Any]]:
        return [client.ask(command, **arguments) for client in self.clients]

    def state(self) -> dict[str, Any]:
        """Summed over processes: attached devices, devices per version run, the lowest newest-revision, devices
        whose last report is not the version they run."""
        replies = self.ask("state")
        versions: dict[int, int] = {}
        for reply in replies:
            for version, count in reply["versions"].items():
                versions[int(version)] = versions.get(int(version), 0) + count
        return {
            "attached": sum(r["attached"] for r in replies),
            "versions": versions,
            "min_revision": min(r["min_revision"] for r in replies),
            "unreported": sum(r["unreported"] for r in replies),
        }

    def wait(self, done: Callable[[dict[str, Any]], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if done(self.state()):
                return True
            time.sleep(_POLL_S)
        return done(self.state())

    def records(self) -> list[dict[str, Any]]:
        return [device for reply in self.ask("dump") for device in reply["devices"]]


# ---------------------------------------------------------------------------------------------- phases


@dataclass(frozen=True)
class MoveResult:
    """One alias move and how it reached the fleet."""

    name: str
    version: int
    percent: int
    revision: int
    started: float  # time.monotonic() just before the SetAlias call
    targets: tuple[int, ...]  # the version each device should run after the move (by device index)
    expected_swaps: frozenset[str]  # devices whose version the move changes
    event_s: tuple[float, ...]  # per device that got the move's event: SetAlias call to the event
    swap_s: Mapping[str, float]  # per device that swapped at the move's revision: SetAlias call to the swap
    report_s: tuple[float, ...]  # per device that reported at the move's revision: SetAlias call to the answer
    complete: bool  # every device had the revision and ran its version before the timeout

    def within_share(self, limit_s: float = TARGET_SWAP_S) -> float:
        """Devices that should swap and did within `limit_s`, over those that should (1.0 when none should)."""
        if not self.expected_swaps:
            return 1.0
        return sum(self.swap_s.get(name, float("inf")) <= limit_s for name in self.expected_swaps) / len(
            self.expected_swaps
        )

    def figures(self) -> dict[str, Any]:
        unexpected = sorted(set(self.swap_s) - self.expected_swaps)
        return {
            "name": self.name,
            "version": self.version,
            "percent": self.percent,
            "revision": self.revision,
            "expected_swaps": len(self.expected_swaps),
            "swaps": len(self.swap_s),
            "unexpected_swaps": len(unexpected),
            "missing_swaps": len(self.expected_swaps - set(self.swap_s)),
            "events": len(self.event_s),
            "complete": self.complete,
            "swap_s": _quantiles(list(self.swap_s.values())),
            "event_s": _quantiles(self.event_s),
            "report_s": _quantiles(self.report_s),
            "within_target_share": self.within_share(),
        }


def _quantiles(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values), "n": len(values)}


def expected_version(move: registry_pb2.AliasMove, device: str) -> int:
    """What `device` should run after `move`: the rollout's version when its stable hash is in the share."""
    from services.registry.records import in_rollout

    if move.rollout_version and in_rollout(TASK, ALIAS, move.rollout_version, device, move.rollout_percent):
        return move.rollout_version
    return move.to_version


def device_name(index: int) -> str:
    return f"dev-{index:05d}"


def timed_move(
    name: str, admin: Admin, fleet: Fleet, before: Sequence[int], timeout_s: float, version: int, **move: Any
) -> MoveResult:
    """Move the alias, wait until every device has the move's revision and runs what it should, then read each
    device's event and swap times for that revision. `before`: what each device ran (by index)."""
    names = [device_name(index) for index in range(len(before))]
    started = time.monotonic()
    alias = admin.move(version, **move)
    as_move = registry_pb2.AliasMove(to_version=alias.version, rollout_version=alias.rollout.version,
                                     rollout_percent=alias.rollout.percent, revision=alias.revision)  # fmt: skip
    targets = tuple(expected_version(as_move, device) for device in names)
    counts = {v: targets.count(v) for v in set(targets)}
    complete = fleet.wait(
        lambda state: (
            state["min_revision"] >= alias.revision
            and state["unreported"] == 0
            and all(state["versions"].get(v, 0) == n for v, n in counts.items())
        ),
        timeout_s,
    )
    events: list[float] = []
    swaps: dict[str, float] = {}
    reports: list[float] = []
    for reply in fleet.ask("times", revision=alias.revision):
        events += [t - started for t in reply["events"]]
        reports += [t - started for t in reply["reports"]]
        swaps.update({device: t - started for device, t in reply["swaps"].items()})
    changed = frozenset(n for n, old, new in zip(names, before, targets, strict=True) if old != new)
    return MoveResult(name, version, move.get("percent", 0), alias.revision, started, targets, changed,
                      tuple(events), swaps, tuple(reports), complete)  # fmt: skip


def check_records(records: Iterable[Mapping[str, Any]], history: Sequence[registry_pb2.AliasMove]) -> dict[str, Any]:
    """Every device's record against the alias's history: events never backwards, every event and swap the version
    the history gives that device at that revision, every move after its first event received."""
    by_revision = {move.revision: move for move in history}
    backwards = wrong_events = wrong_swaps = lost = duplicates = devices = 0
    worst: list[str] = []
    for record in records:
        devices += 1
        name, newest, seen = record["device"], 0, set()
        for _t, _stream, revision, version, _current in record["events"]:
            if revision < newest:
                backwards += 1
                worst.append(f"{name}: revision {revision} after {newest}")
            duplicates += revision in seen
            seen.add(revision)
            newest = max(newest, revision)
            move = by_revision.get(revision)
            if move is None or (version and version != expected_version(move, name)):
                wrong_events += 1
                worst.append(f"{name}: event revision {revision} version {version}")
        for _t, version, revision in record["swaps"]:
            move = by_revision.get(revision)
            if move is None or version != expected_version(move, name):
                wrong_swaps += 1
                worst.append(f"{name}: swapped to {version} at revision {revision}")
        if seen:
            missing = {move.revision for move in history if move.revision > min(seen)} - seen
            lost += len(missing)
            worst += [f"{name}: never got revision {r}" for r in sorted(missing)[:3]]
    return {
        "devices": devices,
        "moves_in_history": len(history),
        "events_backwards": backwards,
        "wrong_events": wrong_events,
        "wrong_swaps": wrong_swaps,
        "moves_lost": lost,
        "duplicate_events": duplicates,  # a resumed stream may repeat the revision it resumed from: allowed
        "examples": worst[:10],
    }


# ---------------------------------------------------------------------------------------------- the section


def run(profile: Profile, out_dir: Path, *, settings: FleetSettings | None = None) -> dict[str, Any]:
    """The whole section; every process it started is stopped by PID before it returns or raises."""
    settings = settings or SETTINGS[profile]
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mist-bench-fleet-") as scratch:
        registry = RegistryServer(free_port(), f"sqlite:///{scratch}/registry.db")
        clients: list[ClientProcess] = []
        admin: Admin | None = None
        try:
            registry.start()
            admin = Admin(registry.target)
            result = _measure(registry, admin, clients, settings, Path(scratch))
        finally:
            for client in clients:
                client.stop()
            if admin is not None:
                admin.close()
            registry.stop()
    # Last: a device agent swapping while it predicts through a real extractor (bench/fleet_load.py).
    result["swap_under_load"] = fleet_load.swap_under_load(profile, _started_registry)
    result["targets"].append(fleet_load.target(result["swap_under_load"]))
    result["profile"] = profile
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


def _measure(
    registry: RegistryServer, admin: Admin, clients: list[ClientProcess], settings: FleetSettings, scratch: Path
) -> dict[str, Any]:
    count = settings.devices
    admin.stub.CreateTask(registry_pb2.CreateTaskRequest(task=task_definition()), timeout=30)
    blobs = [weights_blob(seed) for seed in (1, 2, 3)]
    for number, blob in enumerate(blobs, start=1):
        admin.push(blob, parent=number - 1)
    admin.move(1, expected=0)
    for number in (1, 2, 3):  # each version read once before the idle reading: the pull path is warm
        request = registry_pb2.PullVersionRequest(task=TASK, ref=registry_pb2.VersionRef(number=number))
        list(admin.stub.PullVersion(request, timeout=30))
    time.sleep(settings.settle_s)
    rss_idle = registry.rss_bytes()

    # The devices start with version 1 on disk and reported (a fleet that already runs the alias's version, as after
    # a registry restart or deploy): attaching costs no pull and no report, so the RSS difference is what holding
    # the watchers costs. Measured (full profile): 31.8 KB per watcher; 58.4 KB when every device pulled version 1 at
    # attach, 60.2 KB when every device reported at attach (the heap's high-water mark of those bursts of 1,000
    # concurrent calls, which the idle reading does not include).
    flags = ["--channels", str(settings.channels_per_process), "--have-version", "1",
             "--have-sha256", hashlib.sha256(blobs[0]).hexdigest()]  # fmt: skip
    if not settings.report:
        flags.append("--no-report")
    started = time.monotonic()
    for index in range(settings.processes):
        clients.append(ClientProcess(registry.target, index * settings.devices_per_process,
                                     settings.devices_per_process, flags, scratch / f"client-{index}.log"))  # fmt: skip
    fleet = Fleet(clients)
    if not fleet.wait(
        lambda s: s["attached"] == count and s["versions"].get(1, 0) == count and s["unreported"] == 0,
        settings.attach_timeout_s,
    ):
        raise BenchError(f"the {count} devices did not all attach and run version 1 in {settings.attach_timeout_s:g} s")
    attach_s = time.monotonic() - started
    time.sleep(settings.settle_s)
    rss_watching = registry.rss_bytes()
    memory = {
        "rss_idle_bytes": rss_idle,
        "rss_watching_bytes": rss_watching,
        "bytes_per_watcher": (rss_watching - rss_idle) / count,
        "watchers_metric": registry.metric("mist_registry_watchers"),
        "fleet_watchers": admin.stub.GetFleet(registry_pb2.GetFleetRequest(task=TASK), timeout=30).watchers,
    }

    moves: list[MoveResult] = []
    running: Sequence[int] = (1,) * count
    for name, version, move in (
        ("promote", 2, {"expected": 1}),
        ("rollback", 1, {"expected": 2}),
        (f"rollout {ROLLOUT_PERCENT} %", 2, {"percent": ROLLOUT_PERCENT}),
        ("rollout rolled back", 1, {"percent": 0}),
    ):
        moves.append(timed_move(name, admin, fleet, running, settings.move_timeout_s, version, **move))
        running = moves[-1].targets
        if name == "promote":  # a pull by every device: the heap's high-water mark grows with the burst
            memory["rss_after_promote_bytes"] = registry.rss_bytes()

    # SIGKILL: the streams break with no drain; the same port again, and a move as soon as it listens, which the
    # devices that have not re-attached yet get on resume (since_revision), the others live.
    killed_at = time.monotonic()
    registry.kill()
    restart_s = registry.start()
    admin.reconnect()
    caught = timed_move("move right after the restart", admin, fleet, running, settings.move_timeout_s, 2,
                        expected=1)  # fmt: skip
    moves.append(caught)
    running = caught.targets
    reattach = [t - killed_at for reply in fleet.ask("attaches", after=killed_at) for t in reply["attaches"].values()]
    caught_up = [s + caught.started - killed_at for s in caught.swap_s.values()]
    moves.append(timed_move("promote after the restart", admin, fleet, running, settings.move_timeout_s, 3,
                            expected=2))  # fmt: skip
    time.sleep(settings.settle_s)
    restart = {
        "restart_s": restart_s,
        "reattach_s": _quantiles(reattach),
        "caught_up_s": _quantiles(caught_up),
        "reattached": len(reattach),
        "caught_up": len(caught_up),
        "within_target_share": sum(s <= TARGET_REATTACH_S for s in caught_up) / count,
        "rss_after_bytes": registry.rss_bytes(),
        "watchers_metric_after": registry.metric("mist_registry_watchers"),
    }
    fleet_view = admin.stub.GetFleet(registry_pb2.GetFleetRequest(task=TASK), timeout=30)
    integrity = check_records(fleet.records(), admin.history())
    integrity["fleet_view_versions"] = {str(v.version): v.devices for v in fleet_view.versions}
    stats = fleet.ask("stats")
    restart["reconnect_attempts"] = sum(r["stream_errors"] for r in stats)  # every broken or refused stream
    integrity.update({key: sum(r[key] for r in stats) for key in ("pulls", "pull_bytes", "not_modified")})
    return _summary(settings, moves, restart, memory, integrity, attach_s)


def _summary(
    settings: FleetSettings,
    moves: Sequence[MoveResult],
    restart: dict[str, Any],
    memory: dict[str, Any],
    integrity: dict[str, Any],
    attach_s: float,
) -> dict[str, Any]:
    count = settings.devices
    by_name = {move.name: move for move in moves}
    promote, rollback = by_name["promote"], by_name["rollback"]
    rollout = by_name[f"rollout {ROLLOUT_PERCENT} %"]
    after = by_name["promote after the restart"]
    per_watcher = memory["bytes_per_watcher"]
    targets = [
        _swap_target("promote", promote),
        _swap_target("rollback", rollback),
        {
            "name": f"staged rollout at {ROLLOUT_PERCENT} %: only the {len(rollout.expected_swaps)} devices the stable "
            f"hash picks swap; of them, within {TARGET_SWAP_S:g} s",
            "target": ">= 99 %",
            "measured": f"{len(rollout.swap_s)} swapped ({len(rollout.swap_s) / count:.1%} of {count}), "
            f"{len(set(rollout.swap_s) - rollout.expected_swaps)} unexpected; "
            f"{rollout.within_share():.1%} within {TARGET_SWAP_S:g} s",
            "passed": set(rollout.swap_s) == rollout.expected_swaps and rollout.within_share() >= TARGET_SWAP_SHARE,
        },
        {
            "name": f"registry memory per attached watcher (RSS, {count} watchers)",
            "target": f"<= {TARGET_WATCHER_BYTES / 1000:g} KB",
            "measured": f"{per_watcher / 1000:.1f} KB",
            "passed": per_watcher <= TARGET_WATCHER_BYTES,
        },
        {
            "name": f"after a SIGKILL and restart: devices re-attached and caught up within {TARGET_REATTACH_S:g} s",
            "target": ">= 99 %",
            "measured": f"{restart['within_target_share']:.1%} (p99 {_seconds(restart['caught_up_s']['p99'])})",
            "passed": restart["within_target_share"] >= TARGET_REATTACH_SHARE,
        },
        {
            "name": "promote after the restart: devices running it",
            "target": f"= {count}",
            "measured": f"{len(after.swap_s)} devices",
            "passed": after.complete
            and set(after.swap_s) == after.expected_swaps == frozenset(device_name(i) for i in range(count)),
        },
        {
            "name": "events backwards / events or swaps to a version the alias did not give / moves lost "
            "(every device)",
            "target": "= 0 / 0 / 0",
            "measured": f"{integrity['events_backwards']} / {integrity['wrong_swaps'] + integrity['wrong_events']} / "
            f"{integrity['moves_lost']}",
            "passed": integrity["events_backwards"]
            == integrity["wrong_swaps"]
            == integrity["wrong_events"]
            == integrity["moves_lost"]
            == 0,  # fmt: skip
        },
    ]
    return {
        "devices": count,
        "processes": settings.processes,
        "devices_per_process": settings.devices_per_process,
        "channels_per_process": settings.channels_per_process,
        "attach_s": attach_s,
        "moves": [move.figures() for move in moves],
        "rollout_share": len(rollout.swap_s) / count,
        "rollout_expected_share": len(rollout.expected_swaps) / count,
        "memory": memory,
        "restart": restart,
        "integrity": integrity,
        "method": " ".join(__doc__.split("Method. ", 1)[1].split()),
        "targets": targets,
    }


def _swap_target(name: str, move: MoveResult) -> dict[str, Any]:
    return {
        "name": f"{name}: devices running the new version within {TARGET_SWAP_S:g} s of SetAlias "
        f"({len(move.expected_swaps)} devices)",
        "target": ">= 99 %",
        "measured": f"{move.within_share():.1%} (p50 {_seconds(percentile_or_none(move.swap_s, 50))}, "
        f"p99 {_seconds(percentile_or_none(move.swap_s, 99))}, "
        f"max {_seconds(max(move.swap_s.values(), default=None))})",
        "passed": move.within_share() >= TARGET_SWAP_SHARE,
    }


def percentile_or_none(values: Mapping[str, float], q: float) -> float | None:
    return percentile(list(values.values()), q) if values else None


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


# ---------------------------------------------------------------------------------------------- report


def markdown(section: Mapping[str, Any]) -> str:
    rows = ["| move | devices swapped / expected | event p50 / p99 / max | swap p50 / p99 / max | reported p50 / p99 "
            "/ max | swapped within 5 s |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for move in section["moves"]:
        rows.append(
            f"| {move['name']} (to v{move['version']}{', ' + str(move['percent']) + ' %' if move['percent'] else ''}) "
            f"| {move['swaps']} / {move['expected_swaps']} | {_triple(move['event_s'])} | {_triple(move['swap_s'])} "
            f"| {_triple(move['report_s'])} | {move['within_target_share']:.1%} |"
        )
    memory, restart, integrity = section["memory"], section["restart"], section["integrity"]
    mib = 1 << 20
    lines = [
        f"{section['devices']} devices ({section['processes']} client processes x {section['devices_per_process']}, "
        f"{section['channels_per_process']} connections each), all attached and running version 1 "
        f"{section['attach_s']:.1f} s after the client processes were started.",
        "",
        *rows,
        "",
        f"Staged rollout at {ROLLOUT_PERCENT} %: {section['rollout_share']:.1%} of the devices swapped "
        f"(the stable hash picks {section['rollout_expected_share']:.1%} of these names).",
        "",
        f"**Registry memory**: VmRSS {memory['rss_idle_bytes'] / mib:.1f} MiB with no watcher, "
        f"{memory['rss_watching_bytes'] / mib:.1f} MiB with {section['devices']} attached: "
        f"**{memory['bytes_per_watcher'] / 1000:.1f} KB per watcher** (target {TARGET_WATCHER_BYTES / 1000:g} KB); "
        f"`mist_registry_watchers` {memory['watchers_metric']:g}, GetFleet `watchers` {memory['fleet_watchers']}. "
        f"The devices started with version 1 (no pull to attach); after the promote, every device's pull: "
        f"{memory['rss_after_promote_bytes'] / mib:.1f} MiB.",
        "",
        f"**SIGKILL and restart on the same port**: listening again {restart['restart_s']:.2f} s after the kill; "
        f"re-attached (first event on a new stream) p50 / p99 / max {_triple(restart['reattach_s'])} after the kill "
        f"({restart['reattached']} devices); caught up with the move made as soon as it listened "
        f"{_triple(restart['caught_up_s'])} ({restart['caught_up']} devices, "
        f"{restart['within_target_share']:.1%} within {TARGET_REATTACH_S:g} s); {restart['reconnect_attempts']} "
        f"broken or refused streams in all; `mist_registry_watchers` afterwards {restart['watchers_metric_after']:g}, "
        f"VmRSS {restart['rss_after_bytes'] / mib:.1f} MiB.",
        "",
        f"**Integrity** over {integrity['devices']} devices and {integrity['moves_in_history']} moves: "
        f"{integrity['events_backwards']} events backwards, {integrity['wrong_events']} events and "
        f"{integrity['wrong_swaps']} swaps to a version the history did not give, {integrity['moves_lost']} moves "
        f"lost, {integrity['duplicate_events']} repeated revisions (resumes); {integrity['pulls']} pulls, "
        f"{integrity['not_modified']} of them answered by the header alone (have_sha256), "
        f"{integrity['pull_bytes'] / mib:.2f} MiB; fleet view at the end: "
        + ", ".join(f"v{v}: {n}" for v, n in integrity["fleet_view_versions"].items())
        + ".",
    ]
    if integrity["examples"]:
        lines += ["", "Examples: " + "; ".join(integrity["examples"])]
    load = section.get("swap_under_load")
    if load:
        lines += [
            "",
            f"**A swap under a steady predict load** (a device agent predicting through a real extractor, "
            f"{load['predictions_per_s']:.0f} predictions/s): {load['predictions']} predictions, "
            f"**{load['failed']} failed**, {load['during_swap']} while the swap was under way; the agent ran "
            f"version 2 {load['swap_s']:.2f} s after SetAlias (its own pull, load and smoke prediction "
            f"{load['agent_swap_s']:.2f} s); answers of version 1 after the first of version 2: "
            f"{load['old_after_new']}.",
        ]
    lines += ["", f"*Method.* {section['method']}"]
    return "\n".join(lines)


def _triple(figures: Mapping[str, Any]) -> str:
    if not figures.get("n"):
        return "-"
    return f"{figures['p50']:.2f} / {figures['p99']:.2f} / {figures['max']:.2f} s"


# ---------------------------------------------------------------------------------------------- the devices
# What runs in each client process (`python -m bench.fleet client`): grpc.aio, one event loop, one task per device.


@dataclass(eq=False)
class Device:
    """One simulated device: what it runs and everything it saw (mutable: it changes with every event)."""

    name: str
    version: int = 0
    sha256: str = ""
    previous: tuple[int, str] = (0, "")  # the version it ran before, kept for a rollback (version, sha256)
    revision: int = 0  # the newest revision received: since_revision of the next stream
    attached: bool = False  # its current stream delivered an event
    streams: int = 0
    events: list[tuple[float, int, int, int, bool]] = field(default_factory=list)  # t, stream, revision, version, cur
    swaps: list[tuple[float, int, int]] = field(default_factory=list)  # t, version, revision of the event
    attaches: list[tuple[float, int]] = field(default_factory=list)  # t of a stream's first event, stream
    reported: int = 0  # the version last reported (ReportDevice): a device reports after each swap
    reports: list[tuple[float, int, int]] = field(default_factory=list)  # t of the answer, version, revision
    stream_errors: int = 0
    pulls: int = 0
    pull_bytes: int = 0
    not_modified: int = 0

    def record(self) -> dict[str, Any]:
        return {"device": self.name, "events": self.events, "swaps": self.swaps, "attaches": self.attaches}


def device_channel_options() -> list[tuple[str, Any]]:
    """Own TCP connection per channel; the channel's reconnect backoff capped like the device's own."""
    backoff_ms = int(_BACKOFF_FIRST_S * 1000)
    return [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.initial_reconnect_backoff_ms", backoff_ms),
        ("grpc.min_reconnect_backoff_ms", backoff_ms),
        ("grpc.max_reconnect_backoff_ms", int(_BACKOFF_CAP_S * 1000)),
    ]


async def follow(device: Device, stub: Any, rng: random.Random, reporting: bool) -> None:
    """Watch, pull and swap on every new version, resume after any break; forever (cancelled by the client)."""
    import grpc

    failures = 0
    while True:
        device.streams += 1
        stream = device.streams
        call = stub.WatchAlias(registry_pb2.WatchAliasRequest(task=TASK, name=ALIAS, since_revision=device.revision,
                                                              device=device.name))  # fmt: skip
        try:
            async for event in call:
                now = time.monotonic()
                if not device.attached:
                    device.attached = True
                    device.attaches.append((now, stream))
                    failures = 0
                device.events.append((now, stream, event.revision, event.version, event.current))
                if event.revision < device.revision:
                    continue  # never acted on; check_records counts it
                device.revision = event.revision
                if event.version and event.version != device.version:
                    await pull_and_swap(device, stub, event.version, event.revision)
                if reporting and device.reported != device.version:
                    await report(device, stub, event.revision)
        except (grpc.aio.AioRpcError, BenchError):
            pass
        finally:
            call.cancel()
            device.attached = False
        device.stream_errors += 1
        delay = min(_BACKOFF_CAP_S, _BACKOFF_FIRST_S * 2**failures)
        failures += 1
        await asyncio.sleep(rng.uniform(delay / 2, delay))


async def pull_and_swap(device: Device, stub: Any, version: int, revision: int) -> None:
    """PullVersion, check the sha256, swap. Going back to the version it ran before, the device offers that copy's
    sha256 (have_sha256) and gets the header alone: the registry still says which version and sha256 to run."""
    kept_version, kept_sha256 = device.previous
    request = registry_pb2.PullVersionRequest(task=TASK, ref=registry_pb2.VersionRef(number=version),
                                              have_sha256=kept_sha256 if kept_version == version else "")  # fmt: skip
    header, digest, size = None, hashlib.sha256(), 0
    device.pulls += 1
    async for part in stub.PullVersion(request, timeout=30):
        if part.WhichOneof("part") == "header":
            header = part.header
        else:
            digest.update(part.chunk)
            size += len(part.chunk)
    if header is None:
        raise BenchError(f"{device.name}: a pull of version {version} without a header")
    if header.not_modified:
        device.not_modified += 1
    elif digest.hexdigest() != header.version.sha256 or size != header.version.size_bytes:
        raise BenchError(f"{device.name}: version {version} arrived corrupted")
    device.pull_bytes += size
    device.previous = (device.version, device.sha256)
    device.version, device.sha256 = version, header.version.sha256
    device.swaps.append((time.monotonic(), version, revision))


async def report(device: Device, stub: Any, revision: int) -> None:
    """ReportDevice with the version in use: the fleet view's source."""
    version = device.version
    await stub.ReportDevice(registry_pb2.DeviceReport(task=TASK, alias=ALIAS, device=device.name, version=version,
                                                      agent="mist-bench-fleet"), timeout=30)  # fmt: skip
    device.reported = version
    device.reports.append((time.monotonic(), version, revision))


def answer(devices: Sequence[Device], command: Mapping[str, Any], *, reporting: bool) -> dict[str, Any]:
    """The reply to one command of the parent."""
    kind = command["cmd"]
    if kind == "state":
        versions: dict[int, int] = {}
        for device in devices:
            versions[device.version] = versions.get(device.version, 0) + 1
        return {"attached": sum(d.attached for d in devices), "versions": versions,
                "min_revision": min(d.revision for d in devices),
                "unreported": sum(d.reported != d.version for d in devices) if reporting else 0}  # fmt: skip
    if kind == "times":  # the first event and the first swap at one revision, per device
        revision = command["revision"]
        events = [next((e[0] for e in d.events if e[2] == revision), None) for d in devices]
        swaps = {d.name: next((s[0] for s in d.swaps if s[2] == revision), None) for d in devices}
        reports = [next((r[0] for r in d.reports if r[2] == revision), None) for d in devices]
        return {"events": [t for t in events if t is not None], "swaps": {n: t for n, t in swaps.items() if t},
                "reports": [t for t in reports if t is not None]}  # fmt: skip
    if kind == "attaches":  # the first attach after a time, per device
        after = command["after"]
        firsts = {d.name: next((a[0] for a in d.attaches if a[0] > after), None) for d in devices}
        return {"attaches": {n: t for n, t in firsts.items() if t is not None}}
    if kind == "stats":
        return {key: sum(getattr(d, key) for d in devices) for key in ("stream_errors", "pulls", "pull_bytes",
                                                                       "not_modified", "streams")}  # fmt: skip
    if kind == "dump":
        return {"devices": [d.record() for d in devices]}
    raise BenchError(f"unknown command {kind!r}")


async def client_main(args: argparse.Namespace) -> None:
    import grpc

    from services.common.pb import registry_pb2_grpc

    channels = args.channels
    opened = [grpc.aio.insecure_channel(args.target, options=device_channel_options()) for _ in range(channels)]
    stubs = [registry_pb2_grpc.RegistryStub(channel) for channel in opened]
    devices = [Device(device_name(index), args.have_version, args.have_sha256, reported=args.have_version)
               for index in range(args.first, args.first + args.count)]  # fmt: skip
    rng = random.Random(args.first)
    tasks = [asyncio.create_task(follow(d, stubs[i % channels], rng, args.report)) for i, d in enumerate(devices)]
    try:
        while True:
            line = await asyncio.to_thread(sys.stdin.buffer.readline)
            if not line:
                break  # the parent is gone
            command = json.loads(line)
            if command["cmd"] == "stop":
                sys.stdout.write('{"ok": true}\n')
                sys.stdout.flush()
                break
            sys.stdout.write(json.dumps(answer(devices, command, reporting=args.report)) + "\n")
            sys.stdout.flush()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in opened:
            await channel.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description="the fleet section's device client")
    sub = parser.add_subparsers(dest="command", required=True)
    client = sub.add_parser("client", help="simulated devices, driven by bench/fleet.py over stdin and stdout")
    client.add_argument("--target", required=True)
    client.add_argument("--first", type=int, required=True, help="index of the first device (names dev-NNNNN)")
    client.add_argument("--count", type=int, required=True)
    client.add_argument("--channels", type=int, default=1, help="TCP connections; devices spread over them")
    client.add_argument("--have-version", type=int, default=0, help="the version every device starts with")
    client.add_argument("--have-sha256", default="", help="its sha256")
    client.add_argument("--no-report", dest="report", action="store_false", help="no ReportDevice calls")
    args = parser.parse_args(argv)
    asyncio.run(client_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
