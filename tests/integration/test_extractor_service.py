"""The extractor as a real gRPC server on 127.0.0.1 port 0 with a tiny random ViT: features equal the in-process
gather, batching across streams, the cache, bad input, flow control, limits, Describe, SIGTERM drain of a real
process, and the blocking client library (order, per-item errors, resuming after a restart)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import urllib.request

import grpc
import numpy as np
import pytest

from services.common.clients.channel import create_aio_channel, health_check
from services.common.clients.extractor import ExtractorClient, ImageItem
from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.pb import extractor_pb2, extractor_pb2_grpc, feature_pb2
from services.common.wire.codec import DEFAULT_CODEC, decode_feature
from services.common.wire.gather_modes import baseline_bytes_per_image, last_block_indices
from services.extractor.backbone import LoadedBackbone
from tests.helpers.extractor import (
    ExtractorProcess,
    ExtractorServer,
    extract_request,
    huge_blank_png,
    load_tiny_backbone,
    png_image,
    reference_features,
    status_of,
    tiny_config,
    wait_until,
)

WINDOW = 8  # --max-items-in-flight of the shared server
MAX_STREAMS = 8
MAX_MESSAGE_BYTES = 1 << 20
MAX_IMAGE_BYTES = 256 << 10
NO_RETRY: tuple = ()


@pytest.fixture(scope="module")
def backbone() -> LoadedBackbone:
    return load_tiny_backbone()


@pytest.fixture(scope="module")
def server(backbone: LoadedBackbone):
    # A 50 ms queue delay lets one image from each of several streams meet in a batch even on a busy machine.
    config = tiny_config(
        max_batch_size=WINDOW,
        max_queue_delay_ms=50.0,
        max_items_in_flight=WINDOW,
        max_streams=MAX_STREAMS,
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_image_bytes=MAX_IMAGE_BYTES,
        cache_max_bytes=8 << 20,
    )
    with ExtractorServer(config, backbone=backbone) as running:
        yield running


async def extract_all(target: str, requests: list[extractor_pb2.ExtractRequest]) -> list[extractor_pb2.ExtractResponse]:
    async with create_aio_channel(target, retried_methods=NO_RETRY) as channel:
        return [r async for r in extractor_pb2_grpc.ExtractorStub(channel).Extract(iter(requests))]


def assert_still_serves(server: ExtractorServer, backbone: LoadedBackbone, seed: int) -> None:
    image = png_image(seed)
    [response] = asyncio.run(extract_all(server.target, [extract_request("check", image, ks=(2,))]))
    np.testing.assert_allclose(
        decode_feature(response.features[0]), reference_features(backbone, image, "mist", (2,))[2], rtol=1e-4, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------- features


def test_a_stream_with_mixed_k_and_codecs_returns_every_result_in_order_equal_to_gather(server, backbone) -> None:
    # Prepare
    ks_cycle = [(1,), (2, 4), (4, 1, 2), (3,)]
    codec_cycle = ["f32-none", "f16-zstd", "i8-zstd", "bf16-zstd", "f32-zstd", "i8o-zstd", "i4-zstd"]
    images = [png_image(100 + i) for i in range(14)]
    requests = [
        extract_request(f"img-{i}", image, ks=ks_cycle[i % 4], codec=codec_cycle[i % 7])
        for i, image in enumerate(images)
    ]

    # Execute
    responses = asyncio.run(extract_all(server.target, requests))

    # Assert
    assert [r.item_id for r in responses] == [f"img-{i}" for i in range(14)]
    for i, (image, response) in enumerate(zip(images, responses, strict=True)):
        ks, codec = ks_cycle[i % 4], codec_cycle[i % 7]
        expected = reference_features(backbone, image, "mist", ks)
        assert [f.k for f in response.features] == list(ks) and not response.HasField("error")
        for feature in response.features:
            assert (feature.backbone.name, feature.mode, tuple(feature.shape)) == (backbone.name, 1, (17, 32))
            decoded, reference = decode_feature(feature), expected[feature.k]
            if codec.startswith("f32"):
                np.testing.assert_allclose(decoded, reference, rtol=1e-4, atol=1e-5)
            elif codec in ("i8-zstd", "i8o-zstd"):  # per-row scale max|x| / 127: error at most half a step
                bound = np.abs(reference).max(axis=-1, keepdims=True) / 254 * 1.01 + 1e-5
                assert (np.abs(decoded - reference) <= bound).all()
            elif codec == "i4-zstd":  # per 32-value group, scale >= max|x| / 7: at most half a step
                bound = np.abs(reference).max(axis=-1, keepdims=True) / 14 * 1.01 + 1e-5
                assert (np.abs(decoded - reference) <= bound).all() and feature.group_size == 32
            else:  # f16 keeps 11 significant bits, bf16 8
                np.testing.assert_allclose(decoded, reference, rtol=2**-7, atol=1e-3)


def test_baseline_modes_send_their_documented_tensors(server, backbone) -> None:
    # Prepare: one stream mixing all four baselines (one forward per mode within a batch).
    image = png_image(150)
    modes = {
        "lst": feature_pb2.GATHER_MODE_LST,
        "last": feature_pb2.GATHER_MODE_LAST,
        "partial": feature_pb2.GATHER_MODE_PARTIAL,
        "cls": feature_pb2.GATHER_MODE_CLS,
    }
    requests = [extract_request(name, image, ks=(), mode=value) for name, value in modes.items()]

    # Execute
    responses = asyncio.run(extract_all(server.target, requests))

    # Assert
    shapes = {r.item_id: tuple(r.features[0].shape) for r in responses}
    assert shapes == {
        "lst": (5, 17, 32),
        "last": (len(last_block_indices(4)) + 1, 17, 32),
        "partial": (17, 32),
        "cls": (32,),
    }
    for response in responses:
        expected = reference_features(backbone, image, response.item_id)[0]
        assert response.features[0].k == 0
        np.testing.assert_allclose(decode_feature(response.features[0]), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("streams", [2, 8])
def test_concurrent_streams_share_batches_without_crossing_results(server, backbone, streams: int) -> None:
    # Prepare: one different image per stream, all written at once, so any batch of 2+ mixes streams.
    images = [png_image(200 + 10 * streams + s) for s in range(streams)]
    batches_before = server.metric("mist_extractor_batch_size_images_count")
    singles_before = server.metric("mist_extractor_batch_size_images_bucket", le="1.0")

    async def one_stream(channel: grpc.aio.Channel, index: int, go: asyncio.Event) -> extractor_pb2.ExtractResponse:
        call = extractor_pb2_grpc.ExtractorStub(channel).Extract()
        await go.wait()
        await call.write(extract_request(f"stream-{index}", images[index], ks=(3,)))
        await call.done_writing()
        [response] = [r async for r in call]
        return response

    open_before = server.metric("mist_extractor_streams_in_flight")

    async def scenario() -> list[extractor_pb2.ExtractResponse]:
        async with create_aio_channel(server.target, retried_methods=NO_RETRY) as channel:
            go = asyncio.Event()
            tasks = [asyncio.ensure_future(one_stream(channel, s, go)) for s in range(streams)]
            # every stream open on the server before any of them writes
            await asyncio.to_thread(
                wait_until, lambda: server.metric("mist_extractor_streams_in_flight") == open_before + streams
            )
            go.set()
            return await asyncio.gather(*tasks)

    # Execute
    responses = asyncio.run(scenario())

    # Assert
    batches = server.metric("mist_extractor_batch_size_images_count") - batches_before
    multi_image_batches = batches - (
        server.metric("mist_extractor_batch_size_images_bucket", le="1.0") - singles_before
    )
    assert multi_image_batches >= 1 and batches < streams
    for index, response in enumerate(responses):
        assert response.item_id == f"stream-{index}"
        expected = reference_features(backbone, images[index], "mist", (3,))[3]
        np.testing.assert_allclose(decode_feature(response.features[0]), expected, rtol=1e-4, atol=1e-5)


def test_a_repeated_request_is_served_from_the_cache_without_a_forward_pass(server) -> None:
    # Prepare
    requests = [extract_request(f"c{i}", png_image(300 + i), ks=(1, 4), codec="i8-zstd") for i in range(6)]
    first = asyncio.run(extract_all(server.target, requests))
    batches = server.metric("mist_extractor_batch_size_images_count")
    hits = server.metric("mist_extractor_cache_hits_total")

    # Execute
    second = asyncio.run(extract_all(server.target, requests))

    # Assert
    assert server.metric("mist_extractor_batch_size_images_count") == batches
    assert server.metric("mist_extractor_cache_hits_total") - hits == 6
    assert [r.cache_hit for r in first] == [False] * 6 and [r.cache_hit for r in second] == [True] * 6
    assert [[f.SerializeToString() for f in r.features] for r in second] == [
        [f.SerializeToString() for f in r.features] for r in first
    ]
    assert server.metric("mist_extractor_cache_bytes") > 0


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own warning; ours is the error
def test_bad_images_get_per_item_errors_and_the_stream_goes_on(server, backbone) -> None:
    # Prepare
    good = png_image(400)
    bad = {
        "corrupt": (good[: len(good) // 2], grpc.StatusCode.INVALID_ARGUMENT, "undecodable_image"),
        "empty": (b"", grpc.StatusCode.INVALID_ARGUMENT, "empty_image"),
        "huge": (huge_blank_png(), grpc.StatusCode.RESOURCE_EXHAUSTED, "image_too_large"),
        "heavy": (b"\x89PNG\r\n\x1a\n" + bytes(MAX_IMAGE_BYTES), grpc.StatusCode.RESOURCE_EXHAUSTED, "image_too_large"),
        "text": (b"name,label\ncat.jpg,3\n", grpc.StatusCode.INVALID_ARGUMENT, "undecodable_image"),
    }
    requests = [extract_request("first", good)] + [extract_request(name, data) for name, (data, _, _) in bad.items()]
    requests.append(extract_request("last", good))

    # Execute
    responses = asyncio.run(extract_all(server.target, requests))

    # Assert
    assert [r.item_id for r in responses] == ["first", *bad, "last"]
    for response in responses[1:-1]:
        _, code, reason = bad[response.item_id]
        assert (response.error.code, response.error.reason) == (code.value[0], reason) and not response.features
    assert "10,000x10,000" in responses[3].error.message or "10000x10000" in responses[3].error.message
    assert responses[0].features and responses[-1].features
    assert (
        server.metric("mist_extractor_images_served_total", mode="mist", codec="f32-none", status="image_too_large")
        >= 2
    )


@pytest.mark.parametrize(
    ("bad_request", "expected"),
    [
        (extract_request("bad", b"x", ks=(0,)), "k must be an integer in [1, 4]"),
        (extract_request("bad", b"x", ks=(5,)), "got 5"),
        (
            extractor_pb2.ExtractRequest(item_id="bad", image=b"x", ks=[2], codec=feature_pb2.CodecSpec(dtype=99)),
            "unknown CodecSpec.dtype enum value 99",
        ),
        (extract_request("bad", b"x", ks=(2,), mode=42), "unknown GatherMode value 42"),
    ],
    ids=["k=0", "k>N", "unknown-codec", "unknown-mode"],
)
def test_invalid_requests_end_the_stream_with_invalid_argument(server, backbone, bad_request, expected: str) -> None:
    # Prepare: a valid item first; its answer still arrives.
    requests = [extract_request("good", png_image(500)), bad_request, extract_request("after", png_image(501))]

    # Execute
    answered, code, details = status_of(server.target, requests)

    # Assert
    assert (answered, code) == (["good"], grpc.StatusCode.INVALID_ARGUMENT)
    assert details.startswith("item #1 (item_id 'bad'): ") and expected in details
    assert_still_serves(server, backbone, seed=502)


def test_a_different_expected_backbone_is_a_failed_precondition(server, backbone) -> None:
    other = feature_pb2.BackboneId(name=backbone.name, weights_fingerprint="f" * 64)

    answered, code, details = status_of(
        server.target,
        [
            extract_request("mine", png_image(510), expect_backbone=feature_pb2.BackboneId(name=backbone.name)),
            extract_request("theirs", png_image(511), expect_backbone=other),
        ],
    )

    assert (answered, code) == (["mine"], grpc.StatusCode.FAILED_PRECONDITION)
    assert backbone.weights_fingerprint in details
    assert_still_serves(server, backbone, seed=512)


def test_a_message_over_the_size_limit_is_resource_exhausted(server, backbone) -> None:
    oversized = extract_request("big", b"\x89PNG\r\n\x1a\n" + bytes(MAX_MESSAGE_BYTES))

    answered, code, details = status_of(server.target, [oversized])

    assert (answered, code) == ([], grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "larger than max" in details
    assert_still_serves(server, backbone, seed=520)


def test_streams_beyond_the_limit_are_resource_exhausted(server, backbone) -> None:
    async def scenario() -> tuple[grpc.StatusCode, str, float]:
        async with create_aio_channel(server.target, retried_methods=NO_RETRY) as channel:
            stub = extractor_pb2_grpc.ExtractorStub(channel)
            calls = [stub.Extract() for _ in range(MAX_STREAMS)]
            for i, call in enumerate(calls):  # each stream answered once, then left open
                await call.write(extract_request(f"s{i}", png_image(530)))
                await call.read()
            extra = stub.Extract()  # refused as it opens: nothing is written, so no write can race the status
            try:
                await extra.read()
            except grpc.aio.AioRpcError as error:
                outcome = error.code(), error.details()
            open_now = server.metric("mist_extractor_streams_in_flight")
            for call in calls:
                await call.done_writing()
                assert await call.read() == grpc.aio.EOF
            return (*outcome, open_now)

    code, details, open_now = asyncio.run(scenario())

    assert (code, open_now) == (grpc.StatusCode.RESOURCE_EXHAUSTED, MAX_STREAMS)
    assert f"already serves {MAX_STREAMS} streams" in details
    wait_until(lambda: server.metric("mist_extractor_streams_in_flight") == 0)
    assert_still_serves(server, backbone, seed=531)


def test_a_client_that_reads_nothing_cannot_grow_the_servers_work(server) -> None:
    # Prepare: a client with a fixed 64 KiB receive window (no BDP growth), like a small device; 500 images queued.
    images = [png_image(600 + i) for i in range(10)]
    received_before = server.metric("mist_extractor_image_bytes_received_total")
    image_bytes = sum(len(images[i % 10]) for i in range(500))

    async def scenario() -> tuple[float, float, list[str]]:
        async with grpc.aio.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)]) as channel:
            call = extractor_pb2_grpc.ExtractorStub(channel).Extract()

            async def send() -> None:
                for i in range(500):  # every k in f32: ~9 KB per answer fills the window in a few answers
                    await call.write(extract_request(f"i{i}", images[i % 10], ks=(1, 2, 3, 4)))
                await call.done_writing()

            sender = asyncio.ensure_future(send())
            peak, deadline = 0.0, time.monotonic() + 1.0
            while time.monotonic() < deadline:  # read nothing for a second, watching the server
                peak = max(peak, server.metric("mist_extractor_items_in_flight"))
                await asyncio.sleep(0.005)
            read_while_idle = server.metric("mist_extractor_image_bytes_received_total") - received_before
            ids = [r.item_id async for r in call]
            await sender
            return peak, read_while_idle, ids

    # Execute
    peak, read_while_idle, ids = asyncio.run(scenario())

    # Assert
    assert 1 <= peak <= WINDOW
    assert read_while_idle < image_bytes / 10  # it stopped reading after a few dozen of the 500 images
    assert ids == [f"i{i}" for i in range(500)]


def test_a_cancelled_stream_releases_its_slot_and_its_items(server, backbone) -> None:
    # Prepare
    requests = [extract_request(f"x{i}", png_image(650 + i), ks=(4,)) for i in range(WINDOW)]

    async def scenario() -> float:
        async with create_aio_channel(server.target, retried_methods=NO_RETRY) as channel:
            call = extractor_pb2_grpc.ExtractorStub(channel).Extract()
            for request in requests:
                await call.write(request)
            # The value the wait saw, not a second read: the tiny backbone may finish the window in between.
            seen: list[float] = []
            await asyncio.to_thread(
                wait_until, lambda: seen.append(server.metric("mist_extractor_items_in_flight")) or seen[-1] > 0
            )
            call.cancel()
            return seen[-1]

    # Execute
    in_flight_before_cancel = asyncio.run(scenario())

    # Assert
    assert in_flight_before_cancel >= 1
    wait_until(
        lambda: (
            server.metric("mist_extractor_items_in_flight") == 0
            and server.metric("mist_extractor_streams_in_flight") == 0
        )
    )
    assert_still_serves(server, backbone, seed=660)


# ---------------------------------------------------------------------------------------------- describe


def test_describe_reports_geometry_fingerprint_baselines_and_the_random_init_warning(server, backbone) -> None:
    with ExtractorClient(server.target) as client:
        info = client.describe()

    assert (info.backbone.name, info.backbone.weights_fingerprint) == (backbone.name, backbone.weights_fingerprint)
    assert (info.num_blocks, info.tokens, info.dims, info.num_prefix_tokens) == (4, 17, 32, 1)
    assert not info.pretrained and "RANDOMLY INITIALISED" in info.warning
    assert info.data_config.input_size == (3, 32, 32) and info.data_config.interpolation == "bicubic"
    baselines = info.baselines
    assert (
        baselines
        == baseline_bytes_per_image(backbone.geometry)
        == {
            "lst": 5 * 17 * 32 * 4,
            "last": 3 * 17 * 32 * 4,
            "partial": 17 * 32 * 4,
            "cls": 32 * 4,
            "mist_f32": 17 * 32 * 4,
        }
    )
    assert {m: server.metric("mist_extractor_baseline_bytes_per_image", method=m) for m in baselines} == baselines
    assert (info.max_image_bytes, info.max_image_pixels) == (MAX_IMAGE_BYTES, 40_000_000)


# ---------------------------------------------------------------------------------------------- client library


def test_the_client_library_returns_results_in_order_and_maps_errors(server, backbone) -> None:
    # Prepare
    items = [ImageItem(f"p{i}", png_image(700 + i)) for i in range(10)]
    items[4] = ImageItem("broken", b"not an image")

    # Execute
    with ExtractorClient(server.target) as client:
        results = list(
            client.extract(
                items,
                ks=(2, 3),
                codec="f16-zstd",
                max_in_flight=3,
                expect_backbone=feature_pb2.BackboneId(name=backbone.name),
            )
        )
        with pytest.raises(InvalidArgumentError) as bad_k:
            list(client.extract(items[:2], ks=(7,)))
        with pytest.raises(FailedPreconditionError):
            list(client.extract(items[:1], ks=(1,), expect_backbone=feature_pb2.BackboneId(name="vit_huge")))

    # Assert
    assert [r.item_id for r in results] == [item.item_id for item in items]
    assert [r.ok for r in results] == [i != 4 for i in range(10)]
    assert results[4].error.reason == "undecodable_image" and results[4].features == ()
    assert [f.k for f in results[0].features] == [2, 3]
    np.testing.assert_allclose(
        decode_feature(results[9].features[1]),
        reference_features(backbone, items[9].image, "mist", (3,))[3],
        rtol=2**-10,
        atol=1e-3,
    )
    assert "item #0" in str(bad_k.value) and "got 7" in str(bad_k.value)


def test_the_client_library_resumes_after_a_restart_without_resending_answered_items(backbone) -> None:
    # Prepare: a server of its own (no cache) that is stopped and replaced on the same port mid-stream.
    config = tiny_config(max_queue_delay_ms=5.0, cache_max_bytes=0)
    first = ExtractorServer(config, backbone=backbone).start()
    second = None
    items = [ImageItem(f"r{i}", png_image(800 + i)) for i in range(30)]
    results = []
    try:
        with ExtractorClient(first.target, resume_timeout_s=20.0) as client:
            # Execute
            for result in client.extract(items, ks=(4,), max_in_flight=4):
                results.append(result)
                if len(results) == 10:
                    first.stop()
                    second = ExtractorServer(config, backbone=backbone, port=first.port).start()
    finally:
        first.stop()
        if second is not None:
            second.stop()

    # Assert
    assert [r.item_id for r in results] == [item.item_id for item in items] and all(r.ok for r in results)
    served_by_second = second.metric(
        "mist_extractor_images_served_total", mode="mist", codec=DEFAULT_CODEC.name, status="ok"
    )
    assert 20 - 4 <= served_by_second <= 20  # the 10 answered images were not sent again
    expected = reference_features(backbone, items[29].image, "mist", (4,))[4]
    bound = np.abs(expected).max(axis=-1, keepdims=True) / 254 * 1.01 + 1e-5
    assert (np.abs(decode_feature(results[29].features[0]) - expected) <= bound).all()


# ---------------------------------------------------------------------------------------------- idle streams


@pytest.fixture(scope="module")
def impatient_server(backbone: LoadedBackbone):
    """A server that ends streams after 0.4 s without progress."""
    with ExtractorServer(tiny_config(stream_idle_timeout_s=0.4, cache_max_bytes=0), backbone=backbone) as running:
        yield running


def test_a_client_that_stops_reading_is_ended_after_the_idle_timeout_and_frees_its_slot(impatient_server) -> None:
    # Prepare: a 64 KiB receive window (no BDP growth) that a few f32 answers of every k fill
    images = [png_image(900 + i) for i in range(10)]
    ended_before = impatient_server.metric("mist_extractor_streams_ended_idle_total", waiting_for="response")

    def ended_idle() -> bool:  # the server ended this stream for an answer nobody reads, and freed its slot
        return (
            impatient_server.metric("mist_extractor_streams_ended_idle_total", waiting_for="response") > ended_before
            and impatient_server.metric("mist_extractor_streams_in_flight") == 0
        )

    async def scenario() -> tuple[grpc.StatusCode, int, float]:
        async with grpc.aio.insecure_channel(impatient_server.target, options=[("grpc.http2.bdp_probe", 0)]) as channel:
            call = extractor_pb2_grpc.ExtractorStub(channel).Extract()

            async def send() -> None:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    for i in range(300):
                        await call.write(extract_request(f"i{i}", images[i % 10], ks=(1, 2, 3, 4)))
                    await call.done_writing()

            sender = asyncio.ensure_future(send())
            started = time.monotonic()
            await asyncio.to_thread(wait_until, ended_idle)  # read nothing until the server gives up on us
            ended_after_s = time.monotonic() - started
            received = 0
            with contextlib.suppress(grpc.aio.AioRpcError):
                async for _ in call:
                    received += 1
            sender.cancel()
            return await call.code(), received, ended_after_s

    # Execute
    code, received, ended_after_s = asyncio.run(scenario())

    # Assert: what had been written before the stall still arrived, then the documented code; never before the
    # 0.4 s idle timeout had run out
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1 <= received < 300
    assert ended_after_s >= 0.4
    assert (
        impatient_server.metric("mist_extractor_streams_ended_idle_total", waiting_for="response") == ended_before + 1
    )
    assert_still_serves(impatient_server, impatient_server.backbone, seed=905)


def test_the_client_library_reopens_a_stream_the_server_ended_as_idle(impatient_server) -> None:
    # Prepare: items that trickle in; each after the server ended the stream, idle, waiting for it
    ended_before = impatient_server.metric("mist_extractor_streams_ended_idle_total", waiting_for="request")

    def ended_idle() -> float:
        return impatient_server.metric("mist_extractor_streams_ended_idle_total", waiting_for="request") - ended_before

    def trickle():
        for i in range(3):
            if i:
                wait_until(lambda i=i: ended_idle() >= i)
            yield ImageItem(f"t{i}", png_image(950 + i))

    # Execute
    with ExtractorClient(impatient_server.target) as client:
        results = list(client.extract(trickle(), ks=(2,), max_in_flight=1))

    # Assert: one result per image, all fine, although the server ended the stream in both gaps
    assert [(r.item_id, r.ok) for r in results] == [("t0", True), ("t1", True), ("t2", True)]
    assert ended_idle() >= 2


# ---------------------------------------------------------------------------------------------- SIGTERM


def scrape(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_sigterm_completes_in_flight_items_goes_not_serving_and_exits_0() -> None:
    # Prepare: a 1.5 s queue delay keeps six images waiting in the batcher when the signal arrives.
    process = ExtractorProcess("--max-queue-delay-ms", "1500", "--max-batch-size", "64", "--grace-s", "10")
    try:
        target, metrics_port = process.wait_listening()

        async def scenario() -> tuple[list[extractor_pb2.ExtractResponse], str]:
            async with create_aio_channel(target, retried_methods=NO_RETRY) as channel:
                call = extractor_pb2_grpc.ExtractorStub(channel).Extract()
                for i in range(6):
                    await call.write(extract_request(f"t{i}", png_image(900 + i), ks=(2,)))
                await asyncio.to_thread(
                    wait_until, lambda: "mist_extractor_items_in_flight 6.0" in scrape(metrics_port)
                )
                process.proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(wait_until, lambda: health_check(target) == "NOT_SERVING")
                health = health_check(target)
                await call.done_writing()
                return [r async for r in call], health

        # Execute
        responses, health = asyncio.run(scenario())
        exit_code = process.proc.wait(timeout=20)
    finally:
        process.stop()

    # Assert
    assert health == "NOT_SERVING"
    assert [r.item_id for r in responses] == [f"t{i}" for i in range(6)] and all(r.features for r in responses)
    assert exit_code == 0
    log = "\n".join(process.lines)
    assert "RANDOMLY INITIALISED" in log and "received SIGTERM" in log and "mist-extractor stopped" in log
