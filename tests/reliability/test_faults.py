"""Faults: SIGTERM to one of two extractor replicas under load (NOT_SERVING, in-flight work answered during the grace
period, new calls UNAVAILABLE, clients finish on the other replica), and an edge link that drops for seconds in the
middle of a stream (network namespaces joined by a veth pair; the client resumes without starting over).

Proven elsewhere (see README.md): SIGKILL of the extractor during a tune (tests/e2e/test_tune_predict.py), SIGKILL
of the registry in a loop during pushes (tests/integration/test_registry_service.py, test_registry_store.py), and a
tuner worker killed mid-job (tests/e2e/test_tuner_worker.py).
"""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.common import BackboneSpec, BenchError, BenchSkipped, child_env
from bench.netns import EdgeLink
from bench.servers import ServerProcess
from services.common.clients.channel import create_channel, health_check
from services.common.clients.extractor import ExtractorClient, ExtractResult, ImageItem
from services.common.pb import extractor_pb2, extractor_pb2_grpc
from services.common.wire.codec import decode_feature
from services.extractor.backbone import LoadedBackbone
from tests.conftest import TINY_VIT_KWARGS
from tests.helpers.extractor import (
    TINY_BACKBONE,
    ExtractorProcess,
    ExtractorServer,
    png_image,
    tiny_config,
)
from tests.helpers.process import ROOT
from tests.reliability import Scale, metric_value, reference_gathers, wait_for

K = 4  # the deepest gather of the tiny ViT
CODEC = "f32-none"  # lossless, so every answer can be compared with the in-process reference exactly
WINDOW = 4  # images in flight per stream: at most this many can ever need sending again
GRACE_S = 2.0  # the draining replica's --grace-s


def assert_features_are_references(
    results: list[ExtractResult], images: dict[str, bytes], backbone: LoadedBackbone
) -> None:
    """Every result succeeded and carries the gather of its own image."""
    assert [r.item_id for r in results if not r.ok] == []
    references = reference_gathers(backbone, [images[r.item_id] for r in results], (K,))
    for result, expected in zip(results, references, strict=True):
        np.testing.assert_allclose(decode_feature(result.features[0]), expected[K], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- SIGTERM


@dataclass
class Drain:
    """What the watcher saw of the draining replica after SIGTERM."""

    signalled_at: float = 0.0  # time.monotonic() of the SIGTERM
    not_serving_after_s: float = -1.0  # when health first said NOT_SERVING
    new_call_code: str = ""  # a new call to the draining replica itself, retries off
    retried_elsewhere: int = 0  # new calls through the two-replica client during the drain that succeeded
    exit_code: int | None = None
    exited_after_s: float = -1.0


@dataclass
class PacedStream:
    """One device's stream: its own images, sent one every `pace_s`, each result kept with the time it came."""

    index: int
    images: dict[str, bytes]  # item id -> PNG bytes, in sending order
    pace_s: float
    results: list[ExtractResult] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    failure: str = ""

    def items(self) -> Iterator[ImageItem]:
        for item_id, image in self.images.items():
            time.sleep(self.pace_s)  # a device reading its camera roll, not a burst
            yield ImageItem(item_id, image)

    def run(self, client: ExtractorClient) -> None:
        try:
            for result in client.extract(self.items(), ks=(K,), codec=CODEC, max_in_flight=WINDOW):
                self.results.append(result)
                self.received_at.append(time.monotonic())
        except Exception as error:  # noqa: BLE001 - reported by the test
            self.failure = f"{type(error).__name__}: {error}"

    def switches(self) -> int:
        """Times the answering replica changed (A answers without the cache, B from its warm cache)."""
        hits = [r.cache_hit for r in self.results]
        return sum(a != b for a, b in zip(hits, hits[1:], strict=False))


def watch_drain(process: ExtractorProcess, target: str, client: ExtractorClient, drain: Drain) -> None:
    """SIGTERM, then: when health says NOT_SERVING, what new calls get (directly, and through a client of both
    replicas, which retries UNAVAILABLE elsewhere), when the process exits."""
    drain.signalled_at = time.monotonic()
    process.proc.send_signal(signal.SIGTERM)
    wait_for(
        lambda: health_check(target, timeout_s=2) == "NOT_SERVING",
        timeout_s=GRACE_S,
        interval_s=0.005,
        what="NOT_SERVING",
    )
    drain.not_serving_after_s = time.monotonic() - drain.signalled_at
    with create_channel(target, retried_methods=()) as channel:
        try:
            extractor_pb2_grpc.ExtractorStub(channel).Describe(extractor_pb2.DescribeRequest(), timeout=5)
            drain.new_call_code = "OK"
        except grpc.RpcError as error:
            drain.new_call_code = error.code().name
    for _ in range(4):  # round-robin sends about half of these to the draining replica first
        drain.retried_elsewhere += client.describe(timeout_s=5).num_blocks == 4
    drain.exit_code = process.proc.wait(timeout=GRACE_S + 20)
    drain.exited_after_s = time.monotonic() - drain.signalled_at


def test_sigterm_under_load_drains_one_replica_and_clients_finish_on_the_other(
    scale: Scale, tiny_backbone: LoadedBackbone, figures
) -> None:
    # Prepare: replica A (a process, no cache) and replica B (in this process, cache warmed with every image, so
    # each answer says which replica gave it); one client whose target lists both (gRPC round-robin).
    replica_a = ExtractorProcess("--cache-max-bytes", "0", "--grace-s", str(GRACE_S))  # starts while we prepare
    replica_b = ExtractorServer(tiny_config(cache_max_bytes=64 << 20), backbone=tiny_backbone)
    # At least 4 streams (some start on each replica) of 120 images at 40 ms (longer than SIGTERM + grace).
    streams, per_stream = scale.pick(4, 16, at_least=4), scale.pick(120, 600, at_least=120)
    drain = Drain()
    try:
        plans = [
            PacedStream(
                s, {f"d{s}-{i}": png_image(20_000 + s * per_stream + i) for i in range(per_stream)}, pace_s=0.04
            )
            for s in range(streams)
        ]
        images = {item_id: image for plan in plans for item_id, image in plan.images.items()}
        replica_b.start()
        target_a, _ = replica_a.wait_listening(timeout_s=120)
        with ExtractorClient(replica_b.target) as warm:
            assert all(r.ok for r in warm.extract(images.items(), ks=(K,), codec=CODEC))
        served_b = replica_b.metric("mist_extractor_images_served_total", mode="mist", codec=CODEC, status="ok")
        both = f"ipv4:{target_a},{replica_b.target}"
        with ExtractorClient(both, resume_timeout_s=30) as client:
            for _ in range(4):  # connect to both replicas before the streams start
                client.describe()
            threads = [threading.Thread(target=plan.run, args=(client,)) for plan in plans]

            # Execute: SIGTERM to A once a quarter of the images are answered
            for thread in threads:
                thread.start()
            wait_for(
                lambda: sum(len(p.results) for p in plans) >= len(images) // 4,
                timeout_s=120,
                what="a quarter of the answers",
            )
            watch_drain(replica_a, target_a, client, drain)
            for thread in threads:
                thread.join(120)
        served_b = (
            replica_b.metric("mist_extractor_images_served_total", mode="mist", codec=CODEC, status="ok") - served_b
        )
    finally:
        replica_a.stop()
        replica_b.stop()

    # Assert: every stream got each of its images once, in order, with its own features, and no error
    from_a_during_grace = sum(
        1
        for p in plans
        for r, at in zip(p.results, p.received_at, strict=True)
        if not r.cache_hit and at > drain.signalled_at
    )
    from_b = sum(r.cache_hit for p in plans for r in p.results)
    last_from_a = max(
        at - drain.signalled_at
        for p in plans
        for r, at in zip(p.results, p.received_at, strict=True)
        if not r.cache_hit
    )
    resumed = sum(p.switches() > 0 for p in plans)
    figures.add(
        streams=streams,
        images=len(images),
        not_serving_after_ms=drain.not_serving_after_s * 1e3,
        new_call=drain.new_call_code,
        new_calls_retried_elsewhere=drain.retried_elsewhere,
        exited_after_s=drain.exited_after_s,
        exit_code=drain.exit_code,
        answered_by_a_during_grace=from_a_during_grace,
        last_answer_of_a_after_s=last_from_a,
        answered_by_b=from_b,
        streams_resumed_on_b=resumed,
    )
    assert [p.failure for p in plans] == [""] * streams
    assert [[r.item_id for r in p.results] for p in plans] == [list(p.images) for p in plans]
    assert_features_are_references([r for p in plans for r in p.results], images, tiny_backbone)
    # ... the drain: NOT_SERVING at once, new calls refused, in-flight streams answered until the grace ran out
    assert drain.not_serving_after_s < 1.0 and drain.new_call_code == "UNAVAILABLE" and drain.retried_elsewhere == 4
    assert drain.exit_code == 0 and drain.exited_after_s < GRACE_S + 8  # the rest is the process winding down
    assert from_a_during_grace > 0 and last_from_a < GRACE_S + 1.5  # nothing after the grace (1.5 s in transit)
    # ... and the streams cut at the end of the grace went on on B, which answered exactly what the clients kept
    assert resumed >= 1 and all(p.switches() <= 1 for p in plans)
    assert served_b == from_b


# ---------------------------------------------------------------------------------------------- link drop

# Runs in the client namespace: streams the PNGs of a directory through ExtractorClient, prints "answered N" per
# result, writes each ExtractResponse length-prefixed to OUT, then the server's /metrics text to OUT.metrics once
# the server has finished and counted every Extract call (none in flight; each one ended is in the request count).
_LINK_CLIENT = """
import struct, sys, time, urllib.request
from pathlib import Path
from prometheus_client.parser import text_string_to_metric_families
from services.common.clients.extractor import ExtractorClient
from services.common.pb import extractor_pb2
target, image_dir, out, metrics_url, pace_s, window, k = sys.argv[1:]
files = sorted(Path(image_dir).glob("*.png"))
def items():
    for path in files:
        time.sleep(float(pace_s))
        yield path.stem, path.read_bytes()
with ExtractorClient(target, resume_timeout_s=60, max_resumes=10) as client, open(out, "wb") as sink:
    results = client.extract(items(), ks=(int(k),), codec="f32-none", max_in_flight=int(window))
    for n, result in enumerate(results, 1):
        response = extractor_pb2.ExtractResponse(item_id=result.item_id, features=result.features)
        if result.error is not None:
            response.error.CopyFrom(result.error)
        data = response.SerializeToString()
        sink.write(struct.pack("<I", len(data)) + data)
        print("answered", n, flush=True)
EXTRACT = "/mist.v1.Extractor/Extract"
def extract_calls(text):
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("method") == EXTRACT:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values
deadline = time.monotonic() + 30
while True:  # the server ends a stream just after its last answer: wait for that, not for a fixed time
    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    calls = extract_calls(text)
    ended = calls.get("mist_extractor_grpc_requests_total", 0.0)
    if (calls.get("mist_extractor_grpc_requests_in_flight", 0.0) == 0 and ended >= 1
            and ended == calls.get("mist_extractor_grpc_request_duration_seconds_count")) or time.monotonic() > deadline:
        break
    time.sleep(0.05)
Path(out + ".metrics").write_text(text)
"""


def read_responses(path: Path) -> list[extractor_pb2.ExtractResponse]:
    data, responses, offset = path.read_bytes(), [], 0
    while offset < len(data):
        (size,) = struct.unpack_from("<I", data, offset)
        responses.append(extractor_pb2.ExtractResponse.FromString(data[offset + 4 : offset + 4 + size]))
        offset += 4 + size
    return responses


def count_answers(client: subprocess.Popen, answered: list[int]) -> None:
    """Keep answered[0] at the client's last "answered N" line."""
    for line in client.stdout:
        if line.startswith("answered"):
            answered[0] = int(line.split()[1])


@pytest.fixture
def edge_link() -> Iterator[EdgeLink]:
    try:
        link = EdgeLink.create()
    except BenchSkipped as reason:
        pytest.skip(f"link-drop test needs network namespaces: {reason}")
    try:
        yield link
    finally:
        link.close()


def set_link(link: EdgeLink, state: str) -> None:
    subprocess.run(
        [*link.exec_prefix("client"), "ip", "link", "set", link.devices["client"], state], check=True, timeout=20
    )


def test_a_link_that_drops_for_seconds_mid_stream_resumes_without_starting_over(
    scale: Scale, edge_link: EdgeLink, tiny_backbone: LoadedBackbone, tmp_path: Path, figures
) -> None:
    # Prepare: the extractor in the server namespace, pinging idle clients every 1.5 s (so a dead link is noticed
    # in about 2.5 s); the client in the client namespace; the images as files for it.
    total, drops, down_s = scale.pick(150, 1500), scale.pick(1, 3), 3.0
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    images = {f"{i:05d}": png_image(30_000 + i) for i in range(total)}
    for item_id, image in images.items():
        (image_dir / f"{item_id}.png").write_bytes(image)
    server = ServerProcess(
        BackboneSpec(TINY_BACKBONE, TINY_VIT_KWARGS),
        listen=f"{edge_link.server_address}:0",
        flags=[
            "--cache-max-bytes",
            "0",
            "--keepalive-time-s",
            "1.5",
            "--keepalive-timeout-s",
            "1",
            "--decode-threads",
            "1",
            "--torch-threads",
            "1",
        ],
        prefix=edge_link.exec_prefix("server"),
    )
    out = tmp_path / "responses.bin"
    client = None
    answered: list[int] = [0]
    try:
        try:
            server.start(timeout_s=180)
        except BenchError as error:
            pytest.fail(f"extractor in the server namespace did not start: {error}")
        client = subprocess.Popen(
            [
                *edge_link.exec_prefix("client"),
                sys.executable,
                "-c",
                _LINK_CLIENT,
                server.target,
                str(image_dir),
                str(out),
                server.metrics_url,
                "0.01",
                str(WINDOW),
                str(K),
            ],
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        reader = threading.Thread(target=count_answers, args=(client, answered), daemon=True)
        reader.start()

        # Execute: take the client's veth down for `down_s` seconds at evenly spaced points of the stream
        for drop in range(1, drops + 1):
            wait_for(
                lambda d=drop: answered[0] >= total * d // (drops + 1) or client.poll() is not None,
                timeout_s=120,
                what=f"answer {total * drop // (drops + 1)}",
            )
            set_link(edge_link, "down")
            time.sleep(down_s)
            set_link(edge_link, "up")
        client.wait(timeout=180)
        reader.join(10)
        stderr = client.stderr.read()
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        server.stop(grace_s=5)

    # Assert: one answer per image, in order, each its own image's; only unanswered images were sent again
    assert client.returncode == 0, stderr[-2000:]
    responses = read_responses(out)
    metrics = Path(f"{out}.metrics").read_text()
    served = metric_value(metrics, "mist_extractor_images_served_total", status="ok")
    streams_opened = metric_value(metrics, "mist_extractor_grpc_requests_total", method="/mist.v1.Extractor/Extract")
    figures.add(
        images=total,
        drops=drops,
        down_s=down_s,
        streams_opened=streams_opened,
        images_served=served,
        images_sent_again=served - total,
    )
    assert [r.item_id for r in responses] == list(images)
    assert_features_are_references(
        [ExtractResult(r.item_id, tuple(r.features), None, r.cache_hit) for r in responses], images, tiny_backbone
    )
    assert 0 <= served - total <= WINDOW * (streams_opened - 1)  # never more than the window per reconnection
