"""The extractor engine without gRPC: request validation, one forward per mode per batch, cache hits, per-item errors,
in-order streams with a bounded window, the stream limit, and the extractor's config rules."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.config import ConfigError, parse_config
from services.common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from services.common.pb import extractor_pb2, feature_pb2
from services.common.serving.metrics import new_metrics_registry
from services.common.wire.codec import CodecConfig, FeatureCodec, decode_feature
from services.common.wire.gather_modes import baseline_bytes_per_image
from services.extractor.backbone import LoadedBackbone, load_backbone
from services.extractor.config import ExtractorConfig
from services.extractor.engine import ExtractionEngine, Job, WorkItem
from services.extractor.gather import gather
from services.extractor.metrics import ExtractorMetrics
from services.extractor.preprocess import ImagePreprocessor
from tests.conftest import TINY_VIT_KWARGS
from tests.helpers.extractor import extract_request, load_tiny_backbone, png_image, reference_features, tiny_config

N_BLOCKS = 4  # the tiny ViT


@pytest.fixture(scope="module")
def backbone() -> LoadedBackbone:
    return load_tiny_backbone()


def run_with_engine(backbone: LoadedBackbone, scenario: Callable, **overrides: object):
    """Run `scenario(engine, metrics)` on a fresh event loop with a started engine; returns its result."""
    config = tiny_config(max_queue_delay_ms=overrides.pop("max_queue_delay_ms", 10.0), **overrides)

    async def main():
        registry = new_metrics_registry()
        metrics = ExtractorMetrics(registry)
        engine = ExtractionEngine(backbone, config, metrics)
        await engine.start()
        try:
            return await scenario(engine, registry)
        finally:
            await engine.close()

    return asyncio.run(main())


def sample(registry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (dict(ks=[0]), "k must be an integer in [1, 4]"),
        (dict(ks=[N_BLOCKS + 1]), "got 5"),
        (dict(ks=[]), "at least one k in [1, 4] is required"),
        (dict(mode=feature_pb2.GATHER_MODE_CLS, ks=[2]), "gather mode 'cls' takes no k"),
        (dict(mode=42), "unknown GatherMode value 42"),
        (dict(codec=feature_pb2.CodecSpec(dtype=99)), "unknown CodecSpec.dtype enum value 99"),
        (dict(codec=feature_pb2.CodecSpec(dtype=feature_pb2.DTYPE_F16, zstd_level=30)), "zstd level"),
    ],
)
def test_invalid_requests_raise_invalid_argument_naming_the_item(backbone, fields: dict, expected: str) -> None:
    # Prepare
    engine = ExtractionEngine(backbone, tiny_config(), ExtractorMetrics(new_metrics_registry()))
    request = extractor_pb2.ExtractRequest(item_id="cat-7", image=b"x", mode=1, ks=[2])
    for name, value in fields.items():
        if name == "codec":
            request.codec.CopyFrom(value)
        elif name == "ks":
            del request.ks[:]
            request.ks.extend(value)
        else:
            setattr(request, name, value)

    # Execute
    with pytest.raises(InvalidArgumentError) as caught:
        engine.validate(request, 3)

    # Assert
    assert str(caught.value).startswith("item #3 (item_id 'cat-7'): ")
    assert expected in str(caught.value)


def test_a_valid_request_keeps_repeated_ks_and_defaults_unset_fields(backbone) -> None:
    engine = ExtractionEngine(backbone, tiny_config(), ExtractorMetrics(new_metrics_registry()))
    request = extractor_pb2.ExtractRequest(item_id="a", image=b"img", ks=[3, 1, 3])  # mode and codec unset

    item = engine.validate(request, 0)

    assert (item.mode, item.ks, item.unique_ks, item.codec.name) == ("mist", (3, 1, 3), (3, 1), "i8o-zstd")
    baseline = engine.validate(extractor_pb2.ExtractRequest(mode=feature_pb2.GATHER_MODE_LST), 1)
    assert (baseline.mode, baseline.ks) == ("lst", (0,))


def test_expect_backbone_must_match_the_loaded_weights(backbone) -> None:
    # Prepare
    engine = ExtractionEngine(backbone, tiny_config(), ExtractorMetrics(new_metrics_registry()))
    ours = engine.backbone_id
    other_weights = feature_pb2.BackboneId(name=ours.name, weights_fingerprint="0" * 64)

    # Execute
    with pytest.raises(FailedPreconditionError) as caught:
        engine.validate(extract_request("a", b"img", expect_backbone=other_weights), 0)
    same_name_only = engine.validate(
        extract_request("b", b"img", expect_backbone=feature_pb2.BackboneId(name=ours.name)), 1
    )

    # Assert
    assert "item #0 (item_id 'a')" in str(caught.value) and ours.weights_fingerprint in str(caught.value)
    assert same_name_only.item_id == "b"


def test_describe_reports_geometry_and_baseline_costs(backbone) -> None:
    info = ExtractionEngine(backbone, tiny_config(), ExtractorMetrics(new_metrics_registry())).describe()

    assert (info.num_blocks, info.tokens, info.dims, info.num_prefix_tokens) == (4, 17, 32, 1)
    assert {b.method: b.bytes_per_image for b in info.baselines} == baseline_bytes_per_image(backbone.geometry)
    assert list(info.data_config.input_size) == [3, 32, 32] and not info.pretrained and "RANDOM" in info.warning


# ---------------------------------------------------------------------------------------------- batches


def batch_job(index: int, image: bytes, mode: str, ks: Sequence[int], codec: str) -> Job:
    item = WorkItem(
        index=index, item_id=f"img-{index}", image=image, mode=mode, ks=tuple(ks), codec=CodecConfig.parse(codec)
    )
    return Job(item, digest="", admitted_at=0.0)


def test_a_batch_mixing_modes_runs_one_forward_per_mode_and_matches_gather(backbone) -> None:
    # Prepare: three mist images with different ks (one pass to k=4 serves all) and baselines, mixed codecs
    # (cls gives one vector per image: its int8 scale is a single value).
    images = [png_image(seed) for seed in range(7)]
    specs = [
        ("mist", (1,), "f32-none"),
        ("mist", (2, 4), "i8-zstd"),
        ("cls", (0,), "f32-none"),
        ("mist", (3,), "i8-zstd"),
        ("partial", (0,), "f16-zstd"),
        ("cls", (0,), "i8-none"),
        ("partial", (0,), "i8-zstd"),
    ]
    jobs = [batch_job(i, image, *spec) for i, (image, spec) in enumerate(zip(images, specs, strict=True))]
    registry = new_metrics_registry()
    engine = ExtractionEngine(backbone, tiny_config(), ExtractorMetrics(registry))

    # Execute
    answers = engine.run_batch(jobs)

    # Assert
    assert sample(registry, "mist_extractor_forward_passes_total", mode="mist") == 1
    assert sample(registry, "mist_extractor_forward_passes_total", mode="cls") == 1
    assert sample(registry, "mist_extractor_forward_passes_total", mode="partial") == 1
    for image, (mode, ks, codec), answer in zip(images, specs, answers, strict=True):
        expected = reference_features(backbone, image, mode, ks)
        assert [feature.k for feature in answer.features] == list(ks)
        for feature in answer.features:
            decoded, reference = decode_feature(feature), expected[feature.k]
            # i8: within one quantization step of the row (the reference is a batch of one: last-bit differences)
            step = np.abs(reference).max(axis=-1, keepdims=True) / 127 * 1.01 if codec.startswith("i8") else 2e-3
            assert np.all(np.abs(decoded - reference) <= step + 1e-5)
    assert list(answers[2].features[0].shape) == [32] and list(answers[4].features[0].shape) == [17, 32]


def test_device_quantized_answers_are_the_bytes_the_codec_writes_for_the_same_floats(backbone) -> None:
    # Prepare: the same image twice in one batch, once as float32 and once as i8: the same forward rows
    image = png_image(7)
    jobs = [batch_job(0, image, "mist", (2, 4), "f32-none"), batch_job(1, image, "mist", (4, 2), "i8-zstd")]
    engine = ExtractionEngine(backbone, tiny_config(), ExtractorMetrics(new_metrics_registry()))

    # Execute
    floats, quantized = engine.run_batch(jobs)

    # Assert
    codec = FeatureCodec(CodecConfig.parse("i8-zstd"))
    by_k = {feature.k: decode_feature(feature) for feature in floats.features}
    for feature in quantized.features:
        expected = codec.encode(by_k[feature.k], backbone=engine.backbone_id, mode=feature.mode, k=feature.k)
        assert feature.SerializeToString() == expected.SerializeToString()


def jpeg_image(seed: int, size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png_image(seed, size))).convert("RGB").save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def test_the_device_decode_route_answers_jpegs_close_to_timm_and_other_formats_exactly(backbone) -> None:
    # Prepare: --image-decode cuda sends JPEGs through load_on_device; on this CPU-only machine the same route runs
    # with torchvision's CPU decoder (the config refuses cuda decoding without a GPU, so it is switched on here).
    engine = ExtractionEngine(backbone, tiny_config(resize="pillow"), ExtractorMetrics(new_metrics_registry()))
    engine._decode_on = torch.device("cpu")
    images = [jpeg_image(90), png_image(91)]
    jobs = [batch_job(i, image, "mist", (4,), "f32-none") for i, image in enumerate(images)]

    # Execute
    jpeg_answer, png_answer = engine.run_batch(jobs)

    # Assert: the JPEG within the device path's tolerance of timm; the PNG takes the host path, exactly
    pillow = ImagePreprocessor(backbone.data_config, resize="pillow")

    def timm_features(image: bytes) -> np.ndarray:
        with torch.inference_mode():
            return gather(backbone.model, pillow.decode(image)[None], "mist", (4,))[4][0].numpy()

    jpeg_features, png_features = decode_feature(jpeg_answer.features[0]), decode_feature(png_answer.features[0])
    np.testing.assert_allclose(png_features, timm_features(images[1]), rtol=1e-4, atol=1e-5)
    relative = np.abs(jpeg_features - timm_features(images[0])).max() / np.abs(timm_features(images[0])).max()
    assert 0 < relative < 0.05


def test_bf16_precision_serves_features_close_to_fp32() -> None:
    # Prepare: the same tiny weights at two precisions
    fp32 = load_tiny_backbone()
    bf16 = load_backbone(fp32.name, precision="bf16", model_kwargs=TINY_VIT_KWARGS)
    jobs = lambda: [batch_job(i, png_image(100 + i), "mist", (1, 4), "f32-none") for i in range(3)]  # noqa: E731

    # Execute
    answers = {
        name: ExtractionEngine(loaded, tiny_config(), ExtractorMetrics(new_metrics_registry())).run_batch(jobs())
        for name, loaded in (("fp32", fp32), ("bf16", bf16))
    }

    # Assert: float32 on the wire either way, differing by bfloat16's rounding (8 bits of mantissa), not more
    for reference, reduced in zip(answers["fp32"], answers["bf16"], strict=True):
        for a, b in zip(reference.features, reduced.features, strict=True):
            exact, approximate = decode_feature(a), decode_feature(b)
            relative = np.abs(exact - approximate).max() / np.abs(exact).max()
            assert 0 < relative < 0.05, relative


# ---------------------------------------------------------------------------------------------- one image


def work_item(index: int, image: bytes, ks: Sequence[int] = (2,), codec: str = "f32-none") -> WorkItem:
    return WorkItem(
        index=index, item_id=f"img-{index}", image=image, mode="mist", ks=tuple(ks), codec=CodecConfig.parse(codec)
    )


def test_a_cached_image_skips_decode_and_forward_and_returns_the_same_bytes(backbone) -> None:
    image = png_image(11)

    async def scenario(engine: ExtractionEngine, registry):
        first = await engine.extract(work_item(0, image, ks=(1, 3)))
        batches_after_first = sample(registry, "mist_extractor_batch_size_images_count")
        second = await engine.extract(work_item(1, image, ks=(3, 1)))
        partly_cached = await engine.extract(work_item(2, image, ks=(1, 2)))  # k=2 is new: a full miss
        return (
            first,
            second,
            partly_cached,
            batches_after_first,
            sample(registry, "mist_extractor_batch_size_images_count"),
        )

    first, second, partly, batches_mid, batches_end = run_with_engine(backbone, scenario)

    assert (first.cache_hit, second.cache_hit, partly.cache_hit) == (False, True, False)
    assert [f.k for f in second.features] == [3, 1]
    assert second.features[0].SerializeToString() == first.features[1].SerializeToString()
    assert (batches_mid, batches_end) == (1, 2)  # the hit ran no batch; the partial hit did


def test_bad_images_and_unencodable_features_are_per_item_errors(backbone) -> None:
    # Prepare: huge activations (pos_embed filled with 1e5) overflow float16 but not float32.
    loud = load_tiny_backbone(seed=1)
    loud.model.pos_embed.data.fill_(1e5)
    image = png_image(3)

    async def scenario(engine: ExtractionEngine, registry):
        return [
            await engine.extract(work_item(i, data, codec=codec))
            for i, (data, codec) in enumerate(
                [(b"", "f32-none"), (b"GIF89a...", "f32-none"), (image, "f16-zstd"), (image, "f32-none")]
            )
        ]

    empty, gif, f16, f32 = run_with_engine(loud, scenario)

    assert (empty.error.code, empty.error.reason) == (3, "empty_image")
    assert (gif.error.code, gif.error.reason) == (3, "unsupported_format")
    assert (f16.error.code, f16.error.reason) == (3, "unencodable_features")
    assert "beyond float16's range" in f16.error.message
    assert not f32.HasField("error") and decode_feature(f32.features[0]).max() > 65504


def test_a_batch_decoded_over_two_threads_answers_like_one_thread(backbone, monkeypatch) -> None:
    # Prepare: two decode threads each take a strided share of the batch and resize their same-sized images
    # together; a bad image and several sizes among them. The hand-off threshold is lowered so the batch splits.
    monkeypatch.setattr("services.extractor.engine._BYTES_PER_THREAD", 1)
    images = [png_image(40 + i, size) for i, size in enumerate([32, 48, 48, 40, 32, 48, 40, 32])]
    images[5] = b"\x89PNG\r\n\x1a\n broken"
    jobs = lambda: [batch_job(i, image, "mist", (2, 4), "i8o-zstd") for i, image in enumerate(images)]  # noqa: E731
    split = ExtractionEngine(backbone, tiny_config(decode_threads=2), ExtractorMetrics(new_metrics_registry()))
    alone = ExtractionEngine(backbone, tiny_config(decode_threads=1), ExtractorMetrics(new_metrics_registry()))
    per_image = ImagePreprocessor(backbone.data_config, resize="torch")
    decoded_in: set[str] = set()
    load_many = ImagePreprocessor.load_uint8_many

    def recording(self, chunk):
        decoded_in.add(threading.current_thread().name)
        return load_many(self, chunk)

    monkeypatch.setattr(ImagePreprocessor, "load_uint8_many", recording)

    # Execute
    try:
        answers, reference = split.run_batch(jobs()), alone.run_batch(jobs())
    finally:
        split._workers.shutdown(wait=True)
        alone._workers.shutdown(wait=True)

    # Assert: two threads decoded; every answer is the single thread's, byte for byte, the bad image in its slot
    assert len(decoded_in) == 2
    assert [a.error.reason for a in answers] == [""] * 5 + ["undecodable_image"] + [""] * 2
    assert [a.SerializeToString() for a in answers] == [a.SerializeToString() for a in reference]
    assert answers[5].error.message == "cannot read the PNG header: Pillow does not recognise it as PNG"
    for answer, image in zip(answers, images, strict=True):
        if not answer.HasField("error"):  # and the features are those of the image decoded on its own
            pixels = per_image.normalize(per_image.load_uint8(image)[None])
            with torch.inference_mode():
                expected = gather(backbone.model, pixels, "mist", (2, 4))
            np.testing.assert_allclose(decode_feature(answer.features[1]), expected[4][0].numpy(), atol=0.05)


# ---------------------------------------------------------------------------------------------- streams


async def requests_of(
    items: Sequence[extractor_pb2.ExtractRequest], pulled: list[int]
) -> AsyncIterator[extractor_pb2.ExtractRequest]:
    for item in items:
        pulled[0] += 1
        yield item


def test_a_stream_answers_in_order_even_when_later_items_finish_first(backbone) -> None:
    # Prepare: item 0 needs a forward (slow: 200 ms batch delay), items 1-3 are cache hits (fast).
    cached = png_image(20)
    items = [extract_request("miss", png_image(21))] + [extract_request(f"hit-{i}", cached) for i in range(3)]

    async def scenario(engine: ExtractionEngine, registry):
        await engine.extract(work_item(0, cached, ks=(4,)))  # warm the cache
        return [r async for r in engine.run_stream(requests_of(items, [0]))]

    responses = run_with_engine(backbone, scenario, max_queue_delay_ms=200.0)

    assert [r.item_id for r in responses] == ["miss", "hit-0", "hit-1", "hit-2"]
    assert [r.cache_hit for r in responses] == [False, True, True, True]


def test_a_stream_reads_no_further_than_its_window_while_the_reader_waits(backbone) -> None:
    # Prepare
    window, pulled = 4, [0]
    items = [extract_request(f"i{i}", png_image(30 + i % 5)) for i in range(40)]

    async def scenario(engine: ExtractionEngine, registry):
        stream = engine.run_stream(requests_of(items, pulled))
        first = await anext(stream)
        await asyncio.sleep(0.3)  # the consumer is slow: the engine must not read ahead
        pulled_while_waiting, in_flight = pulled[0], sample(registry, "mist_extractor_items_in_flight")
        rest = [r async for r in stream]
        return first, rest, pulled_while_waiting, in_flight, sample(registry, "mist_extractor_items_in_flight")

    first, rest, pulled_while_waiting, in_flight, in_flight_after = run_with_engine(
        backbone, scenario, max_items_in_flight=window, cache_max_bytes=0
    )

    assert pulled_while_waiting <= window and in_flight <= window - 1
    assert [r.item_id for r in [first, *rest]] == [f"i{i}" for i in range(40)]
    assert in_flight_after == 0


def test_an_invalid_request_ends_the_stream_after_the_answers_before_it(backbone) -> None:
    items = [
        extract_request("ok-0", png_image(40)),
        extract_request("ok-1", png_image(41)),
        extract_request("bad", png_image(42), ks=[9]),
        extract_request("never", png_image(43)),
    ]
    answered: list[str] = []

    async def scenario(engine: ExtractionEngine, registry):
        with pytest.raises(InvalidArgumentError) as caught:
            async for response in engine.run_stream(requests_of(items, [0])):
                answered.append(response.item_id)
        return caught.value

    error = run_with_engine(backbone, scenario)

    assert answered == ["ok-0", "ok-1"]
    assert str(error).startswith("item #2 (item_id 'bad'): k must be an integer in [1, 4]")


def test_streams_beyond_the_limit_are_refused_and_slots_are_released(backbone) -> None:
    async def scenario(engine: ExtractionEngine, registry):
        open_streams = [
            engine.run_stream(requests_of([extract_request(f"s{i}", png_image(50))], [0])) for i in range(2)
        ]
        firsts = [await anext(stream) for stream in open_streams]
        with pytest.raises(ResourceExhaustedError) as caught:
            await anext(engine.run_stream(requests_of([], [0])))
        gauge_full = sample(registry, "mist_extractor_streams_in_flight")
        for stream in open_streams:
            await stream.aclose()
        after = [r.item_id async for r in engine.run_stream(requests_of([extract_request("x", png_image(51))], [0]))]
        return firsts, caught.value, gauge_full, after, sample(registry, "mist_extractor_streams_in_flight")

    firsts, error, gauge_full, after, gauge_end = run_with_engine(backbone, scenario, max_streams=2)

    assert [r.item_id for r in firsts] == ["s0", "s1"]
    assert "already serves 2 streams (--max-streams 2)" in str(error)
    assert (gauge_full, after, gauge_end) == (2, ["x"], 0)


async def pausing_requests(
    items: Sequence[extractor_pb2.ExtractRequest],
    pause_s: float,
) -> AsyncIterator[extractor_pb2.ExtractRequest]:
    """The first item at once, each next one after `pause_s` (a client with nothing to send for a while)."""
    for i, item in enumerate(items):
        if i:
            await asyncio.sleep(pause_s)
        yield item


def test_a_stream_with_nothing_in_progress_and_no_request_ends_after_the_idle_timeout(backbone) -> None:
    # Prepare: the client answers its first image, then sends nothing for 0.6 s; the idle timeout is 0.25 s
    items = [extract_request("a", png_image(60)), extract_request("b", png_image(61))]

    async def scenario(engine: ExtractionEngine, registry):
        answered: list[str] = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DeadlineExceededError) as caught:
            async for response in engine.run_stream(pausing_requests(items, 0.6)):
                answered.append(response.item_id)
        return (
            answered,
            caught.value,
            loop.time() - started,
            sample(registry, "mist_extractor_streams_in_flight"),
            sample(registry, "mist_extractor_streams_ended_idle_total", waiting_for="request"),
        )

    answered, error, took_s, streams_left, ended = run_with_engine(backbone, scenario, stream_idle_timeout_s=0.25)

    assert answered == ["a"]
    assert "after 0.25s without progress: no request arrived while nothing was in progress" in str(error)
    assert 0.25 <= took_s < 0.6  # ended by the timeout, not by the late request
    assert (streams_left, ended) == (0, 1)


def test_slow_work_in_progress_never_counts_as_idle(backbone) -> None:
    # Prepare: every forward waits 0.5 s for its batch to fill, twice the idle timeout; pauses below the timeout
    items = [extract_request(f"i{i}", png_image(70 + i)) for i in range(3)]

    async def scenario(engine: ExtractionEngine, registry):
        answered = [r.item_id async for r in engine.run_stream(pausing_requests(items, 0.1))]
        return (
            answered,
            sample(registry, "mist_extractor_streams_ended_idle_total", waiting_for="request"),
            sample(registry, "mist_extractor_image_latency_seconds_count"),
            sample(registry, "mist_extractor_image_latency_seconds_sum"),
        )

    answered, ended, timed, latency_sum = run_with_engine(
        backbone, scenario, stream_idle_timeout_s=0.25, max_queue_delay_ms=500.0, cache_max_bytes=0
    )

    assert (answered, ended) == (["i0", "i1", "i2"], 0)
    assert timed == 3 and latency_sum >= 0.25  # every image timed; the waits for a batch are in it


def test_an_idle_timeout_of_zero_lets_a_stream_wait_for_its_client(backbone) -> None:
    items = [extract_request("a", png_image(80)), extract_request("b", png_image(81))]

    async def scenario(engine: ExtractionEngine, registry):
        return [r.item_id async for r in engine.run_stream(pausing_requests(items, 0.3))]

    assert run_with_engine(backbone, scenario, stream_idle_timeout_s=0.0) == ["a", "b"]


# ---------------------------------------------------------------------------------------------- config


def test_config_reads_flags_and_environment_and_resolves_automatic_values() -> None:
    config = parse_config(
        ExtractorConfig,
        ["--max-streams", "3", "--max-items-in-flight", "5", "--max-batch-size", "8", "--model-kwargs", '{"depth": 2}'],
        {"MIST_DECODE_THREADS": "2"},
    )

    assert (config.queue_items, config.worker_threads, config.model_kwargs_dict) == (15, 2, {"depth": 2})
    assert config.forward_threads >= 1 and config.max_image_bytes < config.max_message_bytes


@pytest.mark.parametrize(
    ("argv", "field", "problem"),
    [
        (["--model-kwargs", "{depth: 2}"], "model_kwargs", "not valid JSON"),
        (["--model-kwargs", "[1, 2]"], "model_kwargs", "expected a JSON object"),
        (["--precision", "fp16"], "precision", "fp16 needs --device cuda"),
        (["--image-decode", "cuda"], "image_decode", "cuda needs --device cuda"),
        (["--workers", "0"], "workers", "must be >= 1"),
        (["--max-queue-items", "4", "--max-batch-size", "8"], "max_queue_items", "at least --max-batch-size"),
        (["--max-image-bytes", str(16 * 2**20)], "max_image_bytes", "below --max-message-bytes"),
        (["--max-batch-size", "0"], "max_batch_size", "must be >= 1"),
    ],
)
def test_bad_config_values_fail_at_start_naming_the_flag(argv: list[str], field: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(ExtractorConfig, argv, {})

    assert caught.value.field == field and problem in str(caught.value)
