"""Load: many concurrent Extract streams against a real extractor process (zero errors, no cross-talk, flat memory,
p99 latency), and many concurrent pushers and pullers against a real registry process (no lost or duplicate
version, every pulled blob verified). Short runs in `make test`; `make stress` runs 64 streams for a minute and
32 pushers with 200 pullers.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from services.common.clients.channel import create_aio_channel
from services.common.clients.registry import RegistryClient
from services.common.config import DEFAULT_MAX_MESSAGE_BYTES
from services.common.errors import AbortedError, NotFoundError
from services.common.pb import extractor_pb2, extractor_pb2_grpc
from services.common.wire.codec import decode_feature
from services.extractor.backbone import LoadedBackbone
from services.registry.store import open_store
from tests.helpers.extractor import extract_request, png_image
from tests.helpers.registry import RegistryProcess, make_blob, task_proto
from tests.reliability import MiB, Scale, metric_value, percentile, reference_gathers, rss_bytes, scrape

KS = (1, 4)  # two gathers per image: the deepest (4 = N) and the shallowest
WINDOW = 4  # images in flight per stream, like a device with little memory
NO_RETRY: tuple = ()


# ---------------------------------------------------------------------------------------------- extractor load


@dataclass
class StreamLog:
    """What one stream saw: answered item ids in order, per-item latencies, and any mismatch or failure."""

    answered: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)  # item ids whose features were not their own image's
    failure: str = ""  # an RPC error or per-item error, if any


@dataclass(frozen=True)
class StreamPlan:
    """One stream's own images (no other stream sends them) and how long it keeps sending."""

    index: int
    images: list[bytes]  # sent round-robin
    count: int  # images to send; 0 = until `deadline`
    deadline: float  # time.monotonic() after which no new image is sent (count == 0)

    def item_ids(self) -> Iterator[str]:
        sent = 0
        while (self.count and sent < self.count) or (not self.count and time.monotonic() < self.deadline):
            yield f"s{self.index}-{sent}"
            sent += 1


def image_of(item_id: str, plans: list[StreamPlan]) -> bytes:
    stream, number = item_id[1:].split("-")
    images = plans[int(stream)].images
    return images[int(number) % len(images)]


def matches(response: extractor_pb2.ExtractResponse, expected: dict[int, np.ndarray]) -> bool:
    if response.HasField("error") or [f.k for f in response.features] != list(KS):
        return False
    return all(np.allclose(decode_feature(f), expected[f.k], rtol=1e-4, atol=1e-5) for f in response.features)


async def run_stream(
    target: str, plan: StreamPlan, plans: list[StreamPlan], references: dict[bytes, dict[int, np.ndarray]]
) -> StreamLog:
    """Send this stream's images with at most WINDOW unanswered; check every answer against its own reference."""
    log, window, sent_at = StreamLog(), asyncio.Semaphore(WINDOW), {}
    async with create_aio_channel(target, retried_methods=NO_RETRY) as channel:  # one connection per device
        call = extractor_pb2_grpc.ExtractorStub(channel).Extract()

        async def send() -> None:
            for item_id in plan.item_ids():
                await window.acquire()
                sent_at[item_id] = time.perf_counter()
                await call.write(extract_request(item_id, image_of(item_id, plans), ks=KS))
            await call.done_writing()

        sender = asyncio.ensure_future(send())
        try:
            async for response in call:
                log.latencies_s.append(time.perf_counter() - sent_at.pop(response.item_id))
                log.answered.append(response.item_id)
                if not matches(response, references[image_of(response.item_id, plans)]):
                    log.wrong.append(response.item_id)
                window.release()
            await sender
        except grpc.aio.AioRpcError as error:
            log.failure = f"{error.code().name}: {error.details()}"
            sender.cancel()
    return log


async def run_streams(
    target: str, plans: list[StreamPlan], references: dict[bytes, dict[int, np.ndarray]]
) -> list[StreamLog]:
    return await asyncio.gather(*(run_stream(target, plan, plans, references) for plan in plans))


def stream_plans(images: list[list[bytes]], count: int, duration_s: float) -> list[StreamPlan]:
    """One plan per stream over its own images: `count` of them, or (count 0) as many as `duration_s` allows."""
    deadline = time.monotonic() + duration_s
    return [StreamPlan(s, own, count, deadline) for s, own in enumerate(images)]


def test_concurrent_extract_streams_get_their_own_features_with_flat_server_memory(
    scale: Scale, shared_extractor, tiny_backbone: LoadedBackbone, figures
) -> None:
    # Prepare: every stream has its own images (so a crossed answer cannot match) and their in-process references.
    streams = scale.pick(16, 64)
    images_per_stream = 10
    duration_s = scale.seconds(0.0, 60.0)  # short: a fixed count; stress: a minute of traffic
    images = [[png_image(10_000 + s * images_per_stream + i) for i in range(images_per_stream)] for s in range(streams)]
    flat = [image for own in images for image in own]
    references = dict(zip(flat, reference_gathers(tiny_backbone, flat, KS), strict=True))
    warm_up = stream_plans(images, count=3, duration_s=0)  # threads, allocator arenas, batch shapes
    asyncio.run(run_streams(shared_extractor.target, warm_up, references))
    before = scrape(shared_extractor.metrics_url)
    rss_start = rss_bytes(shared_extractor.pid)

    # Execute
    started = time.perf_counter()
    plans = stream_plans(images, count=0 if scale.stress else images_per_stream, duration_s=duration_s)
    logs = asyncio.run(run_streams(shared_extractor.target, plans, references))
    elapsed_s = time.perf_counter() - started
    rss_end = rss_bytes(shared_extractor.pid)
    after = scrape(shared_extractor.metrics_url)

    # Assert: no failure, each stream got exactly its own ids in order, each feature its own image's
    answered = sum(len(log.answered) for log in logs)
    latencies = [s for log in logs for s in log.latencies_s]
    served = metric_value(after, "mist_extractor_images_served_total", status="ok") - metric_value(
        before, "mist_extractor_images_served_total", status="ok"
    )
    batches = metric_value(after, "mist_extractor_batch_size_images_count") - metric_value(
        before, "mist_extractor_batch_size_images_count"
    )
    figures.add(
        streams=streams,
        images=answered,
        seconds=round(elapsed_s, 1),
        images_per_s=answered / elapsed_s,
        p50_ms=percentile(latencies, 50) * 1e3,
        p99_ms=percentile(latencies, 99) * 1e3,
        max_ms=max(latencies) * 1e3,
        mean_batch=served / max(batches, 1),
        rss_start_mib=rss_start / MiB,
        rss_end_mib=rss_end / MiB,
    )
    assert [log.failure for log in logs] == [""] * streams
    assert [log.wrong for log in logs] == [[]] * streams
    for plan, log in zip(plans, logs, strict=True):
        assert log.answered == [f"s{plan.index}-{i}" for i in range(len(log.answered))]
        assert len(log.answered) >= (images_per_stream if not scale.stress else 1)
    assert served == answered  # the server counted each image once, none failed
    assert batches < answered  # answers of several streams shared forward passes
    # Flat memory: after warm-up, RSS ends within 64 MiB of where it started however many images went through
    # (measured +0.4 to +3.6 MiB short, +7.8 to +11.6 MiB over the 60 s stress run: 5.5x margin).
    assert rss_end - rss_start < 64 * MiB, (rss_start, rss_end)
    assert percentile(latencies, 99) < 30.0  # a generous ceiling: a stuck stream shows up here, not as a hang


# ---------------------------------------------------------------------------------------------- registry load


@dataclass
class RegistryLoad:
    """Shared state of the pushers and pullers: acknowledged versions, what pullers saw, and failures."""

    acked: dict[int, str] = field(default_factory=dict)  # version number -> sha256 of the blob we pushed
    pulled: list[tuple[int, str]] = field(default_factory=list)  # (number, sha256) of every verified pull
    push_latencies_s: list[float] = field(default_factory=list)
    pull_latencies_s: list[float] = field(default_factory=list)
    aborted: int = 0  # compare-and-set pushes that lost a race (nothing stored for them)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pushing_done: threading.Event = field(default_factory=threading.Event)
    first_acked: threading.Event = field(default_factory=threading.Event)  # some version was acknowledged


def device_client(target: str, device: int) -> RegistryClient:
    """A client on a connection of its own, as a separate device has.

    gRPC shares one connection among all channels of a process with the same target and arguments, so 232
    clients here would otherwise be 232 streams on one connection (the case the next test covers); a message
    limit differing by a few bytes per client (far above any message sent) keeps them apart.
    """
    return RegistryClient(target, timeout_s=60, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES - device)


def push_versions(target: str, pusher: int, pushes: int, load: RegistryLoad) -> None:
    """Every fourth pusher uses compare-and-set on the latest version (retrying on ABORTED), the others force."""
    compare_and_set = pusher % 4 == 0
    try:
        with device_client(target, pusher) as client:
            for i in range(pushes):
                blob = make_blob(pusher * 10_000 + i)
                while True:
                    parent = client.get_task("load").latest_version if compare_and_set else 0
                    started = time.perf_counter()
                    try:
                        version = client.push("load", blob, parent_version=parent, force=not compare_and_set)
                    except AbortedError:
                        with load.lock:
                            load.aborted += 1
                        continue
                    break
                with load.lock:
                    load.push_latencies_s.append(time.perf_counter() - started)
                    if version.number in load.acked:
                        load.failures.append(f"version {version.number} acknowledged twice")
                    load.acked[version.number] = hashlib.sha256(blob).hexdigest()
                    load.first_acked.set()
    except Exception as error:  # noqa: BLE001 - every failure is reported by the test, not lost in a thread
        with load.lock:
            load.failures.append(f"pusher {pusher}: {type(error).__name__}: {error}")


def pull_versions(target: str, puller: int, min_pulls: int, load: RegistryLoad) -> None:
    """Pull by number (a version already acknowledged) or latest until the pushers finish and min_pulls are done."""
    rng, done = random.Random(puller), 0
    try:
        with device_client(target, 1000 + puller) as client:
            while done < min_pulls or not load.pushing_done.is_set():
                with load.lock:
                    known = list(load.acked)
                number = rng.choice(known) if known and rng.random() < 0.7 else None
                started = time.perf_counter()
                try:
                    pulled = client.pull("load", version=number, use_cache=False)  # verifies size and sha256
                except NotFoundError:
                    if known:  # NOT_FOUND is expected only before anything was pushed
                        raise
                    load.first_acked.wait(60)  # nothing to pull before the first push
                    continue
                with load.lock:
                    load.pull_latencies_s.append(time.perf_counter() - started)
                    load.pulled.append((pulled.version.number, hashlib.sha256(pulled.blob).hexdigest()))
                done += 1
    except Exception as error:  # noqa: BLE001
        with load.lock:
            load.failures.append(f"puller {puller}: {type(error).__name__}: {error}")


def test_concurrent_pushers_and_pullers_lose_and_duplicate_no_version(scale: Scale, tmp_path: Path, figures) -> None:
    # Prepare
    pushers, pullers = scale.pick(8, 32), scale.pick(40, 200)
    pushes_each, pulls_each = scale.pick(5, 20), scale.pick(5, 20)
    url = f"sqlite:///{tmp_path}/registry.db"
    server = RegistryProcess.start(url, "--log-level", "warning")
    load = RegistryLoad()
    try:
        with RegistryClient(server.target) as admin:
            admin.create_task(task_proto("load"))
        rss_start = rss_bytes(server.proc.pid)
        threads = [
            threading.Thread(target=pull_versions, args=(server.target, i, pulls_each, load)) for i in range(pullers)
        ]
        push_threads = [
            threading.Thread(target=push_versions, args=(server.target, i, pushes_each, load)) for i in range(pushers)
        ]

        # Execute
        started = time.perf_counter()
        for thread in threads + push_threads:
            thread.start()
        for thread in push_threads:
            thread.join(600)
        load.pushing_done.set()
        for thread in threads:
            thread.join(600)
        elapsed_s = time.perf_counter() - started
        rss_end = rss_bytes(server.proc.pid)
        with RegistryClient(server.target) as reader:
            stored = {v.number: v.sha256 for v in reader.list_versions("load", page_size=1000)}
            latest = reader.get_task("load").latest_version
        exit_code = server.terminate()
    finally:
        server.kill()
    with open_store(url) as store:
        problems = store.integrity_check()

    # Assert
    figures.add(
        pushers=pushers,
        pullers=pullers,
        versions=len(stored),
        pulls=len(load.pulled),
        aborted_cas=load.aborted,
        seconds=round(elapsed_s, 1),
        push_p99_ms=percentile(load.push_latencies_s, 99) * 1e3,
        pull_p99_ms=percentile(load.pull_latencies_s, 99) * 1e3,
        rss_start_mib=rss_start / MiB,
        rss_end_mib=rss_end / MiB,
    )
    assert load.failures == []
    assert sorted(load.acked) == list(range(1, pushers * pushes_each + 1)) == sorted(stored)  # no gap, no duplicate
    assert stored == load.acked and latest == pushers * pushes_each  # each number holds the blob acknowledged for it
    assert len(load.pulled) >= pullers * pulls_each
    assert all(stored[number] == sha for number, sha in load.pulled)  # every pull returned that version's own bytes
    assert problems == [] and exit_code == 0
    assert rss_end - rss_start < max(64 * MiB, 0.5 * rss_start), (rss_start, rss_end)


def test_hundreds_of_clients_in_one_process_share_a_connection_and_none_is_refused(
    scale: Scale, tmp_path: Path, figures
) -> None:
    """gRPC Python multiplexes every channel of a process to one target over one connection: an application with
    many RegistryClients (a gateway, a worker pool) puts hundreds of streams on it at once. Pushes are not retried
    by the client (not idempotent), so a refused stream would surface as a lost push."""
    # Prepare: clients with default options (so: one shared connection), all released at once
    clients, rounds = scale.pick(240, 480), scale.pick(3, 20)
    server = RegistryProcess.start(f"sqlite:///{tmp_path}/registry.db", "--log-level", "warning")
    failures: list[str] = []
    acked: list[int] = []
    lock, start = threading.Lock(), threading.Barrier(clients)

    def push_and_pull(client_index: int) -> None:
        try:
            with RegistryClient(server.target, timeout_s=120) as client:
                client.get_task("shared")  # connected before the barrier
                start.wait(60)
                for i in range(rounds):
                    version = client.push("shared", make_blob(client_index * 1000 + i), parent_version=0, force=True)
                    client.pull("shared", version=version.number, use_cache=False)
                    with lock:
                        acked.append(version.number)
        except Exception as error:  # noqa: BLE001 - reported by the test
            with lock:
                failures.append(f"client {client_index}: {type(error).__name__}: {error}"[:300])

    try:
        with RegistryClient(server.target) as admin:
            admin.create_task(task_proto("shared"))
        threads = [threading.Thread(target=push_and_pull, args=(i,)) for i in range(clients)]

        # Execute
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        elapsed_s = time.perf_counter() - started
        with RegistryClient(server.target) as reader:
            latest = reader.get_task("shared").latest_version
    finally:
        server.kill()

    # Assert
    figures.add(
        clients=clients,
        pushes=len(acked),
        failures=len(failures),
        seconds=round(elapsed_s, 1),
        first_failure=failures[0] if failures else "",
    )
    assert failures == []
    assert sorted(acked) == list(range(1, clients * rounds + 1)) and latest == clients * rounds
