"""Device-side int8 quantization (services/extractor/quantize.py) and FeatureCodec.encode_quantized: the message is
byte-identical to encoding the floats on the host, and every way a quantized tensor can be wrong is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from services.common.errors import InvalidArgumentError
from services.common.pb import feature_pb2
from services.common.wire.codec import CodecConfig, FeatureCodec, decode_feature, quantize_i8
from services.extractor.quantize import quantize_rows_i8

I8 = FeatureCodec(CodecConfig.parse("i8-zstd"))
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


def test_encode_quantized_needs_an_i8_codec() -> None:
    with pytest.raises(InvalidArgumentError, match="needs an i8 codec, this one is f16-zstd"):
        FeatureCodec(CodecConfig.parse("f16-zstd")).encode_quantized(*_quantized())
