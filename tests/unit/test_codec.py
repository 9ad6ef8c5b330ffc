"""The feature wire codec (services.common.wire.codec): configs, round trips, sizes, hostile messages, threads.

Run with `-s` to see the bytes per [197, 768] tensor and the error of each codec.
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import zstandard
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from services.common.errors import DataLossError, InvalidArgumentError
from services.common.pb import feature_pb2
from services.common.wire.codec import (
    ALL_CODECS,
    DEFAULT_CODEC,
    DEFAULT_MAX_ELEMENTS,
    CodecConfig,
    FeatureCodec,
    FeatureDecodeError,
    decode_feature,
    encoded_nbytes,
    float32_nbytes,
)

VIT_B16_SHAPE = (197, 768)  # MIST feature of ViT-B/16 at 224 px
BUDGET_BYTES = 157_286  # 0.15 MiB: the product target for the default codec per image
# Worst-case error of each lossy codec relative to the row's max |x| (ulp / 2 of the format, 1/254 for i8).
REL_ERROR_BOUND = {"f16": 2.0**-11, "bf16": 2.0**-8, "i8": 1 / 254 + 1e-6}
# Absolute slack for tiny values: f16 subnormal spacing / 2, float32 subnormals, i8 rows stored as zeros.
ABS_ERROR_SLACK = {"f32": 0.0, "f16": 2.0**-25, "bf16": 1e-37, "i8": 1.5e-36}
THIRTY_TWO_BITS = 2**32


def vit_like_tokens(rng: np.random.Generator, shape: tuple[int, ...] = VIT_B16_SHAPE) -> np.ndarray:
    """Residual-stream-like features: Gaussian tokens, per-token scale variation, a few outlier channels."""
    dims = shape[-1]
    token_scale = rng.lognormal(mean=0.0, sigma=0.5, size=shape[:-1] + (1,))
    values = rng.standard_normal(shape) * token_scale
    outlier_channels = rng.choice(dims, size=min(3, dims), replace=False)
    values[..., outlier_channels] *= 8.0  # ViTs carry a handful of channels an order of magnitude larger
    return values.astype(np.float32)


def row_relative_error(original: np.ndarray, decoded: np.ndarray, abs_slack: float) -> float:
    """max over rows of max|decoded - original| / max|original row| (after subtracting the absolute slack)."""
    rows = original.reshape(-1, original.shape[-1]).astype(np.float64)
    error = np.abs(decoded.reshape(rows.shape).astype(np.float64) - rows).max(axis=1)
    row_max = np.abs(rows).max(axis=1)
    excess = np.maximum(error - abs_slack, 0.0)
    return float(np.max(np.divide(excess, row_max, out=excess.copy(), where=row_max > 0)))


def encode(name: str, array: np.ndarray, **kwargs) -> feature_pb2.FeatureTensor:
    return FeatureCodec(CodecConfig.parse(name)).encode(array, **kwargs)


def expect_decode_error(msg: feature_pb2.FeatureTensor, field: str, **kwargs) -> FeatureDecodeError:
    with pytest.raises(FeatureDecodeError) as caught:
        decode_feature(msg, **kwargs)
    assert caught.value.field == field, str(caught.value)
    return caught.value


# ------------------------------------------------------------------------------------------------ configs


def test_default_codec_is_i8_zstd_level_3():
    # Execute
    config = CodecConfig()

    # Assert
    assert config == DEFAULT_CODEC
    assert (config.dtype, config.compression, config.zstd_level, config.byte_shuffle) == ("i8", "zstd", 3, False)
    assert config.name == "i8-zstd"


@pytest.mark.parametrize("name", ALL_CODECS)
def test_canonical_names_round_trip(name):
    # Execute
    config = CodecConfig.parse(name)

    # Assert
    assert config.name == name
    assert CodecConfig.parse(config.name) == config


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("f16", CodecConfig("f16", "zstd", 3, True), "f16-zstd"),
        ("f16-zstd-9", CodecConfig("f16", "zstd", 9, True), "f16-zstd-9"),
        ("i8-zstd-3", CodecConfig("i8", "zstd", 3), "i8-zstd"),
        (" F32-None ", CodecConfig("f32", "none"), "f32-none"),
        ("bf16-zstd-22-noshuffle", CodecConfig("bf16", "zstd", 22, False), "bf16-zstd-22-noshuffle"),
        ("i8-zstd-noshuffle", CodecConfig("i8", "zstd", 3), "i8-zstd"),  # nothing to shuffle in int8
    ],
)
def test_parse_accepts_user_forms(text, expected, canonical):
    # Execute
    config = CodecConfig.parse(text)

    # Assert
    assert config == expected
    assert config.name == canonical
    assert CodecConfig.parse(canonical) == config


@pytest.mark.parametrize(
    "text", ["", "f64", "i4-zstd", "f16-gzip", "f16-zstd-0", "f16-zstd-23", "f32-none-5", "f16--zstd", "zstd-f16"]
)
def test_parse_rejects_bad_names_listing_the_valid_forms(text):
    # Execute
    with pytest.raises(InvalidArgumentError) as caught:
        CodecConfig.parse(text)

    # Assert
    assert repr(text) in str(caught.value)
    assert '"f16-zstd-9"' in str(caught.value) and "f32|f16|bf16|i8" in str(caught.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dtype": "f64"},
        {"compression": "gzip"},
        {"zstd_level": 0},
        {"zstd_level": 23},
        {"zstd_level": 3.0},
        {"zstd_level": True},
    ],
)
def test_config_rejects_bad_fields(kwargs):
    with pytest.raises(InvalidArgumentError):
        CodecConfig(**kwargs)


def test_config_normalises_settings_that_do_nothing():
    # Execute / Assert: equal encodings compare equal (cache keys, task records)
    assert CodecConfig("i8", byte_shuffle=True) == CodecConfig("i8", byte_shuffle=False)
    assert CodecConfig("f32", "none", zstd_level=9) == CodecConfig("f32", "none")
    assert CodecConfig("f16", "none").byte_shuffle is False
    assert CodecConfig("f16", "zstd").byte_shuffle is True


@pytest.mark.parametrize("name", ALL_CODECS + ("f16-zstd-9-noshuffle", "i8-zstd-19"))
def test_proto_round_trip(name):
    # Prepare
    config = CodecConfig.parse(name)

    # Execute
    spec = config.to_proto()

    # Assert
    assert CodecConfig.from_proto(spec) == config
    assert spec.no_byte_shuffle == name.endswith("noshuffle")


def test_from_proto_unset_fields_take_the_defaults():
    # Execute
    empty = CodecConfig.from_proto(feature_pb2.CodecSpec())
    f16 = CodecConfig.from_proto(feature_pb2.CodecSpec(dtype=feature_pb2.DTYPE_F16))
    raw = CodecConfig.from_proto(feature_pb2.CodecSpec(dtype=feature_pb2.DTYPE_BF16, no_byte_shuffle=True))

    # Assert
    assert empty == DEFAULT_CODEC
    assert f16 == CodecConfig("f16", "zstd", 3, True)
    assert raw.name == "bf16-zstd-noshuffle"


@pytest.mark.parametrize(
    "spec",
    [
        feature_pb2.CodecSpec(dtype=9),
        feature_pb2.CodecSpec(compression=5),
        feature_pb2.CodecSpec(zstd_level=-1),
        feature_pb2.CodecSpec(zstd_level=23),
    ],
)
def test_from_proto_rejects_unknown_values(spec):
    with pytest.raises(InvalidArgumentError):
        CodecConfig.from_proto(spec)


# -------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ALL_CODECS)
def test_round_trip_on_vit_b16_features_with_bytes_and_error(name):
    # Prepare
    features = vit_like_tokens(np.random.default_rng(7))
    dtype = CodecConfig.parse(name).dtype

    # Execute
    msg = encode(name, features)
    wire = feature_pb2.FeatureTensor.FromString(msg.SerializeToString())
    decoded = decode_feature(wire)

    # Assert
    assert decoded.shape == VIT_B16_SHAPE and decoded.dtype == np.float32 and decoded.flags.writeable
    error = row_relative_error(features, decoded, ABS_ERROR_SLACK[dtype])
    nbytes = encoded_nbytes(wire)
    print(
        f"\n{name:10s} {nbytes:8,d} B per [197, 768] = {nbytes / 2**20:.4f} MiB "
        f"({float32_nbytes(wire) / nbytes:.2f}x smaller than f32), max row-relative error {error:.2e}"
    )
    if dtype == "f32":
        assert decoded.tobytes() == features.tobytes()
    else:
        assert 0 < error <= REL_ERROR_BOUND[dtype]


@pytest.mark.parametrize("name", ALL_CODECS)
@pytest.mark.parametrize("shape", [(5, 17, 32), (768,), (2, 3, 4, 5)], ids=["lst", "cls", "4d"])
def test_round_trip_other_shapes(name, shape):
    # Prepare
    features = vit_like_tokens(np.random.default_rng(3), shape)
    dtype = CodecConfig.parse(name).dtype

    # Execute
    decoded = decode_feature(encode(name, features, mode=feature_pb2.GATHER_MODE_LST))

    # Assert
    assert decoded.shape == shape
    assert row_relative_error(features, decoded, ABS_ERROR_SLACK[dtype]) <= REL_ERROR_BOUND.get(dtype, 0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_default_codec_fits_the_per_image_budget(seed):
    # Prepare: realistic features, and plain Gaussian ones (no outliers: the hardest case for int8 + zstd)
    rng = np.random.default_rng(seed)
    realistic = vit_like_tokens(rng)
    gaussian = rng.standard_normal(VIT_B16_SHAPE).astype(np.float32)

    # Execute
    sizes = [encoded_nbytes(FeatureCodec().encode(x)) for x in (realistic, gaussian)]

    # Assert
    print(
        f"\ni8-zstd seed {seed}: realistic {sizes[0]:,d} B, plain Gaussian {sizes[1]:,d} B (budget {BUDGET_BYTES:,d})"
    )
    assert all(size <= BUDGET_BYTES for size in sizes), sizes


def test_encode_fills_every_field():
    # Prepare
    features = vit_like_tokens(np.random.default_rng(1), (17, 32))
    backbone = feature_pb2.BackboneId(name="vit_tiny_patch16_224", weights_fingerprint="random-0")

    # Execute
    msg = FeatureCodec().encode(features, backbone=backbone, mode=feature_pb2.GATHER_MODE_MIST, k=np.int64(3))

    # Assert
    assert list(msg.shape) == [17, 32]
    assert (msg.dtype, msg.compression, msg.byte_shuffle) == (feature_pb2.DTYPE_I8, feature_pb2.COMPRESSION_ZSTD, False)
    expected_scales = np.abs(features).max(axis=1) / np.float32(127)
    np.testing.assert_allclose(np.asarray(msg.scales, np.float32), expected_scales, rtol=1e-6)
    plain = zstandard.ZstdDecompressor().decompress(msg.payload)
    scales_bytes = np.asarray(msg.scales, dtype="<f4").tobytes()
    assert len(plain) == 17 * 32 and msg.crc32 == zlib.crc32(scales_bytes, zlib.crc32(plain))
    assert msg.backbone == backbone and msg.mode == feature_pb2.GATHER_MODE_MIST and msg.k == 3
    assert float32_nbytes(msg) == 17 * 32 * 4
    assert encoded_nbytes(msg) == len(msg.SerializeToString())


def test_f16_shuffled_payload_is_grouped_bytes():
    # Prepare: two halves 1.0 (0x3C00) and -2.0 (0xC000) -> bytes 00 3C 00 C0, shuffled 00 00 3C C0
    features = np.array([1.0, -2.0], dtype=np.float32)

    # Execute
    msg = encode("f16-zstd", features)

    # Assert
    assert msg.byte_shuffle
    assert zstandard.ZstdDecompressor().decompress(msg.payload) == bytes([0x00, 0x00, 0x3C, 0xC0])
    assert msg.crc32 == zlib.crc32(bytes([0x00, 0x3C, 0x00, 0xC0]))


def reference_bf16(value: float) -> float:
    """Round a float32 to bfloat16 by comparing its two bf16 neighbours (ties to the even one)."""
    bits = int(np.float32(value).view(np.uint32))
    below = bits & 0xFFFF0000
    candidates = [below, below + 0x10000]
    as_float = [float(np.uint32(c).view(np.float32)) for c in candidates]
    distances = [abs(f - float(np.float32(value))) for f in as_float]
    if distances[0] == distances[1]:
        return as_float[0] if (below >> 16) % 2 == 0 else as_float[1]
    return as_float[int(distances[1] < distances[0])]


def test_bf16_rounds_to_nearest_even():
    # Prepare: bf16 keeps 7 fraction bits, so the spacing at 1.0 is 2**-7; ties, near-ties, random values
    ulp = 2.0**-7
    ties = [1 + ulp / 2, 1 + 1.5 * ulp, 1 + ulp / 2 + 2.0**-20, -(1 + 1.5 * ulp), 1.5e38, 1e-40]
    features = np.concatenate([np.array(ties), np.random.default_rng(0).standard_normal(200) * 100]).astype(np.float32)

    # Execute
    decoded = decode_feature(encode("bf16-zstd", features))

    # Assert
    assert decoded[:4].tolist() == [1.0, 1 + 2 * ulp, 1 + ulp, -(1 + 2 * ulp)]
    assert decoded.tolist() == [reference_bf16(v) for v in features.tolist()]


def test_i8_zero_and_tiny_rows_decode_to_zeros():
    # Prepare
    features = np.zeros((3, 8), dtype=np.float32)
    features[1] = 1e-38  # max / 127 would be subnormal: stored as zeros
    features[2, 3] = -2.5

    # Execute
    msg = encode("i8-zstd", features)
    decoded = decode_feature(msg)

    # Assert
    assert list(msg.scales) == [0.0, 0.0, pytest.approx(2.5 / 127)]
    assert decoded[:2].tolist() == [[0.0] * 8] * 2
    assert decoded[2, 3] == np.float32(-2.5) and decoded[2].sum() == np.float32(-2.5)


def test_f16_range_limit_is_an_error_not_a_clip():
    # Prepare: 65519 still rounds to 65504 (the largest half); 65520 rounds to infinity
    in_range = np.array([65519.0, -65504.0], dtype=np.float32)
    beyond = np.array([1.0, -65520.0], dtype=np.float32)

    # Execute
    decoded = decode_feature(encode("f16-zstd", in_range))
    with pytest.raises(InvalidArgumentError, match="bf16 or i8"):
        encode("f16-zstd", beyond)

    # Assert
    assert decoded.tolist() == [65504.0, -65504.0]


def test_bf16_overflow_is_an_error():
    with pytest.raises(InvalidArgumentError, match="bfloat16"):
        encode("bf16-zstd", np.array([np.finfo(np.float32).max], dtype=np.float32))


@pytest.mark.parametrize("name", ALL_CODECS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_rejects_non_finite_values(name, bad):
    # Prepare
    features = np.ones((4, 8), dtype=np.float32)
    features[2, 5] = bad

    # Execute
    with pytest.raises(InvalidArgumentError) as caught:
        encode(name, features)

    # Assert
    assert "(2, 5)" in str(caught.value)


@pytest.mark.parametrize(
    ("array", "kwargs"),
    [
        (np.array(1.0, dtype=np.float32), {}),  # 0 dims
        (np.ones((1, 1, 1, 1, 1), dtype=np.float32), {}),  # 5 dims
        (np.ones((0, 8), dtype=np.float32), {}),  # empty dim
        (np.ones((2, 8), dtype=np.int32), {}),  # not float
        (np.full((2, 8), 1e300), {}),  # float64 beyond float32
        ([[1.0, 2.0]], {}),  # not an array
        (np.ones((2, 8), dtype=np.float32), {"mode": 99}),
        (np.ones((2, 8), dtype=np.float32), {"k": -1}),
        (np.ones((2, 8), dtype=np.float32), {"k": THIRTY_TWO_BITS}),
    ],
)
def test_encode_rejects_bad_input(array, kwargs):
    with pytest.raises(InvalidArgumentError):
        FeatureCodec().encode(array, **kwargs)


def test_encode_accepts_float64_float16_and_non_contiguous_arrays():
    # Prepare
    base = vit_like_tokens(np.random.default_rng(5), (8, 16))
    variants = [base.astype(np.float64), base.astype(np.float16).astype(np.float32), np.asfortranarray(base)]

    # Execute
    decoded = [decode_feature(encode("f32-zstd", v)) for v in variants]

    # Assert
    assert decoded[0].tobytes() == base.tobytes()
    assert decoded[1].tobytes() == base.astype(np.float16).astype(np.float32).tobytes()
    assert decoded[2].tobytes() == base.tobytes()


def test_decoder_accepts_other_valid_encodings():
    # Prepare: a frame written without its content size (streaming encoders) and shuffle without zstd
    features = vit_like_tokens(np.random.default_rng(2), (6, 10))
    streamed = encode("f16-zstd", features)
    plain_shuffled = zstandard.ZstdDecompressor().decompress(streamed.payload)
    compressobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    streamed.payload = compressobj.compress(plain_shuffled) + compressobj.flush()
    raw_shuffled = encode("f16-zstd", features)
    raw_shuffled.compression = feature_pb2.COMPRESSION_NONE
    raw_shuffled.payload = plain_shuffled

    # Execute
    decoded = [decode_feature(streamed), decode_feature(raw_shuffled)]

    # Assert
    assert zstandard.get_frame_parameters(streamed.payload).content_size == zstandard.CONTENTSIZE_UNKNOWN
    expected = features.astype(np.float16).astype(np.float32)
    assert all(d.tobytes() == expected.tobytes() for d in decoded)


# ------------------------------------------------------------------------------------- hostile messages


def small_message(name: str = "i8-zstd", shape: tuple[int, ...] = (3, 17, 8)) -> feature_pb2.FeatureTensor:
    return encode(name, vit_like_tokens(np.random.default_rng(11), shape))


def with_payload(msg: feature_pb2.FeatureTensor, plain: bytes) -> feature_pb2.FeatureTensor:
    """The message with `plain` as its (zstd) payload and a matching checksum: only the content is wrong."""
    msg.payload = zstandard.ZstdCompressor().compress(plain)
    msg.crc32 = zlib.crc32(plain)
    return msg


def frame_without_size(data: bytes) -> bytes:
    compressobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    return compressobj.compress(data) + compressobj.flush()


MUTATIONS = {
    "no dims": ("shape", lambda m: m.ClearField("shape")),
    "five dims": ("shape", lambda m: m.shape.extend([1, 1])),
    "zero dim": ("shape", lambda m: m.shape.__setitem__(1, 0)),
    "other shape": ("scales", lambda m: m.shape.__setitem__(0, 4)),
    "unset dtype": ("dtype", lambda m: setattr(m, "dtype", feature_pb2.DTYPE_UNSPECIFIED)),
    "unknown dtype": ("dtype", lambda m: setattr(m, "dtype", 9)),
    "unset compression": ("compression", lambda m: setattr(m, "compression", feature_pb2.COMPRESSION_UNSPECIFIED)),
    "unknown compression": ("compression", lambda m: setattr(m, "compression", 7)),
    "dtype f16 with scales": ("scales", lambda m: setattr(m, "dtype", feature_pb2.DTYPE_F16)),
    "scale missing": ("scales", lambda m: m.scales.pop()),
    "scale extra": ("scales", lambda m: m.scales.append(1.0)),
    "scale negative": ("scales", lambda m: m.scales.__setitem__(0, -1.0)),
    "scale NaN": ("scales", lambda m: m.scales.__setitem__(0, float("nan"))),
    "scale huge": ("crc32", lambda m: m.scales.__setitem__(0, 3e38)),  # the checksum covers the scales
    "crc off": ("crc32", lambda m: setattr(m, "crc32", (m.crc32 + 1) % THIRTY_TWO_BITS)),
    "payload empty": ("payload", lambda m: setattr(m, "payload", b"")),
    "payload truncated": ("payload", lambda m: setattr(m, "payload", m.payload[:-3])),
    "payload extended": ("payload", lambda m: setattr(m, "payload", m.payload + b"\x00")),
    "two frames": ("payload", lambda m: setattr(m, "payload", m.payload + m.payload)),
    "not zstd": ("payload", lambda m: setattr(m, "payload", b"\x00" * 64)),
    "skippable frame first": (
        "payload",
        lambda m: setattr(m, "payload", b"\x50\x2a\x4d\x18\x00\x00\x00\x00" + m.payload),
    ),
    "short frame": ("payload", lambda m: with_payload(m, b"\x01" * (3 * 17 * 8 - 1))),
    "long frame": ("payload", lambda m: with_payload(m, b"\x01" * (3 * 17 * 8 + 1))),
    "long frame, no size": ("payload", lambda m: setattr(m, "payload", frame_without_size(b"\x01" * 409))),
    "short raw": ("payload", lambda m: (setattr(m, "compression", 1), setattr(m, "payload", b"\x01" * 407))),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS), ids=list(MUTATIONS))
def test_every_bad_field_raises_feature_decode_error_naming_it(mutation):
    # Prepare
    field, mutate = MUTATIONS[mutation]
    msg = small_message()
    mutate(msg)

    # Execute
    error = expect_decode_error(msg, field)

    # Assert: one error class, mapped to DATA_LOSS, with a message that names the field
    assert isinstance(error, DataLossError) and error.code == "DATA_LOSS"
    assert str(error).startswith(f"bad FeatureTensor: {field}: ")


def test_bit_flip_in_a_float_payload_is_caught():
    # Prepare: flip one bit of the raw f16 payload (no zstd framing that could catch it first)
    msg = small_message("f16-none")
    payload = bytearray(msg.payload)
    payload[100] ^= 0x10
    msg.payload = bytes(payload)

    # Execute / Assert
    error = expect_decode_error(msg, "crc32")
    assert f"{msg.crc32:#010x}" in str(error)


def test_a_corrupted_i8_scale_is_caught_by_the_checksum():
    # Prepare: a scale changed to another finite, non-negative value passes every field check
    msg = small_message("i8-zstd")
    msg.scales[3] = msg.scales[3] * 1.5 + 0.25

    # Execute / Assert
    expect_decode_error(msg, "crc32")


def test_nan_bits_with_a_matching_checksum_are_refused():
    # Prepare: 0x7E00 is a float16 NaN
    msg = small_message("f16-zstd", (2, 4))
    msg.byte_shuffle = False
    with_payload(msg, b"\x00\x7e" * 8)

    # Execute / Assert
    expect_decode_error(msg, "payload")


def test_shape_over_max_elements_is_refused_before_the_payload_is_touched():
    # Prepare
    msg = small_message()  # 408 elements
    huge = feature_pb2.FeatureTensor(shape=[65536, 65536, 4096], dtype=feature_pb2.DTYPE_F32, compression=1)

    # Execute
    small_limit = expect_decode_error(msg, "shape", max_elements=407)
    decoded = decode_feature(msg, max_elements=408)
    default_limit = expect_decode_error(huge, "shape")

    # Assert
    assert "408 elements, over the limit of 407" in str(small_limit)
    assert decoded.shape == (3, 17, 8)
    assert str(DEFAULT_MAX_ELEMENTS) in str(default_limit)
    assert DEFAULT_MAX_ELEMENTS >= 25 * 577 * 1024  # LST on ViT-L/14 at 336 px still decodes


@pytest.mark.parametrize("max_elements", [0, -5, True, 2.5])
def test_decode_rejects_a_bad_max_elements(max_elements):
    with pytest.raises(InvalidArgumentError):
        decode_feature(small_message(), max_elements=max_elements)


@pytest.fixture(scope="module")
def zstd_bombs() -> dict[str, bytes]:
    """1 GiB of zeros as one zstd frame (about 32 KiB), with and without the content size in its header."""
    zeros = bytes(1 << 20)
    bombs = {}
    for label, size in (("declared 1 GiB", 1 << 30), ("size unknown", -1)):
        compressobj = zstandard.ZstdCompressor(level=1, write_content_size=size > 0).compressobj(size=size)
        bombs[label] = b"".join([compressobj.compress(zeros) for _ in range(1024)] + [compressobj.flush()])
    return bombs


@pytest.mark.parametrize("label", ["declared 1 GiB", "size unknown"])
@pytest.mark.parametrize("shape", [(197, 768), (4, 4096, 1024)], ids=["vit-b", "at-max-elements"])
def test_zstd_bomb_is_refused_quickly_without_allocating_it(zstd_bombs, label, shape):
    # Prepare: a valid-looking i8 header whose payload expands to 1 GiB
    rows = int(np.prod(shape[:-1]))
    msg = feature_pb2.FeatureTensor(shape=shape, dtype=feature_pb2.DTYPE_I8, compression=2, payload=zstd_bombs[label])
    msg.scales.extend([1.0] * rows)
    tracemalloc.start()
    started = time.perf_counter()

    # Execute
    try:
        with pytest.raises(FeatureDecodeError) as caught:
            decode_feature(msg)
        elapsed_s = time.perf_counter() - started
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert: at most the declared shape's 16 MiB of int8 (plus its scales) is ever allocated
    assert caught.value.field == "payload"
    assert elapsed_s < 2.0
    assert peak_bytes < int(np.prod(shape)) + 64 * rows + (4 << 20), peak_bytes
    print(f"\nzstd bomb ({label}, shape {list(shape)}): refused in {elapsed_s * 1e3:.1f} ms, peak {peak_bytes:,d} B")


# ------------------------------------------------------------------------------------------ property tests

# 150 examples keep the file at a few seconds; MIST_FUZZ_EXAMPLES=20000 makes it a soak run.
FUZZ = settings(
    max_examples=int(os.environ.get("MIST_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def decode_or_feature_error(msg: feature_pb2.FeatureTensor) -> np.ndarray | None:
    """Decode; a FeatureDecodeError is an answer too, any other exception fails the test."""
    try:
        decoded = decode_feature(msg)
    except FeatureDecodeError:
        return None
    assert decoded.shape == tuple(msg.shape) and decoded.dtype == np.float32
    assert np.isfinite(decoded).all()
    return decoded


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        msg = feature_pb2.FeatureTensor.FromString(data)
    except DecodeError:
        return
    decode_or_feature_error(msg)


def zstd_frame_of(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


@FUZZ
@given(
    shape=st.lists(st.integers(0, 40), max_size=5),
    dtype=st.integers(0, 5),
    compression=st.integers(0, 3),
    byte_shuffle=st.booleans(),
    scales=st.lists(st.floats(width=32), max_size=48),
    payload=st.one_of(st.binary(max_size=256), st.binary(max_size=256).map(zstd_frame_of)),
    crc32=st.integers(0, THIRTY_TWO_BITS - 1),
)
def test_random_field_values_never_crash_the_decoder(shape, dtype, compression, byte_shuffle, scales, payload, crc32):
    # Prepare
    msg = feature_pb2.FeatureTensor(
        shape=shape, dtype=dtype, compression=compression, byte_shuffle=byte_shuffle, payload=payload, crc32=crc32
    )
    msg.scales.extend(scales)

    # Execute / Assert
    decode_or_feature_error(msg)


BASE_MESSAGES = {name: small_message(name, (2, 5, 8)).SerializeToString() for name in ALL_CODECS}


def mutate_message(draw, msg: feature_pb2.FeatureTensor) -> None:
    field = draw(st.sampled_from(["shape", "dtype", "compression", "shuffle", "scales", "crc", "payload"]))
    if field == "shape":
        msg.shape[:] = draw(st.lists(st.integers(0, THIRTY_TWO_BITS - 1), max_size=6))
    elif field == "dtype":
        msg.dtype = draw(st.integers(-3, 8))
    elif field == "compression":
        msg.compression = draw(st.integers(-3, 5))
    elif field == "shuffle":
        msg.byte_shuffle = not msg.byte_shuffle
    elif field == "scales":
        msg.scales[:] = draw(st.lists(st.floats(width=32), max_size=20))
    elif field == "crc":
        msg.crc32 = draw(st.integers(0, THIRTY_TWO_BITS - 1))
    else:
        payload = bytearray(msg.payload)
        action = draw(st.sampled_from(["truncate", "extend", "flip"])) if payload else "extend"
        if action == "truncate":
            payload = payload[: draw(st.integers(0, max(len(payload) - 1, 0)))]
        elif action == "extend":
            payload += draw(st.binary(min_size=1, max_size=64))
        else:
            position = draw(st.integers(0, len(payload) - 1))
            payload[position] ^= 1 << draw(st.integers(0, 7))
        msg.payload = bytes(payload)


@FUZZ
@given(name=st.sampled_from(ALL_CODECS), data=st.data())
def test_mutated_messages_raise_only_feature_decode_error(name, data):
    # Prepare
    msg = feature_pb2.FeatureTensor.FromString(BASE_MESSAGES[name])
    for _ in range(data.draw(st.integers(1, 3))):
        mutate_message(data.draw, msg)

    # Execute / Assert
    decode_or_feature_error(msg)


@FUZZ
@given(
    name=st.sampled_from(ALL_CODECS),
    features=arrays(
        np.float32,
        array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6),
        elements=st.floats(-6e4, 6e4, width=32),
    ),
)
def test_round_trip_random_shapes_and_values(name, features):
    # Prepare
    dtype = CodecConfig.parse(name).dtype

    # Execute
    decoded = decode_feature(encode(name, features))

    # Assert
    assert decoded.shape == features.shape
    if dtype == "f32":
        assert decoded.tobytes() == features.tobytes()
    else:
        assert row_relative_error(features, decoded, ABS_ERROR_SLACK[dtype]) <= REL_ERROR_BOUND[dtype]


# ---------------------------------------------------------------------------------------------- threads


@pytest.mark.parametrize("name", ["i8-zstd", "f16-zstd"])
def test_concurrent_encode_and_decode_match_serial(name):
    # Prepare: one shared codec, four threads released together
    codec = FeatureCodec(CodecConfig.parse(name))
    rng = np.random.default_rng(9)
    inputs = [vit_like_tokens(rng) for _ in range(12)]
    serial = [codec.encode(x).SerializeToString() for x in inputs]
    start = threading.Barrier(4)
    results: dict[int, list[bytes]] = {}
    decoded_ok: dict[int, bool] = {}

    def work(thread_index: int) -> None:
        start.wait()
        order = inputs[thread_index:] + inputs[:thread_index]  # different threads hit different arrays
        messages = [codec.encode(x) for x in order]
        results[thread_index] = [m.SerializeToString() for m in messages]
        decoded_ok[thread_index] = all(
            np.array_equal(decode_feature(m), decode_feature(feature_pb2.FeatureTensor.FromString(s)))
            for m, s in zip(messages, serial[thread_index:] + serial[:thread_index], strict=True)
        )

    # Execute
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # Assert
    for index in range(4):
        assert results[index] == serial[index:] + serial[:index]
        assert decoded_ok[index]
