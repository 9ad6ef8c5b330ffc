"""Safetensors parsing and weight validation: real files accepted, hostile or unfit ones refused with the right error."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import time
import tracemalloc

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.errors import DataLossError, FailedPreconditionError, InvalidArgumentError
from services.common.wire.weights import (
    MAX_HEADER_BYTES,
    TensorInfo,
    inspect_safetensors,
    parse_safetensors,
    validate_weights,
)

SHAPES = {"blocks.0.qkv.weight": (12, 8), "blocks.0.qkv.bias": (12,), "head.weight": (3, 8)}


def raw_safetensors(header: dict | bytes, data: bytes = b"") -> bytes:
    """A file with exactly this header (a dict is JSON-encoded) followed by `data`; nothing is checked."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def build(tensors: dict[str, tuple[str, tuple[int, ...], bytes]], metadata: dict | None = None) -> bytes:
    """A consistent file: name -> (dtype, shape, raw little-endian bytes), laid out in order."""
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    return raw_safetensors(header, b"".join(data for _, _, data in tensors.values()))


def random_weights(dtype: type = np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}


def bf16_tensor(bits: list[int]) -> tuple[str, tuple[int, ...], bytes]:
    return "BF16", (len(bits),), np.array(bits, dtype="<u2").tobytes()


# ---- parsing ---------------------------------------------------------------------------------------


def test_parse_reads_what_safetensors_wrote():
    # Prepare
    arrays = random_weights()
    blob = safetensors.numpy.save(arrays, metadata={"format": "np"})

    # Execute
    parsed = parse_safetensors(blob)

    # Assert
    assert parsed.metadata == {"format": "np"}
    assert set(parsed.tensors) == set(SHAPES)
    for name, array in arrays.items():
        info = parsed.tensors[name]
        assert (info.dtype, info.shape, info.num_elements) == ("F32", array.shape, array.size)
        assert blob[info.start : info.end] == array.tobytes()


def test_inspect_returns_absolute_offsets_and_zero_sized_tensors():
    # Prepare: a scalar, an empty tensor and a 2x2 matrix, laid out back to back after the header.
    blob = build({"s": ("F32", (), b"\0" * 4), "e": ("F16", (0, 3), b""), "m": ("I8", (2, 2), b"\1\2\3\4")})
    data_start = len(blob) - 8

    # Execute
    tensors = inspect_safetensors(blob)

    # Assert
    assert tensors == {
        "s": TensorInfo("F32", (), data_start, data_start + 4),
        "e": TensorInfo("F16", (0, 3), data_start + 4, data_start + 4),
        "m": TensorInfo("I8", (2, 2), data_start + 4, data_start + 8),
    }


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE = {
    "empty": b"",
    "shorter than the length field": b"\x05\0\0",
    "header length past the end": struct.pack("<Q", 100) + b"{}",
    "header length of 2**63": struct.pack("<Q", 2**63) + b"{}" * 8,
    "pickle of a dict": pickle.dumps({"weight": [1.0, 2.0]}),
    "pickle of an array": pickle.dumps(np.ones(4, np.float32)),
    "zip archive (torch.save)": b"PK\x03\x04" + b"\0" * 60,
    "not JSON": raw_safetensors(b"{not json at all}"),
    "not UTF-8": raw_safetensors(b'{"\xff\xfe": 1}'),
    "JSON array": raw_safetensors(b"[1, 2]"),
    "header lies about the size": raw_safetensors({"a": _entry(shape=(4,), offsets=(0, 8))}, b"\0" * 8),
    "offsets past the buffer": raw_safetensors({"a": _entry(offsets=(0, 8))}, b"\0" * 4),
    "offsets reversed": raw_safetensors({"a": _entry(shape=(0,), offsets=(8, 0))}, b"\0" * 8),
    "overlapping tensors": raw_safetensors({"a": _entry(), "b": _entry(offsets=(4, 12))}, b"\0" * 12),
    "gap between tensors": raw_safetensors({"a": _entry(), "b": _entry(offsets=(12, 20))}, b"\0" * 20),
    "bytes nobody owns": raw_safetensors({"a": _entry()}, b"\0" * 12),
    "duplicate tensor name": raw_safetensors(
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        b"\0" * 4,
    ),
    "unknown dtype": raw_safetensors({"a": _entry(dtype="F128")}, b"\0" * 8),
    "sub-byte dtype": raw_safetensors({"a": _entry(dtype="F4")}, b"\0" * 8),
    "missing data_offsets": raw_safetensors({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
    "extra key": raw_safetensors({"a": {**_entry(), "stride": [1]}}, b"\0" * 8),
    "negative offset": raw_safetensors({"a": _entry(offsets=(-8, 0))}, b"\0" * 8),
    "float offset": raw_safetensors({"a": _entry(offsets=(0.0, 8.0))}, b"\0" * 8),
    "boolean dim": raw_safetensors({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "shape of 1000 dims": raw_safetensors({"a": _entry(shape=(1,) * 1000, offsets=(0, 4))}, b"\0" * 4),
    "astronomical shape": raw_safetensors({"a": _entry(shape=(2**62, 2**62, 0xFFFF), offsets=(0, 8))}, b"\0" * 8),
    "metadata not strings": raw_safetensors({"__metadata__": {"epochs": 3}}),
    "tensor entry not an object": raw_safetensors({"a": [0, 8]}, b"\0" * 8),
    "deeply nested JSON": raw_safetensors(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "integer with 10,000 digits": raw_safetensors(b'{"a": ' + b"9" * 10_000 + b"}"),
}


@pytest.mark.parametrize("blob", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_files_are_invalid_argument(blob):
    # Execute / Assert
    with pytest.raises(InvalidArgumentError, match="not a valid safetensors file"):
        inspect_safetensors(blob)


@pytest.mark.parametrize(
    ("blob", "hint"),
    [(pickle.dumps({"w": [1.0]}), "this is a pickle"), (b"PK\x03\x04" + bytes(60), "as torch.save writes")],
    ids=["pickle", "torch.save zip"],
)
def test_common_wrong_formats_get_a_hint(blob, hint):
    with pytest.raises(InvalidArgumentError, match=hint):
        inspect_safetensors(blob)


def test_header_over_the_limit_is_refused_but_a_higher_limit_accepts_it():
    # Prepare: a valid file whose header is padded (as the format allows) past the default limit.
    header = json.dumps({"a": _entry(shape=(1,), offsets=(0, 4))}).encode()
    padded = header + b" " * (MAX_HEADER_BYTES + 1 - len(header))
    blob = raw_safetensors(padded, b"\0" * 4)

    # Execute / Assert
    with pytest.raises(InvalidArgumentError, match="exceeds the limit of 1048576 bytes"):
        inspect_safetensors(blob)
    assert inspect_safetensors(blob, max_header_bytes=2 * MAX_HEADER_BYTES)["a"].shape == (1,)


def test_lying_header_over_a_large_blob_is_refused_fast_without_copying_the_data():
    # Prepare: 64 MiB of data whose header claims a shape that needs 2**70 elements.
    data = bytes(64 << 20)
    blob = raw_safetensors({"a": _entry(dtype="F32", shape=(2**35, 2**35), offsets=(0, len(data)))}, data)
    tracemalloc.start()

    # Execute
    started = time.perf_counter()
    with pytest.raises(InvalidArgumentError, match="does not fill"):
        inspect_safetensors(blob)
    elapsed_s = time.perf_counter() - started
    _, peak_bytes = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # Assert
    assert elapsed_s < 0.5
    assert peak_bytes < 1 << 20


# ---- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_validate_accepts_matching_weights_and_summarises_them(dtype):
    # Prepare
    blob = safetensors.numpy.save(random_weights(dtype), metadata={"tuner": "test"})
    digest = hashlib.sha256(blob).hexdigest()

    # Execute
    summary = validate_weights(blob, SHAPES, declared_sha256=digest.upper(), declared_size=len(blob))

    # Assert
    assert (summary.sha256, summary.size_bytes) == (digest, len(blob))
    assert (summary.tensor_count, summary.parameter_count) == (3, 12 * 8 + 12 + 3 * 8)
    assert summary.metadata == {"tuner": "test"}


def test_validate_accepts_finite_bf16_extremes():
    # Prepare: largest finite bf16, smallest subnormal, negative zero.
    blob = build({"a": bf16_tensor([0x7F7F, 0xFF7F, 0x0001, 0x8000])})

    # Execute
    summary = validate_weights(blob, {"a": (4,)})

    # Assert
    assert summary.parameter_count == 4


@pytest.mark.parametrize(
    "tensor",
    [
        ("F32", (3,), np.array([0.0, np.nan, 1.0], "<f4").tobytes()),
        ("F32", (2,), np.array([np.inf, 1.0], "<f4").tobytes()),
        ("F16", (2,), np.array([1.0, -np.inf], "<f2").tobytes()),
        bf16_tensor([0x3F80, 0x7FC0]),  # 1.0, NaN
        bf16_tensor([0xFF80, 0x3F80]),  # -Inf, 1.0
    ],
    ids=["f32-nan", "f32-inf", "f16-neg-inf", "bf16-nan", "bf16-neg-inf"],
)
def test_validate_refuses_nan_and_inf(tensor):
    # Prepare
    blob = build({"ok": ("F32", (1,), b"\0" * 4), "bad": tensor})

    # Execute / Assert
    with pytest.raises(InvalidArgumentError, match="tensor 'bad' holds 1 NaN or Inf values"):
        validate_weights(blob, {"ok": (1,), "bad": tensor[1]})


def test_validate_refuses_integer_dtypes():
    blob = build({"a": ("I64", (2,), b"\0" * 16)})
    with pytest.raises(InvalidArgumentError, match=r"weights must be F32/F16/BF16; found \['a \(I64\)'\]"):
        validate_weights(blob, {"a": (2,)})


@pytest.mark.parametrize(
    ("expected", "message"),
    [
        ({**SHAPES, "head.bias": (3,)}, r"missing \['head.bias'\]"),
        ({k: v for k, v in SHAPES.items() if k != "head.weight"}, r"unexpected \['head.weight'\]"),
        ({**SHAPES, "head.weight": (5, 8)}, r"wrong shape \['head.weight \[3, 8\] != \[5, 8\]'\]"),
    ],
    ids=["missing", "extra", "mis-shaped"],
)
def test_validate_names_tensors_that_do_not_fit(expected, message):
    blob = safetensors.numpy.save(random_weights())
    with pytest.raises(FailedPreconditionError, match=message):
        validate_weights(blob, expected)


def test_validate_names_only_the_first_five_offenders():
    # Prepare
    expected = {f"layer.{i}": (2,) for i in range(8)}
    blob = build({"other": ("F32", (1,), b"\0" * 4)})

    # Execute
    with pytest.raises(FailedPreconditionError) as caught:
        validate_weights(blob, expected)

    # Assert
    assert "missing ['layer.0', 'layer.1', 'layer.2', 'layer.3', 'layer.4'] ..." in str(caught.value)
    assert "layer.5" not in str(caught.value)


@pytest.mark.parametrize(
    ("declared", "error", "message"),
    [
        ({"declared_sha256": "0" * 64}, DataLossError, "sha256 of the received blob is"),
        ({"declared_size": 1}, DataLossError, "but the push declared 1"),
        ({"declared_sha256": "abc"}, InvalidArgumentError, "64 hex digits"),
    ],
)
def test_validate_checks_what_the_client_declared(declared, error, message):
    blob = safetensors.numpy.save(random_weights())
    with pytest.raises(error, match=message):
        validate_weights(blob, SHAPES, **declared)


def test_transport_damage_is_reported_before_format_problems():
    # Prepare: random bytes (not safetensors) that also miss the declared sha256.
    blob = bytes(range(256))

    # Execute / Assert: a corrupted upload should read as DATA_LOSS, not as a user's format mistake.
    with pytest.raises(DataLossError):
        validate_weights(blob, SHAPES, declared_sha256="1" * 64)


# ---- fuzz ------------------------------------------------------------------------------------------

DOCUMENTED = (InvalidArgumentError, FailedPreconditionError, DataLossError)
VALID_BLOB = safetensors.numpy.save(random_weights())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_raise_only_invalid_argument(blob):
    try:
        inspect_safetensors(blob)
    except InvalidArgumentError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(VALID_BLOB) - 1), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, len(VALID_BLOB)),
)
def test_fuzz_damaged_real_files_raise_only_documented_errors(edits, keep):
    # Prepare: overwrite a few bytes of a real file, then maybe truncate it.
    damaged = bytearray(VALID_BLOB)
    for position, value in edits:
        damaged[position] = value
    blob = bytes(damaged[:keep])

    # Execute / Assert: anything but a documented domain error (or success) fails the test.
    try:
        validate_weights(blob, SHAPES)
    except DOCUMENTED:
        pass
