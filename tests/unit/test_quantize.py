"""Device-side int8 quantization (services/extractor/quantize.py: per-row i8, and i8o with each image's outlier
columns) and FeatureCodec.encode_quantized: the message is byte-identical to encoding the floats on the host, and every
way a quantized tensor (or its outlier columns) can be wrong is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from services.common.errors import InvalidArgumentError
from services.common.pb import feature_pb2
from services.common.wire.codec import CodecConfig, FeatureCodec, decode_feature, find_outlier_columns, quantize_i8
from services.extractor.quantize import quantize_images_i8o, quantize_rows_i8

I8 = FeatureCodec(CodecConfig.parse("i8-zstd"))
I8O = FeatureCodec(CodecConfig.parse("i8o-zstd"))
BACKBONE = feature_pb2.BackboneId(name="vit_tiny", weights_fingerprint="f" * 64)


def encode_on_device(values: np.ndarray, codec: FeatureCodec = I8) -> feature_pb2.FeatureTensor:
    quantized, scales = quantize_rows_i8(torch.from_numpy(values))
    return codec.encode_quantized(quantized.numpy(), scales.numpy(), backbone=BACKBONE, k=3)


def vit_like(seed: int, shape: tuple[int, ...] = (197, 768)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape).astype(np.float32)
    values[..., 5] *= 60  # an outlier channel, as in pretrained ViTs
    return values


@pytest.mark.parametrize("codec", ["i8-zstd", "i8-none", "i8-zstd-9"])
def test_device_quantized_message_is_byte_identical_to_encoding_the_floats(codec: str) -> None:
    # Prepare: ViT-B/16-sized features with rows of every kind (zeros, subnormal-small, huge)
    values = vit_like(0)
    values[3] = 0.0
    values[4] *= 1e-39
    values[6] *= 1e30
    encoder = FeatureCodec(CodecConfig.parse(codec))

    # Execute
    on_device = encode_on_device(values, encoder)
    on_host = encoder.encode(values, backbone=BACKBONE, k=3)

    # Assert
    assert on_device.SerializeToString() == on_host.SerializeToString()
    np.testing.assert_array_equal(decode_feature(on_device), decode_feature(on_host))


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.float32,
        array_shapes(min_dims=1, max_dims=4, max_side=9),
        elements=st.floats(-(2.0**100), 2.0**100, allow_nan=False, allow_infinity=False, width=32),
    )
)
def test_quantization_matches_the_codec_on_any_finite_array(values: np.ndarray) -> None:
    quantized, scales = quantize_rows_i8(torch.from_numpy(values))
    expected_q, expected_scales = quantize_i8(values)

    np.testing.assert_array_equal(quantized.numpy(), expected_q)
    np.testing.assert_array_equal(scales.numpy().reshape(-1), expected_scales)
    assert quantized.shape == values.shape and tuple(scales.shape) == values.shape[:-1]


def test_large_cpu_batches_are_quantized_in_chunks_with_the_same_result() -> None:
    # Prepare: 8 images of [197, 768] is 4.8 MB, over the CPU chunk size
    batch = np.stack([vit_like(seed) for seed in range(8)])

    # Execute
    quantized, scales = quantize_rows_i8(torch.from_numpy(batch))

    # Assert: each image as if quantized alone, and the input untouched
    for image, q, s in zip(batch, quantized, scales, strict=True):
        expected_q, expected_scales = quantize_i8(image)
        np.testing.assert_array_equal(q.numpy(), expected_q)
        np.testing.assert_array_equal(s.numpy(), expected_scales)
    np.testing.assert_array_equal(batch[0], vit_like(0))


def test_bfloat16_features_are_quantized_from_their_float32_values() -> None:
    values = torch.from_numpy(vit_like(1, (17, 32))).bfloat16()

    quantized, scales = quantize_rows_i8(values)

    expected_q, expected_scales = quantize_i8(values.float().numpy())
    np.testing.assert_array_equal(quantized.numpy(), expected_q)
    np.testing.assert_array_equal(scales.numpy(), expected_scales)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_are_never_silently_zeroed(bad: float) -> None:
    # Prepare
    values = vit_like(2, (4, 8))
    values[2, 3] = bad

    # Execute
    quantized, scales = quantize_rows_i8(torch.from_numpy(values))

    # Assert: the row keeps a non-finite scale, which the encoder refuses
    assert not np.isfinite(scales[2].item())
    with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
        I8.encode_quantized(quantized.numpy(), scales.numpy())


def test_quantize_refuses_what_is_not_a_float_tensor() -> None:
    for bad in (np.zeros((2, 3), np.float32), torch.zeros(2, 3, dtype=torch.int32), torch.tensor(1.0)):
        with pytest.raises(InvalidArgumentError, match="float tensor"):
            quantize_rows_i8(bad)  # type: ignore[arg-type]


def _quantized(shape: tuple[int, ...] = (4, 8)) -> tuple[np.ndarray, np.ndarray]:
    return quantize_i8(vit_like(3, shape))


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda q, s: (q.astype(np.int16), s), "int8 numpy array"),
        (lambda q, s: (q.tolist(), s), "int8 numpy array"),
        (lambda q, s: (q, s[:-1]), "one value per row"),
        (lambda q, s: (q, s.astype(np.float64)), "float32"),
        (lambda q, s: (q, -s), "finite and >= 0"),
        (lambda q, s: (np.where(q == q.min(), np.int8(-128), q), s), "found -128"),
        (lambda q, s: (q.reshape(1, 1, 1, 4, 8), s), "1 to 4 dims"),
        (lambda q, s: (q[:, :0], s), "each in 1..2\\*\\*32-1"),
    ],
)
def test_encode_quantized_refuses_inconsistent_input(change, problem: str) -> None:
    quantized, scales = change(*_quantized())

    with pytest.raises(InvalidArgumentError, match=problem):
        I8.encode_quantized(quantized, scales)


@pytest.mark.parametrize("codec", ["f16-zstd", "f32-none", "bf16-zstd", "i4-zstd"])
def test_encode_quantized_needs_an_i8_or_i8o_codec(codec: str) -> None:
    with pytest.raises(InvalidArgumentError, match=f"needs an i8 or i8o codec, this one is {codec}$"):
        FeatureCodec(CodecConfig.parse(codec)).encode_quantized(*_quantized())


# ------------------------------------------------------------------------------------------------------ i8o


def i8o_inputs(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What encode_quantized takes for i8o, computed on the host: (int8 with the outlier columns zeroed, row scales,
    the columns find_outlier_columns picks, their float32 values [rows, columns])."""
    dims = features.shape[-1]
    rows = features.reshape(-1, dims)
    columns = find_outlier_columns(features)
    ordinary = rows.copy()
    ordinary[:, columns] = 0
    quantized, scales = quantize_i8(ordinary.reshape(features.shape))
    return quantized, scales, columns, np.ascontiguousarray(rows[:, columns])


@pytest.mark.parametrize("shape", [(197, 768), (17, 32), (2, 5, 48), (768,), (3, 15)])
@pytest.mark.parametrize("column_dtype", [np.uint32, np.int64, np.int32])
def test_encode_quantized_i8o_is_byte_identical_to_encode(shape: tuple[int, ...], column_dtype) -> None:
    # Prepare: an outlier channel (column 5, raised by 60: over 60x its row's mean |x|) where D allows one
    features = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    features[..., 5] += 60
    quantized, scales, columns, values = i8o_inputs(features)

    # Execute
    on_device = I8O.encode_quantized(
        quantized, scales, outlier_columns=columns.astype(column_dtype), outlier_values=values, backbone=BACKBONE, k=3
    )
    on_host = I8O.encode(features, backbone=BACKBONE, k=3)

    # Assert
    assert on_device.SerializeToString() == on_host.SerializeToString()
    assert list(on_host.outlier_columns) == ([5] if shape[-1] >= 16 else [])


def test_encode_quantized_i8o_without_outliers_is_i8_with_another_dtype() -> None:
    # Prepare: Gaussian features, no column over 12x its row's mean |x|
    features = np.random.default_rng(5).standard_normal((197, 768)).astype(np.float32)
    quantized, scales = quantize_i8(features)

    # Execute
    without = I8O.encode_quantized(quantized, scales, k=2)
    empty = I8O.encode_quantized(
        quantized, scales, outlier_columns=np.empty(0, np.int64), outlier_values=np.empty((197, 0), np.float32), k=2
    )
    as_i8 = I8.encode_quantized(quantized, scales, k=2)

    # Assert
    assert without.SerializeToString() == empty.SerializeToString() == I8O.encode(features, k=2).SerializeToString()
    assert without.dtype == feature_pb2.DTYPE_I8O and without.payload == as_i8.payload and without.crc32 == as_i8.crc32


def _i8o_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """[6, 64] features with outlier columns 5 (a channel) and 20 (one massive activation); at most 4 allowed."""
    features = np.random.default_rng(6).standard_normal((6, 64)).astype(np.float32)
    features[:, 5] += 60
    features[2, 20] = 400
    inputs = i8o_inputs(features)
    assert inputs[2].tolist() == [5, 20]
    return inputs


def _with_column(quantized: np.ndarray, column: int, value: int) -> np.ndarray:
    changed = quantized.copy()
    changed[3, column] = value
    return changed


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda q, s, c, v: (q, s, c[::-1].astype(np.int64), v), "increasing indices in 0..63"),
        (lambda q, s, c, v: (q, s, np.array([5, 5]), v), "increasing indices in 0..63"),
        (lambda q, s, c, v: (q, s, np.array([5, 64]), v), "increasing indices in 0..63"),
        (lambda q, s, c, v: (q, s, np.array([-1, 5]), v), "increasing indices in 0..63"),
        (lambda q, s, c, v: (q, s, np.arange(1, 6), np.ones((6, 5), np.float32)), "at most 4 outlier columns"),
        (lambda q, s, c, v: (q, s, c.astype(np.float32), v), "1-D integer numpy array"),
        (lambda q, s, c, v: (q, s, c.tolist(), v), "1-D integer numpy array"),
        (lambda q, s, c, v: (q, s, c.reshape(1, 2), v), "1-D integer numpy array"),
        (lambda q, s, c, v: (q, s, c, None), "outlier_values must be a float32 numpy array of shape \\[6, 2\\]"),
        (lambda q, s, c, v: (q, s, None, v), "outlier_columns must be a 1-D integer numpy array"),
        (lambda q, s, c, v: (q, s, c, v.T.copy()), "of shape \\[6, 2\\], got float32 array of shape \\[2, 6\\]"),
        (lambda q, s, c, v: (q, s, c, v[:, :1].copy()), "of shape \\[6, 2\\]"),
        (lambda q, s, c, v: (q, s, c, v.astype(np.float64)), "float32 numpy array"),
        (lambda q, s, c, v: (q, s, c, v.tolist()), "float32 numpy array"),
        (lambda q, s, c, v: (q, s, c, np.where(v == v.max(), np.float32("nan"), v)), "NaN or Inf"),
        (lambda q, s, c, v: (q, s, c, np.where(v == v.min(), np.float32("-inf"), v)), "NaN or Inf"),
        (lambda q, s, c, v: (_with_column(q, 5, 1), s, c, v), "must be 0 in the outlier columns"),
        (lambda q, s, c, v: (_with_column(q, 20, -127), s, c, v), "must be 0 in the outlier columns"),
    ],
    ids=[
        "decreasing", "repeated", "column = D", "negative column", "too many", "float columns", "list columns",
        "2-D columns", "values missing", "columns missing", "values transposed", "values too few", "float64 values",
        "list values", "NaN value", "-Inf value", "int8 in an outlier column", "int8 in the last outlier column",
    ],
)  # fmt: skip
def test_encode_quantized_i8o_refuses_inconsistent_outliers(change, problem: str) -> None:
    quantized, scales, columns, values = change(*_i8o_case())

    with pytest.raises(InvalidArgumentError, match=problem):
        I8O.encode_quantized(quantized, scales, outlier_columns=columns, outlier_values=values)


# Unsigned indices that go backwards must be refused too: a diff of unsigned values wraps around.
@pytest.mark.parametrize(
    "column_dtype",
    [
        np.int64,
        np.int32,
        np.int16,
        np.uint32,
        np.uint64,
        np.uint16,
    ],
)
def test_encode_quantized_i8o_refuses_decreasing_columns_of_any_integer_dtype(column_dtype) -> None:
    quantized, scales, columns, values = _i8o_case()

    with pytest.raises(InvalidArgumentError, match="increasing indices in 0..63"):
        I8O.encode_quantized(
            quantized, scales, outlier_columns=columns[::-1].astype(column_dtype), outlier_values=values
        )


def test_encode_quantized_i8o_refuses_a_huge_unsigned_column_ahead_of_a_valid_one() -> None:
    quantized, scales, _, values = _i8o_case()

    with pytest.raises(InvalidArgumentError, match="increasing indices in 0..63"):
        I8O.encode_quantized(
            quantized, scales, outlier_columns=np.array([2**32 + 5, 20], np.uint64), outlier_values=values
        )


@pytest.mark.parametrize(("columns", "values"), [(True, True), (True, False), (False, True)])
def test_encode_quantized_i8_refuses_outlier_columns(columns: bool, values: bool) -> None:
    quantized, scales, outlier_columns, outlier_values = _i8o_case()

    with pytest.raises(InvalidArgumentError, match="outlier columns are an i8o feature; this codec is i8"):
        I8.encode_quantized(
            quantized,
            scales,
            outlier_columns=outlier_columns if columns else None,
            outlier_values=outlier_values if values else None,
        )


def with_outlier_columns(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, list[list[int]]]:
    """Gaussian features [B, ..., D] (B = 3) and the columns i8o must carry apart in each image: image 0 has two
    channels raised by 60 in every row, image 1 none, image 2 one such channel and one massive activation (400).
    Their ratios to the row's mean |x| are over 20 and Gaussian ones under 8: far from the 12x threshold."""
    features = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    dims = shape[-1]
    features[0, ..., 3] += 60
    features[0, ..., dims - 8] += 60
    features[2, ..., dims - 1] += 60
    features[2].reshape(-1, dims)[0, 10] = 400
    return features, [[3, dims - 8], [], [10, dims - 1]]


@pytest.mark.parametrize(
    ("mode", "shape"),
    [
        (feature_pb2.GATHER_MODE_MIST, (3, 50, 64)),
        (feature_pb2.GATHER_MODE_LST, (3, 4, 17, 48)),
        (feature_pb2.GATHER_MODE_CLS, (3, 768)),
    ],
    ids=["mist", "lst", "cls"],
)
def test_device_i8o_messages_are_byte_identical_to_encoding_the_floats(mode: int, shape: tuple[int, ...]) -> None:
    # Prepare: images with different outlier columns (and one with none)
    features, expected_columns = with_outlier_columns(7, shape)
    rows = int(np.prod(shape[1:-1]))

    # Execute
    batch = quantize_images_i8o(torch.from_numpy(features)).to_host()
    parts = batch.split()
    on_device = [
        I8O.encode_quantized(q, s, outlier_columns=c, outlier_values=v, backbone=BACKBONE, mode=mode)
        for q, s, c, v in parts
    ]
    on_host = [I8O.encode(image, backbone=BACKBONE, mode=mode) for image in features]

    # Assert
    assert [list(m.outlier_columns) for m in on_host] == expected_columns
    assert [c.tolist() for _, _, c, _ in parts] == expected_columns
    for device_msg, host_msg in zip(on_device, on_host, strict=True):
        assert device_msg.SerializeToString() == host_msg.SerializeToString()
    columns = sum(len(c) for c in expected_columns)
    assert batch.nbytes() == features.size + 4 * 3 * rows + 3 * shape[-1] + 4 * columns * rows
    np.testing.assert_array_equal(features, with_outlier_columns(7, shape)[0])  # the input untouched


@pytest.mark.parametrize(
    "shape", [(4, 17, 32), (3, 4, 17, 48), (5, 768), (1, 50, 64)], ids=["mist", "lst", "cls", "one-image"]
)
def test_device_i8o_batches_without_outliers_are_byte_identical_to_encoding_the_floats(shape: tuple[int, ...]) -> None:
    # Prepare: small Gaussian batches (the unchunked path, no outlier column: the row maxima are reused)
    features = np.random.default_rng(11).standard_normal(shape).astype(np.float32)

    # Execute
    parts = quantize_images_i8o(torch.from_numpy(features)).to_host().split()

    # Assert
    for (q, s, c, v), image in zip(parts, features, strict=True):
        assert len(c) == 0
        device_msg = I8O.encode_quantized(q, s, outlier_columns=c, outlier_values=v, backbone=BACKBONE)
        assert device_msg.SerializeToString() == I8O.encode(image, backbone=BACKBONE).SerializeToString()


def test_large_cpu_batches_are_quantized_i8o_in_chunks_with_the_same_result() -> None:
    # Prepare: 40 images of [50, 192] are 1.5 MB, over the CPU chunk size: chunks of 27 and 13 images
    features = np.random.default_rng(8).standard_normal((40, 50, 192)).astype(np.float32)
    for image in range(0, 40, 3):  # outlier columns in every third image, different ones in each
        features[image, :, image % 192] += 60
        features[image, image % 50, 191 - image] = -400

    # Execute
    batch = quantize_images_i8o(torch.from_numpy(features))
    singles = [quantize_images_i8o(torch.from_numpy(features[i : i + 1])) for i in range(40)]

    # Assert: the same tensors as image by image, and each message as encoding the floats
    for name in ("quantized", "scales", "flags", "values"):
        expected = torch.cat([getattr(single, name) for single in singles])
        assert torch.equal(getattr(batch, name), expected), name
    for image, (q, s, c, v) in zip(features, batch.split(), strict=True):
        device_msg = I8O.encode_quantized(q, s, outlier_columns=c, outlier_values=v)
        assert device_msg.SerializeToString() == I8O.encode(image).SerializeToString()
    assert [len(c) for _, _, c, _ in batch.split()] == [2 if i % 3 == 0 else 0 for i in range(40)]


def test_i8o_quantization_flags_nothing_when_d_is_below_16() -> None:
    # Prepare: D = 15 (at most 15 // 16 = 0 outlier columns), whatever the values
    features = np.random.default_rng(9).standard_normal((4, 10, 15)).astype(np.float32)
    features[:, :, 5] += 1000
    features[1, 2, 7] = -1e6

    # Execute
    batch = quantize_images_i8o(torch.from_numpy(features))
    parts = batch.split()

    # Assert
    assert not batch.flags.any() and tuple(batch.values.shape) == (0, 10)
    for image, (q, s, c, v) in zip(features, parts, strict=True):
        assert c.size == 0 and v.shape == (10, 0)
        device_msg = I8O.encode_quantized(q, s, outlier_columns=c, outlier_values=v)
        assert device_msg.SerializeToString() == I8O.encode(image).SerializeToString()
        assert not device_msg.outlier_columns


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_image_gets_a_non_finite_scale_that_encode_quantized_refuses(bad: float) -> None:
    # Prepare: three images with outlier columns; one value of image 1 is NaN or Inf
    features, _ = with_outlier_columns(10, (3, 12, 32))
    features[1, 4, 6] = bad

    # Execute
    parts = quantize_images_i8o(torch.from_numpy(features)).to_host().split()

    # Assert: that image's row keeps a non-finite scale, refused; the other images encode as on the host
    quantized, scales, columns, values = parts[1]
    assert not np.isfinite(scales[4])
    with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
        I8O.encode_quantized(quantized, scales, outlier_columns=columns, outlier_values=values)
    for image in (0, 2):
        q, s, c, v = parts[image]
        device_msg = I8O.encode_quantized(q, s, outlier_columns=c, outlier_values=v)
        assert device_msg.SerializeToString() == I8O.encode(features[image]).SerializeToString()


def test_i8o_quantization_keeps_the_largest_d_over_16_columns() -> None:
    # Prepare: D = 64 (at most 4 columns), rows of |x| = 1 so every ratio is exact. Image 0: six spikes, one per row
    # (ratios 15 to 58x); image 1: five equal spikes (a tie at the cap: the lower columns win, as in the codec)
    signs = np.where(np.random.default_rng(11).random((2, 8, 64)) < 0.5, -1.0, 1.0).astype(np.float32)
    for row, (column, value) in enumerate([(60, 640.0), (2, 20.0), (45, 320.0), (9, 40.0), (30, 160.0), (17, 80.0)]):
        signs[0, row, column] = value
    for row, column in enumerate([50, 3, 20, 9, 33]):
        signs[1, row, column] = 100.0

    # Execute
    parts = quantize_images_i8o(torch.from_numpy(signs)).to_host().split()

    # Assert
    assert [c.tolist() for _, _, c, _ in parts] == [[17, 30, 45, 60], [3, 9, 20, 33]]
    for image, (q, s, c, v) in zip(signs, parts, strict=True):
        assert find_outlier_columns(image).tolist() == c.tolist()
        device_msg = I8O.encode_quantized(q, s, outlier_columns=c, outlier_values=v)
        assert device_msg.SerializeToString() == I8O.encode(image).SerializeToString()


def test_i8o_quantization_refuses_what_is_not_a_float_batch() -> None:
    for bad in (np.zeros((2, 3), np.float32), torch.zeros(2, 3, dtype=torch.int32), torch.zeros(5)):
        with pytest.raises(InvalidArgumentError, match="float tensor"):
            quantize_images_i8o(bad)  # type: ignore[arg-type]
