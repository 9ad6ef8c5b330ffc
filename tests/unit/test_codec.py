"""The feature wire codec (services.common.wire.codec): configs, round trips, sizes, hostile messages, threads,
the i8o and i4 dtypes (outlier columns, 4-bit groups) and compatibility with the previous release's decoder.

Run with `-s` to see the bytes per [197, 768] tensor and the error of each codec.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import tracemalloc
import types
import zlib
from pathlib import Path

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
    DEFAULT_DTYPE,
    DEFAULT_MAX_ELEMENTS,
    I4_GROUP_SIZE,
    OUTLIER_COLUMN_SHARE,
    OUTLIER_RATIO,
    CodecConfig,
    FeatureCodec,
    FeatureDecodeError,
    UnsupportedFeatureError,
    decode_feature,
    encoded_nbytes,
    find_outlier_columns,
    float32_nbytes,
)

VIT_B16_SHAPE = (197, 768)  # MIST feature of ViT-B/16 at 224 px
BUDGET_BYTES = 157_286  # 0.15 MiB: the product target for the default codec per image
# Worst-case error of each lossy codec relative to the row's max |x| (ulp / 2 of the format, 1/254 for i8; i8o is
# i8 on the ordinary columns, whose max is at most the row's; i4 is half a step of a scale >= max / 7 rounded up to
# bfloat16, so at most (1 + 2**-7) / 14). An i8o or i4 outlier column's error is bounded by its column's max instead
# (OUTLIER_REL_ERROR_BOUND): on the features of these tests far below the row bound, checked exactly further down.
REL_ERROR_BOUND = {
    "f16": 2.0**-11,
    "bf16": 2.0**-8,
    "i8": 1 / 254 + 1e-6,
    "i8o": 1 / 254 + 1e-6,
    "i4": (1 + 2.0**-7) / 14 + 1e-6,
}
# Half a step of int16 (scale = column max / 32767), plus float32 rounding: at 16 bits of levels the float32 products
# x * (1 / scale) and q * scale are no longer exact to well below a step (measured: 1.005x half a step at |x| = 53).
OUTLIER_REL_ERROR_BOUND = 1 / 65534 + 2.0**-22
# Absolute slack for tiny values: f16 subnormal spacing / 2, float32 subnormals, i8 rows stored as zeros (and i8o,
# i4 outlier columns whose max is below float32's smallest normal x 32767, stored as zeros too).
ABS_ERROR_SLACK = {"f32": 0.0, "f16": 2.0**-25, "bf16": 1e-37, "i8": 1.5e-36, "i8o": 4e-34, "i4": 4e-34}
THIRTY_TWO_BITS = 2**32
KNOWN_DTYPES = frozenset(range(1, 7))  # DTYPE_F32 .. DTYPE_I4: anything else is a newer encoder's (or garbage)
# 150 examples keep the file at a few seconds; MIST_FUZZ_EXAMPLES=20000 makes it a soak run.
FUZZ = settings(
    max_examples=int(os.environ.get("MIST_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# The i8o and i4 decoders have the most content checks to reach: three times the examples (about 1 s).
NEW_DTYPE_FUZZ = settings(FUZZ, max_examples=3 * FUZZ.max_examples)


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


def test_default_codec_is_i8o_zstd_level_3():
    # Execute
    config = CodecConfig()

    # Assert
    assert config == DEFAULT_CODEC
    assert (config.dtype, config.compression, config.zstd_level, config.byte_shuffle) == ("i8o", "zstd", 3, False)
    assert config.name == "i8o-zstd" and DEFAULT_DTYPE == "i8o"
    assert FeatureCodec().config == DEFAULT_CODEC


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
        ("i8o", CodecConfig("i8o", "zstd", 3), "i8o-zstd"),
        (" I8O-None ", CodecConfig("i8o", "none"), "i8o-none"),
        ("i8o-zstd-9-noshuffle", CodecConfig("i8o", "zstd", 9), "i8o-zstd-9"),  # never shuffled
        ("i4", CodecConfig("i4", "zstd", 3), "i4-zstd"),
        ("i4-zstd-19", CodecConfig("i4", "zstd", 19), "i4-zstd-19"),
        ("i4-zstd-noshuffle", CodecConfig("i4", "zstd", 3), "i4-zstd"),  # never shuffled
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
    "text",
    [
        "", "f64", "i16-zstd", "i4o-zstd", "i8oo", "i2-zstd", "i4-none-3", "f16-gzip", "f16-zstd-0", "f16-zstd-23",
        "f32-none-5", "f16--zstd", "zstd-f16",
    ],
)  # fmt: skip
def test_parse_rejects_bad_names_listing_the_valid_forms(text):
    # Execute
    with pytest.raises(InvalidArgumentError) as caught:
        CodecConfig.parse(text)

    # Assert
    assert repr(text) in str(caught.value)
    assert '"f16-zstd-9"' in str(caught.value) and "f32|f16|bf16|i8|i8o|i4" in str(caught.value)


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
    assert CodecConfig("i8o", byte_shuffle=True) == CodecConfig("i8o", byte_shuffle=False)
    assert CodecConfig("i4", byte_shuffle=True).byte_shuffle is False
    assert CodecConfig("f32", "none", zstd_level=9) == CodecConfig("f32", "none")
    assert CodecConfig("f16", "none").byte_shuffle is False
    assert CodecConfig("f16", "zstd").byte_shuffle is True


@pytest.mark.parametrize("name", ALL_CODECS + ("f16-zstd-9-noshuffle", "i8-zstd-19", "i8o-none", "i4-zstd-9"))
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
    assert empty == DEFAULT_CODEC and empty.name == "i8o-zstd"
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
        f"\n{DEFAULT_CODEC.name} seed {seed}: realistic {sizes[0]:,d} B, plain Gaussian {sizes[1]:,d} B "
        f"(budget {BUDGET_BYTES:,d})"
    )
    assert all(size <= BUDGET_BYTES for size in sizes), sizes


def test_encode_fills_every_field():
    # Prepare
    features = vit_like_tokens(np.random.default_rng(1), (17, 32))
    backbone = feature_pb2.BackboneId(name="vit_tiny_patch16_224", weights_fingerprint="random-0")

    # Execute
    msg = FeatureCodec(CodecConfig.parse("i8-zstd")).encode(
        features, backbone=backbone, mode=feature_pb2.GATHER_MODE_MIST, k=np.int64(3)
    )

    # Assert
    assert list(msg.shape) == [17, 32]
    assert (msg.dtype, msg.compression, msg.byte_shuffle) == (feature_pb2.DTYPE_I8, feature_pb2.COMPRESSION_ZSTD, False)
    assert msg.group_size == 0 and not msg.outlier_columns and not msg.outlier_scales
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


# ------------------------------------------------------------------------------------------------ i8o and i4

OUTLIER_CODECS = ("i8o-zstd", "i8o-none", "i4-zstd", "i4-none")
I4_BUDGET_BYTES = 83_886  # 0.08 MiB: the transfer target for i4 per [197, 768] image
F32_TINY = float(np.finfo(np.float32).tiny)


def features_with_outliers(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """vit_like_tokens plus what pretrained ViTs add where the last dim allows outlier columns (D >= 16): a channel
    50x the RMS in every token, one massive activation 500x the RMS, and a first token 10x the others' norm."""
    values = vit_like_tokens(rng, shape)
    dims = shape[-1]
    if dims < OUTLIER_COLUMN_SHARE:
        return values
    rows = values.reshape(-1, dims)  # a view: the changes land in `values`
    rms = float(np.sqrt(np.mean(np.square(rows, dtype=np.float64))))
    rows[:, 1] += np.float32(50 * rms)
    rows[rng.integers(len(rows)), dims - 2] = np.float32(500 * rms)
    rows[0] *= np.float32(10)
    return values


def plain_payload(msg: feature_pb2.FeatureTensor) -> bytes:
    """The stored payload bytes, decompressed when the message says zstd (not unshuffled)."""
    if msg.compression == feature_pb2.COMPRESSION_ZSTD:
        return zstandard.ZstdDecompressor().decompress(msg.payload)
    return msg.payload


def spec_crc32(msg: feature_pb2.FeatureTensor, plain: bytes) -> int:
    """The checksum as docs/reference/wire-format.md defines it, written here independently of the codec: CRC-32 of
    the plain payload, continued over the row scales (float32 LE), then, when there are outlier columns, over the
    columns (uint32 LE) and their scales (float32 LE)."""
    crc = zlib.crc32(plain)
    if len(msg.scales):
        crc = zlib.crc32(np.asarray(msg.scales, dtype="<f4").tobytes(), crc)
    if len(msg.outlier_columns):
        crc = zlib.crc32(np.asarray(msg.outlier_columns, dtype="<u4").tobytes(), crc)
        crc = zlib.crc32(np.asarray(msg.outlier_scales, dtype="<f4").tobytes(), crc)
    return crc


def repacked(msg: feature_pb2.FeatureTensor, plain: bytes | bytearray) -> feature_pb2.FeatureTensor:
    """The message with `plain` as its payload (zstd-compressed if the message says so) and a matching checksum."""
    plain = bytes(plain)
    zstd = msg.compression == feature_pb2.COMPRESSION_ZSTD
    msg.payload = zstandard.ZstdCompressor().compress(plain) if zstd else plain
    msg.crc32 = spec_crc32(msg, plain)
    return msg


def rows_and_dims(msg: feature_pb2.FeatureTensor) -> tuple[int, int]:
    dims = msg.shape[-1]
    return int(np.prod(msg.shape)) // dims, dims


def i4_layout(msg: feature_pb2.FeatureTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 group scales [rows, groups], levels q in -7..7 [rows, D], int16 outlier values [columns, rows]),
    read from an i4 payload as the wire format lays it out (the pad nibble, if any, checked to be 0)."""
    plain = plain_payload(msg)
    rows, dims = rows_and_dims(msg)
    groups = -(-dims // msg.group_size)
    scale_bits = np.frombuffer(plain, dtype="<u2", count=rows * groups)
    scales = (scale_bits.astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(rows, groups)
    elements, start = rows * dims, 2 * rows * groups
    packed = np.frombuffer(plain, dtype=np.uint8, count=(elements + 1) // 2, offset=start)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)
    assert elements % 2 == 0 or nibbles[-1] == 0
    levels = nibbles[:elements].astype(np.int8).reshape(rows, dims) - np.int8(8)
    outliers = np.frombuffer(plain, dtype="<i2", offset=start + len(packed)).reshape(-1, rows)
    return scales, levels, outliers


def assert_outlier_columns_within_bound(original: np.ndarray, error: np.ndarray, columns: np.ndarray) -> None:
    """Each outlier column within 1/65534 of that column's max |x| (half a step of int16)."""
    if len(columns):
        column_max = np.abs(original[:, columns]).max(axis=0)
        assert (error[:, columns] <= column_max * OUTLIER_REL_ERROR_BOUND + ABS_ERROR_SLACK["i8o"]).all()


def assert_i8o_error_bounds(features: np.ndarray, msg: feature_pb2.FeatureTensor, decoded: np.ndarray) -> None:
    """Ordinary columns within 1/254 of the row's max over its ordinary columns; outlier columns within 1/65534 of
    the column's max."""
    dims = features.shape[-1]
    original = features.reshape(-1, dims).astype(np.float64)
    error = np.abs(decoded.reshape(original.shape).astype(np.float64) - original)
    columns = np.asarray(msg.outlier_columns, dtype=np.int64)
    ordinary = np.setdiff1d(np.arange(dims), columns)
    ordinary_max = np.abs(original[:, ordinary]).max(axis=1)
    assert (error[:, ordinary] <= ordinary_max[:, None] * REL_ERROR_BOUND["i8"] + ABS_ERROR_SLACK["i8"]).all()
    assert_outlier_columns_within_bound(original, error, columns)


def assert_i4_error_bounds(features: np.ndarray, msg: feature_pb2.FeatureTensor, decoded: np.ndarray) -> None:
    """Each group's scale at least its max / 7 and at most one bfloat16 step above; every ordinary value within half
    a step (scale / 2) of the original; levels 0 in the outlier columns, which are within 1/65534 of their max."""
    dims = features.shape[-1]
    original = features.reshape(-1, dims).astype(np.float64)
    error = np.abs(decoded.reshape(original.shape).astype(np.float64) - original)
    columns = np.asarray(msg.outlier_columns, dtype=np.int64)
    ordinary = np.setdiff1d(np.arange(dims), columns)
    scales, levels, outliers = i4_layout(msg)
    rows, groups = scales.shape
    magnitude = np.zeros((rows, groups * I4_GROUP_SIZE))
    magnitude[:, ordinary] = np.abs(original[:, ordinary])
    group_max = magnitude.reshape(rows, groups, I4_GROUP_SIZE).max(axis=2)
    stored = group_max >= F32_TINY * 7  # smaller groups are stored as zeros (scale 0)
    # Rounded up (to float32 rounding of max / 7): no value clips; at most one bfloat16 step (2**-7) above.
    assert (scales[stored] * 7 >= group_max[stored] * (1 - 2.0**-23)).all()
    assert (scales[stored] * 7 <= group_max[stored] * (1 + 2.0**-7) * (1 + 2.0**-23)).all()
    assert (scales[~stored] == 0).all()
    step = np.repeat(scales.astype(np.float64), I4_GROUP_SIZE, axis=1)[:, :dims]  # each element's group scale
    assert (error[:, ordinary] <= step[:, ordinary] / 2 * (1 + 1e-5) + 1e-37).all()
    assert (np.abs(levels) <= 7).all() and (levels[:, columns] == 0).all()
    assert outliers.shape == (len(columns), rows) and (outliers >= -32767).all()
    assert_outlier_columns_within_bound(original, error, columns)


SWEEP_SHAPES = [
    (5,), (15,), (16,), (33,), (768,), (1, 1, 1, 1), (3, 7), (7, 15), (9, 40), (197, 768), (5, 17, 33),
    (2, 3, 5, 47), (2, 2, 3, 64),
]  # fmt: skip


@pytest.mark.parametrize("name", OUTLIER_CODECS)
@pytest.mark.parametrize("shape", SWEEP_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_i8o_and_i4_round_trip_deterministically_within_their_bounds(name, shape):
    # Prepare: 1-D to 4-D, D below 16 (no outlier column possible), not a multiple of 32, odd element counts
    features = features_with_outliers(np.random.default_rng(100 * len(shape) + shape[-1]), shape)
    codec = FeatureCodec(CodecConfig.parse(name))
    dims, rows = shape[-1], int(np.prod(shape[:-1]))

    # Execute
    msg = codec.encode(features, mode=feature_pb2.GATHER_MODE_LST)
    again = FeatureCodec(CodecConfig.parse(name)).encode(features, mode=feature_pb2.GATHER_MODE_LST)
    decoded = decode_feature(feature_pb2.FeatureTensor.FromString(msg.SerializeToString()))

    # Assert
    assert msg.SerializeToString() == again.SerializeToString()  # the same bytes every time
    assert decoded.shape == shape and decoded.dtype == np.float32 and decoded.flags.writeable
    columns = np.asarray(msg.outlier_columns, dtype=np.int64)
    np.testing.assert_array_equal(columns, find_outlier_columns(features))
    assert len(columns) == len(msg.outlier_scales) <= dims // OUTLIER_COLUMN_SHARE
    assert (len(columns) > 0) == (dims >= OUTLIER_COLUMN_SHARE)  # the injected ones are found where allowed
    assert not msg.byte_shuffle
    if codec.config.dtype == "i8o":
        assert msg.dtype == feature_pb2.DTYPE_I8O and msg.group_size == 0 and len(msg.scales) == rows
        assert_i8o_error_bounds(features, msg, decoded)
    else:
        assert msg.dtype == feature_pb2.DTYPE_I4 and msg.group_size == I4_GROUP_SIZE and not msg.scales
        assert_i4_error_bounds(features, msg, decoded)


def test_i8o_payload_is_int8_rows_then_int16_columns():
    # Prepare: [6, 40] (at most 2 outlier columns), a channel in every row and one massive activation
    features = np.random.default_rng(4).standard_normal((6, 40)).astype(np.float32)
    features[:, 7] += 60
    features[2, 29] = -400
    ordinary = features.copy()
    ordinary[:, [7, 29]] = 0

    # Execute
    msg = encode("i8o-zstd", features, k=2)
    decoded = decode_feature(msg)

    # Assert: the layout and arithmetic of docs/reference/wire-format.md, rebuilt here
    scales = np.abs(ordinary).max(axis=1) / np.float32(127)
    levels = np.clip(np.rint(ordinary * (np.float32(1) / scales)[:, None]), -127, 127).astype(np.int8)
    column_scales = np.abs(features[:, [7, 29]]).max(axis=0) / np.float32(32767)
    column_levels = np.rint(features[:, [7, 29]].T * (np.float32(1) / column_scales)[:, None]).astype("<i2")
    plain = plain_payload(msg)
    assert (msg.dtype, msg.compression, msg.byte_shuffle, msg.group_size) == (feature_pb2.DTYPE_I8O, 2, False, 0)
    assert list(msg.outlier_columns) == [7, 29]
    np.testing.assert_array_equal(np.asarray(msg.scales, np.float32), scales)
    np.testing.assert_array_equal(np.asarray(msg.outlier_scales, np.float32), column_scales)
    assert plain == levels.tobytes() + column_levels.tobytes()
    assert msg.crc32 == spec_crc32(msg, plain) != zlib.crc32(np.asarray(msg.scales, "<f4").tobytes(), zlib.crc32(plain))
    expected = levels.astype(np.float32) * scales[:, None]
    expected[:, [7, 29]] = (column_levels.astype(np.float32) * column_scales[:, None]).T
    np.testing.assert_array_equal(decoded, expected)


def bf16_at_least(values: np.ndarray) -> np.ndarray:
    """The smallest bfloat16 >= each non-negative float32, as float32 (truncate, then one step up if anything was cut)."""
    truncated = (values.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    step_up = ((truncated.view(np.uint32) + np.uint32(0x10000)) & np.uint32(0xFFFF0000)).view(np.float32)
    return np.where(truncated < values, step_up, truncated)


def test_i4_payload_is_group_scales_then_nibbles_then_int16_columns():
    # Prepare: [3, 41] = 123 elements (odd: a pad nibble), two groups per row (32 and 9), one outlier column
    features = np.random.default_rng(8).standard_normal((3, 41)).astype(np.float32)
    features[:, 7] += 60
    ordinary = features.copy()
    ordinary[:, 7] = 0

    # Execute
    msg = encode("i4-zstd", features)
    decoded = decode_feature(msg)

    # Assert: the layout and arithmetic of docs/reference/wire-format.md, rebuilt here
    padded = np.zeros((3, 64), dtype=np.float32)
    padded[:, :41] = ordinary
    grouped = padded.reshape(3, 2, 32)
    scales = bf16_at_least(np.abs(grouped).max(axis=2) / np.float32(7))
    levels = np.clip(np.rint(grouped * (np.float32(1) / scales)[:, :, None]), -7, 7).reshape(3, 64)[:, :41]
    nibbles = np.append((levels.astype(np.int8) + 8).astype(np.uint8).reshape(-1), np.uint8(0))  # then the pad
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    column_scale = np.abs(features[:, 7]).max() / np.float32(32767)
    column_levels = np.rint(features[:, 7] * (np.float32(1) / column_scale)).astype("<i2")
    plain = plain_payload(msg)
    assert (msg.dtype, msg.group_size, msg.byte_shuffle, len(msg.scales)) == (feature_pb2.DTYPE_I4, 32, False, 0)
    assert list(msg.outlier_columns) == [7] and list(msg.outlier_scales) == [column_scale]
    assert plain == (scales.view(np.uint32) >> 16).astype("<u2").tobytes() + packed.tobytes() + column_levels.tobytes()
    assert (nibbles[:-1] != 0).all()  # levels are stored as 1..15, never 0
    assert (nibbles[np.arange(3) * 41 + 7] == 8).all()  # level 0 in the outlier column
    assert msg.crc32 == spec_crc32(msg, plain)
    expected = (levels * np.repeat(scales, 32, axis=1)[:, :41]).astype(np.float32)
    expected[:, 7] = column_levels.astype(np.float32) * column_scale
    np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("shape", [VIT_B16_SHAPE, (5, 17, 32), (768,)], ids=["mist", "lst", "cls"])
def test_i8o_on_gaussian_features_is_exactly_i8(shape):
    # Prepare: plain Gaussian features never reach 12x their row's mean |x|
    features = np.random.default_rng(17).standard_normal(shape).astype(np.float32)

    # Execute
    i8o = encode("i8o-zstd", features, k=1)
    i8 = encode("i8-zstd", features, k=1)

    # Assert: no column flagged, the same payload, scales and checksum; only the dtype enum differs
    assert find_outlier_columns(features).size == 0
    assert not i8o.outlier_columns and not i8o.outlier_scales and i8o.group_size == 0
    assert i8o.payload == i8.payload and list(i8o.scales) == list(i8.scales) and i8o.crc32 == i8.crc32
    relabelled = feature_pb2.FeatureTensor()
    relabelled.CopyFrom(i8o)
    relabelled.dtype = feature_pb2.DTYPE_I8
    assert relabelled.SerializeToString() == i8.SerializeToString()
    assert decode_feature(i8o).tobytes() == decode_feature(i8).tobytes()


def ordinary_relative_error(original: np.ndarray, decoded: np.ndarray, channels: np.ndarray) -> float:
    """||decoded - original|| / ||original|| over the given channels (Frobenius)."""
    reference = original[:, channels].astype(np.float64)
    return float(np.linalg.norm(decoded[:, channels].astype(np.float64) - reference) / np.linalg.norm(reference))


VIT_OUTLIER_CHANNELS = [17, 300, 511, 700]
VIT_MASSIVE_AT = (5, 123)
VIT_HIGH_NORM_TOKENS = [0, 9, 44]


@pytest.mark.parametrize("injection", ["outlier channels", "massive activation", "high-norm tokens", "all three"])
def test_i8o_keeps_ordinary_channels_accurate_under_vit_outliers(injection):
    # Prepare: Gaussian [197, 768] features, then what pretrained ViTs show
    gaussian = np.random.default_rng(21).standard_normal(VIT_B16_SHAPE).astype(np.float32)
    rms = float(np.sqrt(np.mean(np.square(gaussian, dtype=np.float64))))
    features = gaussian.copy()
    touched: list[int] = []
    if injection in ("outlier channels", "all three"):
        features[:, VIT_OUTLIER_CHANNELS] += np.float32(50 * rms)
        touched += VIT_OUTLIER_CHANNELS
    if injection in ("massive activation", "all three"):
        features[VIT_MASSIVE_AT] = np.float32(500 * rms)
        touched.append(VIT_MASSIVE_AT[1])
    if injection in ("high-norm tokens", "all three"):
        features[VIT_HIGH_NORM_TOKENS] *= np.float32(10)
    ordinary = np.setdiff1d(np.arange(VIT_B16_SHAPE[1]), touched)

    # Execute
    messages = {name: encode(name, features) for name in ("i8o-zstd", "i8-zstd", "i4-zstd")}
    error = {name: ordinary_relative_error(features, decode_feature(m), ordinary) for name, m in messages.items()}
    baseline = {
        name: ordinary_relative_error(gaussian, decode_feature(encode(name, gaussian)), ordinary)
        for name in ("i8o-zstd", "i4-zstd")
    }

    # Assert: the injected columns (only those) are carried apart; the rest keep their outlier-free accuracy
    print(
        f"\n{injection}: ordinary-channel error i8o {error['i8o-zstd']:.2e} (without outliers "
        f"{baseline['i8o-zstd']:.2e}), i8 {error['i8-zstd']:.2e}, i4 {error['i4-zstd']:.2e} "
        f"(without {baseline['i4-zstd']:.2e})"
    )
    assert sorted(messages["i8o-zstd"].outlier_columns) == sorted(touched)
    assert list(messages["i4-zstd"].outlier_columns) == list(messages["i8o-zstd"].outlier_columns)
    assert error["i8o-zstd"] <= 1.1 * baseline["i8o-zstd"]
    assert error["i4-zstd"] <= 1.1 * baseline["i4-zstd"]
    if touched:
        assert error["i8-zstd"] >= 5 * error["i8o-zstd"]
    else:  # high-norm tokens alone are what per-row scales already handle: i8o is i8
        assert messages["i8o-zstd"].payload == messages["i8-zstd"].payload
    assert_i8o_error_bounds(features, messages["i8o-zstd"], decode_feature(messages["i8o-zstd"]))


@pytest.mark.parametrize("seed", [0, 1])
def test_i4_fits_the_0_08_mib_transfer_target(seed):
    # Prepare: plain Gaussian features (no outliers, the hardest case for a 4-bit code + zstd)
    rng = np.random.default_rng(seed)
    gaussian = rng.standard_normal(VIT_B16_SHAPE).astype(np.float32)
    realistic = features_with_outliers(rng, VIT_B16_SHAPE)

    # Execute
    sizes = [encoded_nbytes(encode("i4-zstd", x)) for x in (gaussian, realistic)]

    # Assert
    print(f"\ni4-zstd seed {seed}: plain Gaussian {sizes[0]:,d} B, with outliers {sizes[1]:,d} B")
    assert sizes[0] <= I4_BUDGET_BYTES
    assert sizes[1] <= I4_BUDGET_BYTES + 2 * 197 * (768 // OUTLIER_COLUMN_SHARE)  # plus at most 48 int16 columns


@FUZZ
@given(
    name=st.sampled_from(OUTLIER_CODECS),
    lead=array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4),
    data=st.data(),
)
def test_i8o_and_i4_stay_within_their_bounds_on_any_values(name, lead, data):
    # Prepare: D up to 40 so that extreme values become outlier columns (and compete for the D // 16 places)
    dims = data.draw(st.integers(1, 40), label="dims")
    features = data.draw(
        arrays(np.float32, tuple(lead) + (dims,), elements=st.floats(-6e4, 6e4, width=32)), label="features"
    )

    # Execute
    msg = encode(name, features)
    decoded = decode_feature(msg)

    # Assert
    assert decoded.shape == features.shape
    np.testing.assert_array_equal(np.asarray(msg.outlier_columns, np.int64), find_outlier_columns(features))
    if msg.dtype == feature_pb2.DTYPE_I8O:
        assert_i8o_error_bounds(features, msg, decoded)
    else:
        assert_i4_error_bounds(features, msg, decoded)


def test_outlier_columns_follow_the_ratio_rule_and_the_cap():
    # Prepare: D = 64 (at most 4 columns); rows of |x| = 1 so every ratio is known exactly
    signs = np.where(np.random.default_rng(3).random((8, 64)) < 0.5, -1.0, 1.0).astype(np.float32)
    below = signs.copy()
    below[0, 5] = 11.0  # 11 / mean(63 + 11) * 64 = 9.5x: under 12x
    spikes = signs.copy()
    for row, (column, value) in enumerate([(2, 20.0), (9, 40.0), (17, 80.0), (30, 160.0), (45, 320.0), (60, 640.0)]):
        spikes[row, column] = value  # ratios 15.2, 24.6, 35.6, 45.7, 53.3, 58.2: six candidates

    # Execute
    found_below = find_outlier_columns(below)
    found_spikes = find_outlier_columns(spikes)
    found_small = find_outlier_columns(spikes[:, :15])  # D < 16: none, whatever the values

    # Assert: only ratios over OUTLIER_RATIO; the 4 largest of the six; increasing uint32 indices
    assert OUTLIER_RATIO == 12.0 and OUTLIER_COLUMN_SHARE == 16
    assert found_below.size == 0 and found_small.size == 0
    assert found_spikes.dtype == np.uint32 and found_spikes.tolist() == [17, 30, 45, 60]
    assert list(encode("i8o-zstd", spikes).outlier_columns) == [17, 30, 45, 60]


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


# ---------------------------------------------------------------------------- hostile i8o and i4 messages

ROWS, DIMS = 15, 41  # the outlier messages: [3, 5, 41], 615 elements (odd), two i4 groups (32 and 9 values)
I8O_INT16_AT = ROWS * DIMS  # i8o payload: int8 [15, 41], then int16 [2 columns, 15 rows]
I4_NIBBLES_AT = 2 * ROWS * 2  # i4 payload: bfloat16 scales [15, 2], then 308 bytes of nibbles, then int16 [2, 15]
I4_INT16_AT = I4_NIBBLES_AT + (ROWS * DIMS + 1) // 2


def outlier_message(name: str) -> feature_pb2.FeatureTensor:
    """A valid i8o or i4 message with outlier columns 7 (a channel) and 29 (one massive activation)."""
    values = np.random.default_rng(13).standard_normal((3, 5, DIMS)).astype(np.float32)
    values[..., 7] += 60
    values[1, 2, 29] = -500
    msg = encode(name, values, mode=feature_pb2.GATHER_MODE_LST)
    assert list(msg.outlier_columns) == [7, 29]
    return msg


OUTLIER_MESSAGES = {name: outlier_message(name).SerializeToString() for name in OUTLIER_CODECS}


def base_message(name: str) -> feature_pb2.FeatureTensor:
    """A fresh valid message: with outlier columns for i8o and i4, the small [3, 17, 8] one otherwise."""
    if name in OUTLIER_MESSAGES:
        return feature_pb2.FeatureTensor.FromString(OUTLIER_MESSAGES[name])
    return small_message(name)


def in_plain(change, *, fix_crc: bool = True):
    """A mutation of the decompressed payload; with fix_crc the checksum is recomputed, so only the content is wrong."""

    def mutate(msg: feature_pb2.FeatureTensor) -> None:
        plain = bytearray(plain_payload(msg))
        change(plain)
        crc = msg.crc32
        repacked(msg, plain)
        if not fix_crc:
            msg.crc32 = crc

    return mutate


def set_nibble(element: int, nibble: int):
    """Set the i4 nibble of one element (row-major index) in the plain payload."""

    def change(plain: bytearray) -> None:
        at, shift = I4_NIBBLES_AT + element // 2, 4 * (element % 2)
        plain[at] = (plain[at] & (0xF0 >> shift)) | (nibble << shift)

    return change


def set_bytes(at: int, value: bytes):
    def change(plain: bytearray) -> None:
        plain[at : at + len(value)] = value

    return change


def set_columns(columns: list[int], scales: list[float] | None = None):
    def mutate(msg: feature_pb2.FeatureTensor) -> None:
        msg.outlier_columns[:] = columns
        if scales is not None:
            msg.outlier_scales[:] = scales

    return mutate


def flip_bit(at: int, bit: int = 0):
    def change(plain: bytearray) -> None:
        plain[at] ^= 1 << bit

    return change


# label: (base codec, the field the error must name, mutation)
NEW_DTYPE_MUTATIONS = {
    # outlier fields where the dtype has none
    "i8 with outlier columns": (
        "i8-zstd",
        "outlier_columns",
        lambda m: (m.outlier_columns.append(0), m.outlier_scales.append(1.0)),
    ),
    "i8 with outlier scales only": ("i8-zstd", "outlier_columns", lambda m: m.outlier_scales.append(1.0)),
    "f32 with outlier columns": ("f32-zstd", "outlier_columns", set_columns([0], [1.0])),
    "i8o relabelled i8": ("i8o-zstd", "outlier_columns", lambda m: setattr(m, "dtype", feature_pb2.DTYPE_I8)),
    "i8o relabelled i4": ("i8o-zstd", "scales", lambda m: setattr(m, "dtype", feature_pb2.DTYPE_I4)),
    "i4 relabelled i8o": ("i4-zstd", "scales", lambda m: setattr(m, "dtype", feature_pb2.DTYPE_I8O)),
    "i4 with row scales": ("i4-zstd", "scales", lambda m: m.scales.extend([1.0] * ROWS)),
    "i8o without row scales": ("i8o-zstd", "scales", lambda m: m.ClearField("scales")),
    # outlier columns themselves
    "i8o more columns than D": ("i8o-zstd", "outlier_columns", set_columns(list(range(42)), [1.0] * 42)),
    "i8o repeated column": ("i8o-zstd", "outlier_columns", set_columns([7, 7])),
    "i8o decreasing columns": ("i8o-zstd", "outlier_columns", set_columns([29, 7])),
    "i8o column = D": ("i8o-zstd", "outlier_columns", set_columns([7, DIMS])),
    "i4 column = D": ("i4-zstd", "outlier_columns", set_columns([7, DIMS])),
    "i4 column 2**32-1": ("i4-none", "outlier_columns", set_columns([7, THIRTY_TWO_BITS - 1])),
    "i8o outlier scale missing": ("i8o-zstd", "outlier_scales", lambda m: m.outlier_scales.pop()),
    "i8o outlier scale extra": ("i8o-zstd", "outlier_scales", lambda m: m.outlier_scales.append(1.0)),
    "i4 outlier scales without columns": ("i4-zstd", "outlier_scales", lambda m: m.ClearField("outlier_columns")),
    "i8o outlier scale negative": ("i8o-zstd", "outlier_scales", lambda m: m.outlier_scales.__setitem__(0, -1.0)),
    "i8o outlier scale NaN": ("i8o-none", "outlier_scales", lambda m: m.outlier_scales.__setitem__(1, float("nan"))),
    "i4 outlier scale Inf": ("i4-zstd", "outlier_scales", lambda m: m.outlier_scales.__setitem__(0, float("inf"))),
    # group size and byte shuffle
    "i8o group_size 32": ("i8o-zstd", "group_size", lambda m: setattr(m, "group_size", 32)),
    "i8 group_size 1": ("i8-zstd", "group_size", lambda m: setattr(m, "group_size", 1)),
    "f16 group_size 32": ("f16-zstd", "group_size", lambda m: setattr(m, "group_size", 32)),
    "i4 group_size 0": ("i4-zstd", "group_size", lambda m: setattr(m, "group_size", 0)),
    "i4 group_size 16": ("i4-zstd", "payload", lambda m: setattr(m, "group_size", 16)),  # another payload size
    "i8o byte_shuffle": ("i8o-zstd", "byte_shuffle", lambda m: setattr(m, "byte_shuffle", True)),
    "i4 byte_shuffle": ("i4-zstd", "byte_shuffle", lambda m: setattr(m, "byte_shuffle", True)),
    # payload size
    "i8o payload a byte short": ("i8o-zstd", "payload", in_plain(lambda p: p.pop())),
    "i8o payload a byte long": ("i8o-zstd", "payload", in_plain(lambda p: p.append(0))),
    "i8o raw payload a byte short": ("i8o-none", "payload", in_plain(lambda p: p.pop())),
    "i4 payload a byte short": ("i4-zstd", "payload", in_plain(lambda p: p.pop())),
    "i4 payload a byte long": ("i4-zstd", "payload", in_plain(lambda p: p.append(0))),
    "i4 raw payload a byte long": ("i4-none", "payload", in_plain(lambda p: p.append(0))),
    "i8o column dropped": ("i8o-zstd", "payload", lambda m: (m.outlier_columns.pop(), m.outlier_scales.pop())),
    "i4 column added": ("i4-zstd", "payload", lambda m: (m.outlier_columns.append(40), m.outlier_scales.append(1.0))),
    # content no encoder writes, under a matching checksum
    "i8o int8 in an outlier column": ("i8o-zstd", "payload", in_plain(set_bytes(3 * DIMS + 7, b"\x01"))),
    "i8o int8 in the last outlier column": ("i8o-none", "payload", in_plain(set_bytes(14 * DIMS + 29, b"\xff"))),
    "i8o int16 -32768": ("i8o-zstd", "payload", in_plain(set_bytes(I8O_INT16_AT + 2 * ROWS + 4, b"\x00\x80"))),
    "i4 int16 -32768": ("i4-zstd", "payload", in_plain(set_bytes(I4_INT16_AT, b"\x00\x80"))),
    "i4 level in an outlier column": ("i4-zstd", "payload", in_plain(set_nibble(4 * DIMS + 29, 9))),
    "i4 nibble 0": ("i4-zstd", "payload", in_plain(set_nibble(0, 0))),
    "i4 nibble 0 late": ("i4-none", "payload", in_plain(set_nibble(ROWS * DIMS - 1, 0))),
    "i4 nibble 0 in an outlier column": ("i4-zstd", "payload", in_plain(set_nibble(7, 0))),
    "i4 pad nibble": ("i4-zstd", "payload", in_plain(set_nibble(ROWS * DIMS, 1))),
    "i4 group scale negative": ("i4-zstd", "payload", in_plain(flip_bit(1, 7))),  # the sign bit of scale 0
    "i4 group scale NaN": ("i4-zstd", "payload", in_plain(set_bytes(2, (0x7FC0).to_bytes(2, "little")))),
    "i4 group scale Inf": ("i4-none", "payload", in_plain(set_bytes(2 * 29, (0x7F80).to_bytes(2, "little")))),
    "i4 group scale -0": ("i4-zstd", "payload", in_plain(set_bytes(2, (0x8000).to_bytes(2, "little")))),
    # the checksum covers the payload, the row scales and the outlier fields
    "i8o outlier scale changed": (
        "i8o-zstd",
        "crc32",
        lambda m: m.outlier_scales.__setitem__(0, m.outlier_scales[0] * 1.5),
    ),
    "i8o outlier column moved": ("i8o-zstd", "crc32", set_columns([7, 30])),
    "i4 outlier column moved": ("i4-zstd", "crc32", set_columns([6, 29])),
    "i8o row scale changed": ("i8o-zstd", "crc32", lambda m: m.scales.__setitem__(4, m.scales[4] * 1.5 + 0.25)),
    "i8o int8 flipped": ("i8o-zstd", "crc32", in_plain(flip_bit(100, 2), fix_crc=False)),
    "i8o int16 flipped": ("i8o-none", "crc32", in_plain(flip_bit(I8O_INT16_AT + 7, 1), fix_crc=False)),
    "i4 group scale flipped": ("i4-zstd", "crc32", in_plain(flip_bit(6, 0), fix_crc=False)),
    "i4 nibble flipped": ("i4-zstd", "crc32", in_plain(flip_bit(I4_NIBBLES_AT + 50, 0), fix_crc=False)),
    "i4 int16 flipped": ("i4-none", "crc32", in_plain(flip_bit(I4_INT16_AT + 11, 3), fix_crc=False)),
    "i4 crc off": ("i4-zstd", "crc32", lambda m: setattr(m, "crc32", (m.crc32 + 1) % THIRTY_TWO_BITS)),
}

# What the error says, for the checks that share a field: each case is caught by the check it targets.
NEW_DTYPE_PROBLEMS = {
    "i8 with outlier columns": "expected none for dtype i8",
    "i8 with outlier scales only": "expected none for dtype i8",
    "f32 with outlier columns": "expected none for dtype f32",
    "i8o relabelled i8": "expected none for dtype i8",
    "i8o relabelled i4": "expected none for dtype i4",
    "i4 relabelled i8o": "expected one per row",
    "i4 with row scales": "expected none for dtype i4",
    "i8o without row scales": "expected one per row",
    "i8o more columns than D": "42 columns for a last dim of 41",
    "i8o repeated column": "strictly increasing",
    "i8o decreasing columns": "strictly increasing",
    "i8o column = D": "in 0..40",
    "i4 column = D": "in 0..40",
    "i4 column 2**32-1": "in 0..40",
    "i8o outlier scale missing": "one per outlier column (2), got 1",
    "i8o outlier scale extra": "one per outlier column (2), got 3",
    "i4 outlier scales without columns": "one per outlier column (0), got 2",
    "i8o outlier scale negative": "finite values >= 0",
    "i8o outlier scale NaN": "finite values >= 0",
    "i4 outlier scale Inf": "finite values >= 0",
    "i8o group_size 32": "expected 0 for dtype i8o",
    "i8 group_size 1": "expected 0 for dtype i8",
    "f16 group_size 32": "expected 0 for dtype f16",
    "i4 group_size 0": "at least 1 for dtype i4",
    "i4 group_size 16": "expected 458",
    "i8o byte_shuffle": "never shuffled",
    "i4 byte_shuffle": "never shuffled",
    "i8o payload a byte short": "expected 675",
    "i8o payload a byte long": "expected 675",
    "i8o raw payload a byte short": "expected 675 raw bytes",
    "i4 payload a byte short": "expected 428",
    "i4 payload a byte long": "expected 428",
    "i4 raw payload a byte long": "expected 428 raw bytes",
    "i8o column dropped": "expected 645",
    "i4 column added": "expected 458",
    "i8o int8 in an outlier column": "in an outlier column",
    "i8o int8 in the last outlier column": "in an outlier column",
    "i8o int16 -32768": "-32768",
    "i4 int16 -32768": "-32768",
    "i4 level in an outlier column": "in an outlier column",
    "i4 nibble 0": "nibble 0",
    "i4 nibble 0 late": "nibble 0",
    "i4 nibble 0 in an outlier column": "nibble 0",
    "i4 pad nibble": "pad nibble",
    "i4 group scale negative": "group scale",
    "i4 group scale NaN": "group scale",
    "i4 group scale Inf": "group scale",
    "i4 group scale -0": "group scale",
}


@pytest.mark.parametrize("mutation", list(NEW_DTYPE_MUTATIONS), ids=list(NEW_DTYPE_MUTATIONS))
def test_every_bad_i8o_and_i4_field_raises_feature_decode_error_naming_it(mutation):
    # Prepare
    name, field, mutate = NEW_DTYPE_MUTATIONS[mutation]
    msg = base_message(name)
    mutate(msg)

    # Execute
    error = expect_decode_error(msg, field)

    # Assert: DATA_LOSS, with a message that names the field (and the problem, where checks share a field)
    assert isinstance(error, DataLossError) and error.code == "DATA_LOSS"
    assert str(error).startswith(f"bad FeatureTensor: {field}: ")
    assert NEW_DTYPE_PROBLEMS.get(mutation, "") in str(error)


# group_size comes from the message: for D <= group_size any value leaves the payload valid, and decoding must
# still allocate by the declared shape, not by group_size.
def test_an_i4_group_size_beyond_the_last_dim_costs_no_extra_memory():
    # Prepare: a valid [1, 8] i4 message (one group per row); any group_size >= 8 leaves its payload valid
    msg = encode("i4-none", np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8))
    expected = decode_feature(msg)
    msg.group_size = 1 << 23
    tracemalloc.start()

    # Execute
    try:
        decoded = decode_or_feature_error(msg)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert: bounded by the declared 8 elements (as the fuzz test bounds it), whatever the answer
    assert decoded is None or decoded.tobytes() == expected.tobytes()
    assert peak_bytes <= 32 * 8 + (256 << 10), peak_bytes


@pytest.mark.parametrize("name", OUTLIER_CODECS + ("i8-zstd", "i8-none", "f32-none", "bf16-none"))
def test_a_message_repacked_by_the_spec_decodes_unchanged(name):
    # Prepare: the helpers the hostile cases use rebuild a valid message exactly
    original = base_message(name)

    # Execute
    msg = repacked(base_message(name), plain_payload(original))

    # Assert
    assert msg.crc32 == original.crc32
    np.testing.assert_array_equal(decode_feature(msg), decode_feature(original))


def test_an_unset_dtype_is_data_loss_not_a_newer_encoder():
    # Prepare: every encoder sets dtype, so a message without one is damaged
    msg = small_message()
    msg.dtype = feature_pb2.DTYPE_UNSPECIFIED

    # Execute
    with pytest.raises(FeatureDecodeError) as caught:
        decode_feature(msg)

    # Assert
    assert caught.value.field == "dtype" and "unset" in str(caught.value)


@pytest.mark.parametrize("dtype", [7, 99, 2**31 - 1, -1])
def test_an_unknown_dtype_is_unsupported_not_data_loss(dtype):
    # Prepare: nothing else in the message can be read, so nothing else may matter
    msg = small_message()
    msg.dtype = dtype
    msg.payload = b"not a zstd frame"
    msg.crc32 = 0
    msg.outlier_columns.append(99)

    # Execute
    with pytest.raises(UnsupportedFeatureError) as caught:
        decode_feature(msg)

    # Assert: INVALID_ARGUMENT naming the field and the dtypes this decoder reads
    error = caught.value
    assert isinstance(error, InvalidArgumentError) and not isinstance(error, DataLossError)
    assert error.code == "INVALID_ARGUMENT" and error.field == "dtype"
    assert str(error).startswith("unsupported FeatureTensor: dtype: ")
    assert "4 (i8)" in str(error) and "5 (i8o)" in str(error) and "6 (i4)" in str(error)


def test_a_bad_shape_is_still_data_loss_whatever_the_dtype():
    # Prepare: the shape is read first
    msg = small_message()
    msg.dtype = 99
    msg.shape[1] = 0

    # Execute / Assert
    expect_decode_error(msg, "shape")


def test_an_i8_message_built_the_old_way_still_decodes():
    # Prepare: an i8 message as the previous release wrote it, by hand: CRC over the payload then the scales
    features = np.random.default_rng(6).standard_normal((6, 10)).astype(np.float32)
    scales = (np.abs(features).max(axis=1) / np.float32(127)).astype(np.float32)
    levels = np.clip(np.rint(features * (np.float32(1) / scales)[:, None]), -127, 127).astype(np.int8)
    plain = levels.tobytes()
    scale_bytes = scales.astype("<f4").tobytes()
    msg = feature_pb2.FeatureTensor(
        shape=[6, 10],
        dtype=feature_pb2.DTYPE_I8,
        compression=feature_pb2.COMPRESSION_ZSTD,
        payload=zstandard.ZstdCompressor().compress(plain),
        crc32=zlib.crc32(scale_bytes, zlib.crc32(plain)),
        mode=feature_pb2.GATHER_MODE_MIST,
        k=2,
    )
    msg.scales.extend(scales.tolist())
    old_f32 = feature_pb2.FeatureTensor(
        shape=[6, 10], dtype=feature_pb2.DTYPE_F32, compression=1, payload=features.tobytes()
    )
    old_f32.crc32 = zlib.crc32(features.tobytes())

    # Execute
    decoded = decode_feature(feature_pb2.FeatureTensor.FromString(msg.SerializeToString()))

    # Assert: the same values, and the same checksum as today's encoder writes for i8
    np.testing.assert_array_equal(decoded, levels.astype(np.float32) * scales[:, None])
    assert encode("i8-zstd", features).crc32 == msg.crc32
    assert decode_feature(old_f32).tobytes() == features.tobytes()


PREVIOUS_RELEASE = "d15aac0"  # the last commit before i8o and i4 (its decoder knows f32, f16, bf16 and i8)
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def previous_decoder():
    """decode_feature of the previous release's codec.py, loaded from git next to today's feature_pb2."""
    try:
        shown = subprocess.run(
            ["git", "show", f"{PREVIOUS_RELEASE}:services/common/wire/codec.py"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"git is not available to read the previous release's codec: {exc}")
    if shown.returncode != 0:
        pytest.skip(f"commit {PREVIOUS_RELEASE} is not in this checkout (a shallow clone?): {shown.stderr.strip()}")
    module = types.ModuleType("previous_release_codec")
    sys.modules[module.__name__] = module  # dataclasses look their module up while the class body runs
    try:
        exec(compile(shown.stdout, f"{PREVIOUS_RELEASE}:codec.py", "exec"), module.__dict__)  # noqa: S102
    finally:
        del sys.modules[module.__name__]
    return module.decode_feature


@pytest.mark.parametrize("name", OUTLIER_CODECS)
@pytest.mark.parametrize("kind", ["gaussian", "outliers"])
def test_the_previous_release_refuses_i8o_and_i4_and_never_returns_an_array(previous_decoder, name, kind):
    # Prepare: on Gaussian features i8o holds exactly i8's payload, the case where a misread would be silent
    rng = np.random.default_rng(5)
    features = rng.standard_normal((9, 64)).astype(np.float32)
    if kind == "outliers":
        features = features_with_outliers(rng, (9, 64))
    msg = feature_pb2.FeatureTensor.FromString(encode(name, features).SerializeToString())

    # Execute
    with pytest.raises(DataLossError) as caught:
        previous_decoder(msg)

    # Assert: refused on its dtype (DATA_LOSS there: it predates UnsupportedFeatureError)
    assert caught.value.field == "dtype" and caught.value.code == "DATA_LOSS"


@pytest.mark.parametrize("name", ["i8-zstd", "i8-none", "f16-zstd", "bf16-zstd", "f32-none"])
def test_the_previous_release_still_reads_what_today_writes_in_its_dtypes(previous_decoder, name):
    # Prepare
    msg = encode(name, vit_like_tokens(np.random.default_rng(12), (9, 64)))

    # Execute
    decoded = previous_decoder(msg)

    # Assert
    assert decoded.tobytes() == decode_feature(msg).tobytes()


# ------------------------------------------------------------------------------------------ property tests


def decode_or_feature_error(msg: feature_pb2.FeatureTensor) -> np.ndarray | None:
    """Decode; a FeatureDecodeError is an answer too, and so is UnsupportedFeatureError for a dtype this decoder does
    not know; any other exception fails the test."""
    try:
        decoded = decode_feature(msg)
    except UnsupportedFeatureError as error:
        assert msg.dtype not in KNOWN_DTYPES and error.field == "dtype", str(error)
        return None
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


COLUMN_INDICES = st.one_of(st.integers(0, 48), st.integers(0, THIRTY_TWO_BITS - 1))


@FUZZ
@given(
    shape=st.lists(st.integers(0, 40), max_size=5),
    dtype=st.integers(0, 8),
    compression=st.integers(0, 3),
    byte_shuffle=st.booleans(),
    scales=st.lists(st.floats(width=32), max_size=48),
    payload=st.one_of(st.binary(max_size=256), st.binary(max_size=256).map(zstd_frame_of)),
    crc32=st.integers(0, THIRTY_TWO_BITS - 1),
    group_size=st.one_of(st.sampled_from([0, 1, 32]), st.integers(0, THIRTY_TWO_BITS - 1)),
    outlier_columns=st.lists(COLUMN_INDICES, max_size=6),
    outlier_scales=st.lists(st.floats(width=32), max_size=6),
)
def test_random_field_values_never_crash_the_decoder(
    shape, dtype, compression, byte_shuffle, scales, payload, crc32, group_size, outlier_columns, outlier_scales
):
    # Prepare
    msg = feature_pb2.FeatureTensor(
        shape=shape,
        dtype=dtype,
        compression=compression,
        byte_shuffle=byte_shuffle,
        payload=payload,
        crc32=crc32,
        group_size=group_size,
    )
    msg.scales.extend(scales)
    msg.outlier_columns.extend(outlier_columns)
    msg.outlier_scales.extend(outlier_scales)

    # Execute / Assert
    decode_or_feature_error(msg)


BASE_MESSAGES = {name: small_message(name, (2, 5, 8)).SerializeToString() for name in ALL_CODECS}
BASE_MESSAGES.update({f"{name} with outliers": OUTLIER_MESSAGES[name] for name in OUTLIER_CODECS})
MUTABLE_FIELDS = [
    "shape", "dtype", "compression", "shuffle", "scales", "crc", "payload",
    "group_size", "outlier_columns", "outlier_scales", "plain",
]  # fmt: skip


def mutate_message(draw, msg: feature_pb2.FeatureTensor) -> None:
    field = draw(st.sampled_from(MUTABLE_FIELDS))
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
    elif field == "group_size":
        msg.group_size = draw(st.one_of(st.sampled_from([0, 1, 16, 31, 32, 33]), st.integers(0, THIRTY_TWO_BITS - 1)))
    elif field == "outlier_columns":
        msg.outlier_columns[:] = draw(st.lists(COLUMN_INDICES, max_size=6))
    elif field == "outlier_scales":
        msg.outlier_scales[:] = draw(st.lists(st.floats(width=32), max_size=6))
    elif field == "plain":  # a byte of the decompressed payload, then a matching checksum: the content checks
        try:
            plain = bytearray(plain_payload(msg))
        except zstandard.ZstdError:  # no longer one readable frame after an earlier mutation
            return
        if plain:
            plain[draw(st.integers(0, len(plain) - 1))] = draw(st.integers(0, 255))
        repacked(msg, plain)
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
@given(name=st.sampled_from(sorted(BASE_MESSAGES)), data=st.data())
def test_mutated_messages_raise_only_feature_decode_error(name, data):
    # Prepare
    msg = feature_pb2.FeatureTensor.FromString(BASE_MESSAGES[name])
    for _ in range(data.draw(st.integers(1, 3))):
        mutate_message(data.draw, msg)

    # Execute / Assert
    decode_or_feature_error(msg)


def declared_elements(msg: feature_pb2.FeatureTensor) -> int:
    """The elements the header declares when the decoder would accept the shape, else 0 (refused before reading)."""
    shape = list(msg.shape)
    if not 1 <= len(shape) <= 4 or min(shape) < 1 or int(np.prod(shape, dtype=object)) > DEFAULT_MAX_ELEMENTS:
        return 0
    return int(np.prod(shape, dtype=object))


@NEW_DTYPE_FUZZ
@given(name=st.sampled_from(OUTLIER_CODECS), data=st.data())
def test_mutated_i8o_and_i4_messages_decode_in_memory_bounded_by_their_shape(name, data):
    # Prepare: a valid message with outlier columns, then 1 to 3 mutations of any field (or of the plain payload
    # under a matching checksum)
    msg = feature_pb2.FeatureTensor.FromString(OUTLIER_MESSAGES[name])
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        mutate_message(data.draw, msg)
    tracemalloc.start()

    # Execute
    try:
        decode_or_feature_error(msg)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Assert: a few float32 temporaries per declared element at most (i4 measured at about 11 bytes each)
    assert peak_bytes <= 32 * declared_elements(msg) + (256 << 10), (peak_bytes, list(msg.shape))


@NEW_DTYPE_FUZZ
@given(
    dtype=st.sampled_from(["i8o", "i4"]),
    lead=array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=5),
    dims=st.integers(1, 48),
    compression=st.sampled_from(["zstd", "none"]),
    seed=st.integers(0, THIRTY_TWO_BITS - 1),
    pokes=st.integers(0, 3),
)
def test_poked_i8o_and_i4_payloads_with_matching_checksums_never_crash_the_decoder(
    dtype, lead, dims, compression, seed, pokes
):
    # Prepare: a valid message (outlier columns where D allows), then up to 3 bytes of its plain payload set to
    # random values and the checksum recomputed: only the content checks stand between them and the caller
    rng = np.random.default_rng(seed)
    msg = encode(f"{dtype}-{compression}", features_with_outliers(rng, tuple(lead) + (dims,)))
    plain = bytearray(plain_payload(msg))
    for _ in range(pokes):
        plain[int(rng.integers(len(plain)))] = int(rng.integers(256))
    repacked(msg, plain)

    # Execute
    decoded = decode_or_feature_error(msg)

    # Assert: unchanged, it decodes (the helpers keep valid messages valid)
    assert pokes or decoded is not None


@st.composite
def plausible_outlier_messages(draw) -> feature_pb2.FeatureTensor:
    """i8o and i4 headers that pass every field check (scales, increasing columns, group size), a payload of the size
    they imply and a matching checksum; its content either random bytes or only values an encoder could write."""
    i4 = draw(st.booleans())
    lead = draw(array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4))
    dims = draw(st.integers(1, 40))
    rows = int(np.prod(lead, dtype=np.int64))
    columns = sorted(draw(st.sets(st.integers(0, dims - 1), max_size=min(dims, 4))))
    group_size = draw(st.integers(1, 40)) if i4 else 0
    scale_values = st.floats(0, float(np.finfo(np.float32).max), width=32)
    msg = feature_pb2.FeatureTensor(
        shape=tuple(lead) + (dims,),
        dtype=feature_pb2.DTYPE_I4 if i4 else feature_pb2.DTYPE_I8O,
        compression=draw(st.sampled_from([feature_pb2.COMPRESSION_NONE, feature_pb2.COMPRESSION_ZSTD])),
        group_size=group_size,
    )
    if not i4:
        msg.scales.extend(draw(st.lists(scale_values, min_size=rows, max_size=rows)))
    msg.outlier_columns.extend(columns)
    msg.outlier_scales.extend(draw(st.lists(scale_values, min_size=len(columns), max_size=len(columns))))
    rng = np.random.default_rng(draw(st.integers(0, THIRTY_TWO_BITS - 1)))
    outliers = rng.integers(-32768, 32768, size=(len(columns), rows)).astype("<i2")
    if i4:
        groups = -(-dims // group_size)
        scale_bits = rng.integers(0, 1 << 16, size=rows * groups).astype("<u2")
        nibbles = rng.integers(0, 16, size=(rows, dims)).astype(np.uint8)
    else:
        levels = rng.integers(-128, 128, size=(rows, dims)).astype(np.int8)
    pad = int(rng.integers(16))  # the pad nibble after an odd element count
    if draw(st.booleans()):  # what an encoder could write: the content checks pass, finiteness decides
        pad = 0
        outliers[outliers == -32768] = 0
        if i4:
            scale_bits &= np.uint16(0x7F7F)  # sign clear, exponent below all-ones
            nibbles[nibbles == 0] = 8
            nibbles[:, columns] = 8
        else:
            levels[:, columns] = 0
    if i4:
        flat = np.append(nibbles.reshape(-1), np.full(rows * dims % 2, pad, dtype=np.uint8))
        body = scale_bits.tobytes() + (flat[0::2] | (flat[1::2] << 4)).tobytes()
    else:
        body = levels.tobytes()
    return repacked(msg, body + outliers.tobytes())


@NEW_DTYPE_FUZZ
@given(msg=plausible_outlier_messages())
def test_random_i8o_and_i4_content_with_matching_checksums_never_crashes_the_decoder(msg):
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


@pytest.mark.parametrize("name", ["i8-zstd", "f16-zstd", "i8o-zstd", "i4-zstd"])
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
