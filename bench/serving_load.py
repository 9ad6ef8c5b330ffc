"""The serving section's machinery: request sets of distinct images, the echo and load-client processes, and the
CPU time and context switches of a server's process tree, read from /proc over a measured interval.

    with ClientPool(4) as clients, EchoProcess(features_file) as echo:
        clients.connect(echo.target, warmup_files)
        run = clients.run(echo.target, request_files, window=32, server_pid=echo.pid)
        run.images_per_s, run.cpu_ms_per_image, run.voluntary_switches_per_image
"""

from __future__ import annotations

import io
import json
import os
import pickle
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from bench.common import ROOT, BenchError, child_env, stop_process
from services.common.pb import extractor_pb2, feature_pb2
from services.extractor.transfer import synthetic_png_images

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")  # the unit of utime and stime in /proc/<pid>/stat
JPEG_QUALITY = 90  # what a camera app writes; the synthetic generator's own JPEG quality too
_BASE_IMAGES = 8  # distinct synthetic pictures (one per class); every image is one of them plus a counter mark
_REPLY_TIMEOUT_S = 600.0  # one measured pass; a hung server fails the section instead of hanging the run
ImageFormat = Literal["jpeg", "png"]

# ---------------------------------------------------------------------------------------------- request sets


def distinct_images(count: int, size: int, image_format: ImageFormat, *, first: int) -> list[bytes]:
    """`count` images no other call with a disjoint [first, first + count) range returns: a synthetic picture with
    the image's number written into its top rows (as 8x8 black / white blocks, so JPEG cannot blur two apart)."""
    bases = [
        np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        for png in synthetic_png_images(_BASE_IMAGES, size, seed=first % 997)
    ]
    block = 8 if size >= 8 * 24 else 1  # 24 bits: blocks at ViT-B's 224 px, single pixels (PNG) at 32 px
    images = []
    for number in range(first, first + count):
        pixels = bases[number % _BASE_IMAGES].copy()
        for bit in range(24):
            row, column = divmod(bit * block, size)
            value = 255 if (number >> bit) & 1 else 0
            pixels[row * block : (row + 1) * block, column : column + block] = value
        buffer = io.BytesIO()
        if image_format == "jpeg":
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        else:
            Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        images.append(buffer.getvalue())
    if len(set(images)) != count:
        raise BenchError(f"{count - len(set(images))} of {count} generated images are duplicates")
    return images


def write_requests(path: Path, images: Sequence[bytes], *, prefix: str, k: int) -> Path:
    """Serialized ExtractRequests (MIST at one k, the default codec) for the load client, pickled as a list."""
    messages = [
        extractor_pb2.ExtractRequest(
            item_id=f"{prefix}-{index}", image=image, mode=feature_pb2.GATHER_MODE_MIST, ks=[k]
        ).SerializeToString()
        for index, image in enumerate(images)
    ]
    path.write_bytes(pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL))
    return path


# ---------------------------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class TreeSample:
    """CPU seconds per process and voluntary context switches per thread of a process tree, at one instant."""

    cpu_s: dict[int, float]  # pid -> utime + stime of all its threads
    voluntary_switches: dict[tuple[int, int], int]  # (pid, tid) -> voluntary_ctxt_switches


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant (a supervisor's workers), from the parent pids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(int(entry))[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def sample_tree(root: int) -> TreeSample:
    cpu, switches = {}, {}
    for pid in process_tree(root):
        try:
            fields = _stat_fields(pid)
            cpu[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S  # utime, stime
            for tid in os.listdir(f"/proc/{pid}/task"):
                switches[(pid, int(tid))] = _voluntary_switches(f"/proc/{pid}/task/{tid}/status")
        except (OSError, ValueError):
            continue  # exited meanwhile: its time is lost, which a measurement without restarts never sees
    return TreeSample(cpu, switches)


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces): fields 3.. of proc(5), 0-based here."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _voluntary_switches(path: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def tree_delta(before: TreeSample, after: TreeSample) -> tuple[dict[int, float], int]:
    """(CPU seconds per process, voluntary switches of all threads) between two samples; a new pid or thread
    counts from zero."""
    cpu = {pid: seconds - before.cpu_s.get(pid, 0.0) for pid, seconds in after.cpu_s.items()}
    switches = sum(count - before.voluntary_switches.get(key, 0) for key, count in after.voluntary_switches.items())
    return cpu, switches


def listening_processes(root: int, port: int) -> list[int]:
    """Processes of `root`'s tree holding a listening TCP socket on `port`: a supervisor's serving workers."""
    return [pid for pid, count in _sockets_by_process(root, port, _LISTEN).items() if count]


def connections_by_process(root: int, port: int) -> dict[int, int]:
    """Accepted TCP connections on `port` per process of `root`'s tree (0 for a process with none)."""
    return _sockets_by_process(root, port, _ESTABLISHED)


_LISTEN, _ESTABLISHED = "0A", "01"  # socket states in /proc/net/tcp


def _sockets_by_process(root: int, port: int, state: str) -> dict[int, int]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()  # local address (hex ip:port), remote address, state, ..., inode
            if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    counts = {}
    for pid in process_tree(root):
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        counts[pid] = sum(link in inodes for link in links)
    return counts


# ---------------------------------------------------------------------------------------------- processes


class _Child:
    """A helper process of ours with line-based stdin / stdout, stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.proc: subprocess.Popen[str] | None = None

    def spawn(self) -> None:
        self.proc = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # a failing child's traceback lands in the run's own stderr
            text=True,
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def read_line(self, timeout_s: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            state = "exited" if self.proc.poll() is not None else f"silent for {timeout_s:g}s"
            raise BenchError(f"{' '.join(self.command[1:4])} (pid {self.pid}) {state}")
        return line

    def stop(self, grace_s: float = 5.0) -> None:
        proc = self.proc
        if proc is None:
            return
        stop_process(proc, grace_s)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


class EchoProcess(_Child):
    """`python -m bench.echo_server` answering with the FeatureTensors of `features_file`."""

    def __init__(self, features_file: Path) -> None:
        super().__init__([sys.executable, "-m", "bench.echo_server", "--features", str(features_file)])
        self.target = ""

    def __enter__(self) -> EchoProcess:
        return self.start()

    def start(self) -> EchoProcess:
        """Spawn and wait for the "listening on" line (stopped again if that fails)."""
        self.spawn()
        try:
            line = self.read_line(60.0)
            self.target = line.rsplit(" ", 1)[1].strip()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True)
class LoadRun:
    """One measured pass: every client's stream over its own requests, started together."""

    images: int  # answers received, over all clients
    seconds: float  # from the first client's start to the last client's last answer
    answer_bytes: int  # serialized ExtractResponse bytes received
    cache_hits: int
    server_cpu_s: dict[int, float]  # per process of the server's tree (a supervisor and its workers)
    voluntary_switches: int  # over every thread of the server's tree

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000.0 * sum(self.server_cpu_s.values()) / self.images

    @property
    def voluntary_switches_per_image(self) -> float:
        return self.voluntary_switches / self.images


class ClientPool:
    """`count` load-client processes (bench/load_client.py), each with its own channel per target."""

    def __init__(self, count: int) -> None:
        self.clients = [_Child([sys.executable, "-m", "bench.load_client"]) for _ in range(count)]

    def __enter__(self) -> ClientPool:
        try:
            for client in self.clients:
                client.spawn()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for client in self.clients:
            client.stop()

    def _ask(self, commands: Sequence[dict[str, Any]], timeout_s: float) -> list[dict[str, Any]]:
        for client, command in zip(self.clients, commands, strict=True):
            assert client.proc is not None and client.proc.stdin is not None
            client.proc.stdin.write(json.dumps(command) + "\n")
            client.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        replies = [json.loads(c.read_line(max(1.0, deadline - time.monotonic()))) for c in self.clients]
        failed = [reply["failed"] for reply in replies if "failed" in reply]
        if failed:
            raise BenchError(f"{len(failed)} of {len(replies)} load clients failed; first: {failed[0]}")
        return replies

    def connect(self, target: str, request_files: Sequence[Path], *, fresh: bool = False) -> None:
        """Open every client's channel to `target` (connected before any clock starts) and load its requests;
        `fresh`: replace the connections held by new ones."""
        commands = [{"cmd": "connect", "target": target, "requests": str(f), "fresh": fresh} for f in request_files]
        self._ask(commands, 120.0)

    def disconnect(self) -> None:
        """Close every client's channels (connections); a client that died already is left alone."""
        if all(c.proc is not None and c.proc.poll() is None for c in self.clients):
            self._ask([{"cmd": "close"}] * len(self.clients), 60.0)

    def run(self, target: str, request_files: Sequence[Path], *, window: int, server_pid: int) -> LoadRun:
        """One pass: client i streams request_files[i]; the server tree's CPU is read just before and after."""
        commands = [{"cmd": "run", "target": target, "requests": str(f), "window": window} for f in request_files]
        before = sample_tree(server_pid)
        replies = self._ask(commands, _REPLY_TIMEOUT_S)
        after = sample_tree(server_pid)
        errors = sum(reply["errors"] for reply in replies)
        if errors:
            raise BenchError(f"{errors} answers from {target} were per-item errors")
        cpu, switches = tree_delta(before, after)
        return LoadRun(
            images=sum(reply["images"] for reply in replies),
            seconds=max(reply["t1"] for reply in replies) - min(reply["t0"] for reply in replies),
            answer_bytes=sum(reply["answer_bytes"] for reply in replies),
            cache_hits=sum(reply["cache_hits"] for reply in replies),
            server_cpu_s=cpu,
            voluntary_switches=switches,
        )
