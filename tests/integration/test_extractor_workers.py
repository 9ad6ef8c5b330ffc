"""`mist-extractor --workers 2` as real processes on 127.0.0.1 with the tiny ViT: both workers serve one port, answers
equal a single server's, /metrics adds the workers up, a SIGKILLed worker is restarted while calls fail fast, SIGTERM
stops everything; a port held by another program is refused; the restart policy's numbers.

The tests sharing the `workers` fixture run in file order and the SIGTERM test, which ends that supervisor, is last.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from services.common.pb import extractor_pb2, extractor_pb2_grpc
from services.common.serving.supervisor import MAX_BACKOFF_S, RestartPolicy
from services.common.wire.codec import decode_feature
from tests.helpers.extractor import ExtractorProcess, ExtractorServer, extract_request, png_image, tiny_config

_WORKER_LINE = re.compile(r"worker (\d+) \(pid (\d+)\) serving on")
CHANNELS = 16  # connections the kernel spreads over 2 workers: all on one happens with probability 2**-15
CALL_TIMEOUT_S = 30.0  # every wait in these tests is bounded
# Local subchannel pools: each channel opens a connection of its own instead of sharing one per target.
SEPARATE_CONNECTIONS = [("grpc.use_local_subchannel_pool", 1)]


class Supervisor:
    """The supervisor process and the workers it announced (by their "serving on" lines)."""

    def __init__(self, *flags: str) -> None:
        self.process = ExtractorProcess("--workers", "2", "--grace-s", "1", *flags)

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid of its latest process."""
        pids: dict[int, int] = {}
        for line in list(self.process.lines):
            match = _WORKER_LINE.search(line)
            if match:
                pids[int(match.group(1))] = int(match.group(2))
        return pids

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.process.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(value for (n, ls), value in self.metrics().items() if n == name and wanted <= set(ls))

    def stop(self) -> None:
        """SIGKILL the supervisor and every worker it announced (by PID); safe to call twice."""
        self.process.kill()
        for pid in self.worker_pids().values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def wait_for(predicate, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s:g}s")
        time.sleep(0.1)


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))  # a zombie has exited


def images_served_by(pid: int) -> float:
    """What one worker counted, from its own file in the supervisor's prometheus multiprocess directory."""
    directory = dict(
        entry.split("=", 1) for entry in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in entry
    )["PROMETHEUS_MULTIPROC_DIR"]
    metrics = MultiProcessCollector.merge([os.path.join(directory, f"counter_{pid}.db")])
    return sum(s.value for m in metrics for s in m.samples if s.name == "mist_extractor_images_served_total")


def extract(channel: grpc.Channel, requests: list[extractor_pb2.ExtractRequest]) -> list[extractor_pb2.ExtractResponse]:
    return list(extractor_pb2_grpc.ExtractorStub(channel).Extract(iter(requests), timeout=CALL_TIMEOUT_S))


@pytest.fixture(scope="module")
def workers():
    supervisor = Supervisor()
    try:
        supervisor.process.wait_listening()
        wait_for(lambda: len(supervisor.worker_pids()) == 2, 10, "two 'serving on' lines")
        yield supervisor
    finally:
        supervisor.stop()


# ---------------------------------------------------------------------------------------------- serving


def test_two_workers_share_the_port_answer_like_one_server_and_metrics_add_up(workers) -> None:
    # Prepare
    images = [png_image(300 + i) for i in range(4)]
    requests = [extract_request(f"img-{i}", image, ks=(2, 4)) for i, image in enumerate(images)]
    channels = [grpc.insecure_channel(workers.process.target, options=SEPARATE_CONNECTIONS) for _ in range(CHANNELS)]
    single = ExtractorServer(tiny_config(decode_threads=1)).start()
    try:
        # Execute
        answers = [extract(channel, requests) for channel in channels]
        described = extractor_pb2_grpc.ExtractorStub(channels[0]).Describe(extractor_pb2.DescribeRequest(), timeout=10)
        with grpc.insecure_channel(single.target) as channel:
            reference = extract(channel, requests)
            reference_described = extractor_pb2_grpc.ExtractorStub(channel).Describe(
                extractor_pb2.DescribeRequest(), timeout=10
            )
    finally:
        single.stop()
        for channel in channels:
            channel.close()

    # Assert: the same backbone (seed 0) and settings give the same Describe and the same features
    assert described == reference_described
    for answer in answers:
        assert [r.item_id for r in answer] == [r.item_id for r in reference]
        for got, want in zip(answer, reference, strict=True):
            assert [(f.k, tuple(f.shape), f.backbone) for f in got.features] == [
                (f.k, tuple(f.shape), f.backbone) for f in want.features
            ]
            for got_feature, want_feature in zip(got.features, want.features, strict=True):
                np.testing.assert_allclose(
                    decode_feature(got_feature), decode_feature(want_feature), rtol=1e-4, atol=1e-5
                )
    # Both workers got connections, and /metrics is the sum of what they did
    sent = CHANNELS * len(images)
    per_worker = [images_served_by(pid) for pid in workers.worker_pids().values()]
    assert all(count > 0 for count in per_worker) and sum(per_worker) == sent
    assert workers.total("mist_extractor_images_served_total", status="ok") == sent
    assert (
        workers.total("mist_extractor_grpc_requests_total", method="/mist.v1.Extractor/Extract", code="OK") == CHANNELS
    )
    assert workers.total("mist_extractor_workers_alive") == 2
    assert (
        workers.total("mist_extractor_baseline_bytes_per_image", method="lst") == 17 * 32 * 4 * 5
    )  # T x D x 4 B x N+1
    assert workers.total("mist_extractor_cache_max_bytes") == 2 * tiny_config().cache_max_bytes  # one cache each
    assert workers.total("mist_extractor_streams_in_flight") == 0
    assert workers.total("mist_extractor_worker_restarts_total") == 0


def test_workers_start_with_one_malloc_arena(workers) -> None:
    """The supervisor limits glibc's arenas before spawning (services/common/serving/allocator.py): each worker reads
    MALLOC_ARENA_MAX at its start. An operator's own value would be kept."""
    expected = os.environ.get("MALLOC_ARENA_MAX", "1")
    for pid in workers.worker_pids().values():
        environment = Path(f"/proc/{pid}/environ").read_text().split("\0")
        assert f"MALLOC_ARENA_MAX={expected}" in environment


def test_a_killed_worker_fails_its_calls_fast_and_is_restarted(workers) -> None:
    # Prepare: four clients calling in a loop, each on connections of its own
    outcomes: list[tuple[grpc.StatusCode, float]] = []
    stop, lock = threading.Event(), threading.Lock()
    requests = [extract_request(f"load-{i}", png_image(400 + i), ks=(4,)) for i in range(4)]

    def client() -> None:
        while not stop.is_set():
            with grpc.insecure_channel(workers.process.target, options=SEPARATE_CONNECTIONS) as channel:
                started = time.monotonic()
                try:
                    extract(channel, requests)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()
                with lock:
                    outcomes.append((code, time.monotonic() - started))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    victim = workers.worker_pids()[0]
    served_before = workers.total("mist_extractor_images_served_total")

    # Execute: SIGKILL worker 0 while calls run
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(outcomes) >= 8, 30, "calls before the kill")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: workers.total("mist_extractor_worker_restarts_total") == 1, 30, "a restart")
        wait_for(lambda: workers.total("mist_extractor_workers_alive") == 2, 60, "two workers serving")
    finally:
        stop.set()
        for thread in threads:
            thread.join(CALL_TIMEOUT_S + 5)

    # Assert: every call ended OK or UNAVAILABLE, none near its deadline; the new worker serves
    assert not any(thread.is_alive() for thread in threads)
    codes = {code for code, _ in outcomes}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert max(duration for _, duration in outcomes) < CALL_TIMEOUT_S / 2
    assert workers.worker_pids()[0] != victim and pid_exists(workers.worker_pids()[0])
    with grpc.insecure_channel(workers.process.target) as channel:
        assert [r.item_id for r in extract(channel, requests)] == [r.item_id for r in requests]
    # The dead worker's counts stay in the totals (the counters never go back)
    assert workers.total("mist_extractor_images_served_total") >= served_before + len(requests)
    assert f"worker 0 (pid {victim}) exited (killed by SIGKILL)" in workers.process.log()


def test_sigterm_stops_the_supervisor_and_every_worker(workers) -> None:
    """Last: it ends the module's supervisor."""
    # Prepare
    pids = list(workers.worker_pids().values())

    # Execute
    code = workers.process.terminate(timeout_s=2 * CALL_TIMEOUT_S)  # workers drain, then exit (torch teardown)

    # Assert
    assert code == 0, workers.process.log()[-2000:]
    wait_for(lambda: not any(pid_exists(pid) for pid in pids), 10, "every worker gone")
    assert workers.process.log().count("mist-extractor stopped") == 3  # two workers, then the supervisor


# ---------------------------------------------------------------------------------------------- refusals


def test_a_port_held_without_so_reuseport_is_refused_at_once() -> None:
    # Prepare: another program listens on the port, without SO_REUSEPORT
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        # Execute
        supervisor = Supervisor("--listen", f"127.0.0.1:{port}")
        try:
            code = supervisor.process.wait(CALL_TIMEOUT_S)
        finally:
            supervisor.stop()

    # Assert: a clear error, no worker started
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port} (--listen / MIST_LISTEN)" in supervisor.process.log()
    assert "serving on" not in supervisor.process.log()


# ---------------------------------------------------------------------------------------------- restart policy


def test_restart_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(2)
    assert [policy.backoff_s(n) for n in (1, 2, 3, 4, 5, 6, 10)] == [0.5, 1, 2, 4, 8, MAX_BACKOFF_S, MAX_BACKOFF_S]


def test_more_restarts_than_allowed_within_the_window_is_a_crash_loop() -> None:
    # Prepare: 4 workers allow max(5, 4) = 5 restarts per 60 s
    policy = RestartPolicy(4)

    # Execute
    within = [policy.record_restart(float(t)) for t in range(5)]
    sixth = policy.record_restart(10.0)
    later = RestartPolicy(4)
    spread = [later.record_restart(t * 13.0) for t in range(20)]  # one every 13 s: never 6 in 60 s

    # Assert
    assert within == [True] * 5 and sixth is False
    assert all(spread)


def worker_children(pid: int) -> list[int]:
    """The spawned workers among `pid`'s children (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")]


@pytest.mark.stress
def test_workers_killed_in_a_loop_make_the_supervisor_exit_1() -> None:
    # Prepare
    supervisor = Supervisor()
    try:
        supervisor.process.wait_listening()

        # Execute: SIGKILL every worker process as soon as it appears
        deadline = time.monotonic() + 120
        while supervisor.process.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for pid in worker_children(supervisor.process.proc.pid):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        code = supervisor.process.wait(CALL_TIMEOUT_S)
    finally:
        supervisor.stop()

    # Assert
    assert code == 1
    assert "workers crash in a loop: more than 5 restarts within 60s" in supervisor.process.log()
