"""Safetensors parsing and validation of pushed edge-network weights, without torch and never pickle.

    summary = validate_weights(blob, state_shapes(config), declared_sha256=sha256, declared_size=size)  # the registry
    summary.sha256, summary.parameter_count, summary.metadata
    config, metadata = check_edge_weights(blob, expected=task_config)   # the tuner, before loading anything
    info = parse_safetensors(blob).tensors[name]                        # .dtype, .shape, .start, .end

Checks run cheapest to blame first: checksum and size (DataLossError); a strict parse that survives hostile headers
with bounded memory, and float dtypes only (InvalidArgumentError); names and shapes exactly as the task's edge
network (FailedPreconditionError); finite values, bf16 included, by bit pattern (InvalidArgumentError).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.errors import DataLossError, FailedPreconditionError, InvalidArgumentError
from services.common.wire.edge_spec import CONFIG_METADATA_KEY, EdgeNetworkConfig, check_state_shapes, shape_problems

# A real edge network's header is a few KiB (about 40 tensors); 1 MiB leaves room for big metadata
# while keeping what a hostile length field can make us copy and parse small.
MAX_HEADER_BYTES = 1 << 20
# No real tensor has more dims; the cap also bounds the work of multiplying hostile shapes.
MAX_TENSOR_DIMS = 64
METADATA_KEY = "__metadata__"
FLOAT_DTYPES: tuple[str, ...] = ("F32", "F16", "BF16")
_TENSOR_KEYS = frozenset({"dtype", "shape", "data_offsets"})

# Bytes per element of every byte-sized dtype the safetensors format defines. Anything else (sub-byte
# formats, typos, future additions) is refused rather than guessed.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

# For each float dtype: the unsigned view and the exponent mask. All exponent bits set means Inf or NaN,
# which is also how bf16 (which numpy lacks) is checked.
_NONFINITE_MASKS: dict[str, tuple[str, int]] = {
    "F32": ("<u4", 0x7F80_0000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
}
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header, with offsets already checked against the blob."""

    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]  # dims, outermost first; () for a scalar
    start: int  # absolute byte offset of the first element in the blob
    end: int  # absolute byte offset one past the last element

    @property
    def num_elements(self) -> int:
        return (self.end - self.start) // DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class ParsedSafetensors:
    """A checked safetensors header: tensors by name (in file order) and the free-form metadata."""

    tensors: dict[str, TensorInfo]  # name -> dtype, shape and absolute offsets
    metadata: dict[str, str]  # the "__metadata__" entry; {} when absent


@dataclass(frozen=True)
class WeightsSummary:
    """What validate_weights learned about an accepted blob."""

    sha256: str  # lowercase hex of the whole blob
    size_bytes: int  # length of the whole blob
    tensor_count: int  # number of tensors in the file
    parameter_count: int  # sum of the tensors' element counts
    metadata: dict[str, str]  # the file's "__metadata__" entry


def sha256_hex(blob: bytes | memoryview) -> str:
    return hashlib.sha256(blob).hexdigest()


def _invalid(reason: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"not a valid safetensors file: {reason}")


def _label(name: str) -> str:
    # Tensor names come from the file: a hostile one may be a megabyte long.
    return repr(name) if len(name) <= 80 else repr(name[:80]) + "..."


def _format_hint(blob: memoryview) -> str:
    """Names the common wrong formats, so `torch.save` output gets an actionable message."""
    if bytes(blob[:4]) == b"PK\x03\x04":
        return " (this is a zip archive, as torch.save writes: save with safetensors.torch.save_file instead)"
    if len(blob) >= 2 and blob[0] == 0x80 and blob[1] <= 5:
        return " (this is a pickle, which the registry never loads: save with safetensors instead)"
    return ""


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last duplicate; two entries for one tensor name are a lie we refuse.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _invalid(f"duplicate key {key[:80]!r} in the header")
        result[key] = value
    return result


def _load_header(blob: memoryview, max_header_bytes: int) -> tuple[dict[str, Any], int]:
    """Returns the header object and the absolute offset where the data buffer starts."""
    if len(blob) < 8:
        raise _invalid(f"{len(blob)} bytes is too short for the 8-byte header length")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > max_header_bytes:
        raise _invalid(f"header length {header_len} exceeds the limit of {max_header_bytes} bytes{_format_hint(blob)}")
    if 8 + header_len > len(blob):
        raise _invalid(f"header length {header_len} runs past the end of the {len(blob)}-byte blob{_format_hint(blob)}")
    raw = bytes(blob[8 : 8 + header_len])
    # Checked before parsing so that pickles, zip archives and random bytes fail with a plain message.
    if not raw.startswith(b"{"):
        raise _invalid(f"the header does not start with '{{'{_format_hint(blob)}")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except InvalidArgumentError:
        raise
    except (ValueError, RecursionError) as error:  # bad UTF-8, bad JSON, ints past Python's digit limit
        raise _invalid(f"the header is not valid JSON ({type(error).__name__}: {str(error)[:200]})") from error
    if not isinstance(header, dict):
        raise _invalid("the header is not a JSON object")
    return header, 8 + header_len


def _check_metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _invalid("__metadata__ must map strings to strings")
    return dict(value)


def _is_count(value: object) -> bool:
    # bool is an int subclass and JSON floats like 4.0 are not counts.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _element_count(name: str, shape: object, limit: int) -> tuple[tuple[int, ...], int]:
    """Checks a shape list; the count stops growing once past `limit` (the blob can hold no more)."""
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS or not all(_is_count(d) for d in shape):
        raise _invalid(f"tensor {_label(name)} has a bad shape (a list of at most {MAX_TENSOR_DIMS} non-negative ints)")
    if 0 in shape:
        return tuple(shape), 0
    count = 1
    for dim in shape:
        count = min(count * dim, limit + 1)
    return tuple(shape), count


def _check_entry(name: str, entry: object, buffer_len: int) -> tuple[str, tuple[int, ...], int, int]:
    """Validates one tensor entry; returns dtype, shape and offsets relative to the data buffer."""
    if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
        raise _invalid(f"tensor {_label(name)} must be an object with exactly the keys {sorted(_TENSOR_KEYS)}")
    dtype = entry["dtype"]
    if dtype not in DTYPE_SIZES:
        raise _invalid(f"tensor {_label(name)} has unknown dtype {str(dtype)[:40]!r}")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise _invalid(f"tensor {_label(name)} data_offsets must be two non-negative ints")
    begin, end = offsets
    if not begin <= end <= buffer_len:
        raise _invalid(f"tensor {_label(name)} offsets [{begin}, {end}] fall outside the {buffer_len}-byte data buffer")
    shape, count = _element_count(name, entry["shape"], buffer_len)
    if count * DTYPE_SIZES[dtype] != end - begin:
        raise _invalid(
            f"tensor {_label(name)} of dtype {dtype} and shape {list(shape)} does not fill {end - begin} bytes"
        )
    return dtype, shape, begin, end


def parse_safetensors(blob: bytes | memoryview, *, max_header_bytes: int = MAX_HEADER_BYTES) -> ParsedSafetensors:
    """Parses and checks a safetensors blob without copying its data; any inconsistency is InvalidArgumentError.

    Beyond well-formed JSON, the tensors must tile the data buffer exactly: sorted by offset they start at 0,
    each begins where the previous ends (no gap, no overlap) and the last ends at the end of the blob.
    """
    view = memoryview(blob).cast("B")
    header, data_start = _load_header(view, max_header_bytes)
    metadata = _check_metadata(header.pop(METADATA_KEY, None))
    buffer_len = len(view) - data_start
    entries = {name: _check_entry(name, entry, buffer_len) for name, entry in header.items()}
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != position:
            kind = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
            raise _invalid(f"tensor {_label(name)} at offset {begin} {kind} (expected {position})")
        position = end
    if position != buffer_len:
        raise _invalid(f"tensors cover {position} of the {buffer_len} data bytes; the rest is unaccounted for")
    tensors = {
        name: TensorInfo(dtype, shape, data_start + begin, data_start + end)
        for name, (dtype, shape, begin, end) in entries.items()
    }
    return ParsedSafetensors(tensors=tensors, metadata=metadata)


def inspect_safetensors(blob: bytes | memoryview, *, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorInfo]:
    """Tensor name -> dtype, shape and absolute offsets of a checked safetensors blob."""
    return parse_safetensors(blob, max_header_bytes=max_header_bytes).tensors


def _check_declared(blob: memoryview, declared_sha256: str | None, declared_size: int | None) -> str:
    """Returns the blob's sha256; DataLossError when it or the size differs from what the client declared."""
    if declared_size is not None and declared_size != len(blob):
        raise DataLossError(f"received {len(blob)} bytes but the push declared {declared_size}")
    actual = sha256_hex(blob)
    if declared_sha256 is not None:
        declared = declared_sha256.strip().lower()
        if not _SHA256_HEX.fullmatch(declared):
            raise InvalidArgumentError(f"declared sha256 must be 64 hex digits, got {declared_sha256[:80]!r}")
        if declared != actual:
            raise DataLossError(f"sha256 of the received blob is {actual}, the push declared {declared}")
    return actual


def _check_shapes(tensors: Mapping[str, TensorInfo], expected: Mapping[str, Sequence[int]]) -> None:
    problems = shape_problems(
        {name: list(shape) for name, shape in expected.items()},
        {name: list(info.shape) for name, info in tensors.items()},
        label_sep=" ",
    )
    if problems:
        raise FailedPreconditionError(f"weights do not match the task's edge network: {'; '.join(problems)}")


def _check_finite(view: memoryview, tensors: Mapping[str, TensorInfo]) -> None:
    for name, info in tensors.items():
        bits_dtype, exponent_mask = _NONFINITE_MASKS[info.dtype]
        bits = np.frombuffer(view[info.start : info.end], dtype=bits_dtype)
        bad = int(np.count_nonzero((bits & exponent_mask) == exponent_mask))
        if bad:
            raise InvalidArgumentError(f"tensor {_label(name)} holds {bad} NaN or Inf values out of {bits.size}")


def validate_weights(
    blob: bytes | memoryview,
    expected_shapes: Mapping[str, Sequence[int]],
    *,
    declared_sha256: str | None = None,
    declared_size: int | None = None,
) -> WeightsSummary:
    """Accepts a blob only if it is intact, parses, has float tensors of exactly the expected shapes, all finite.

    Checks run cheapest-to-blame first: transport (DataLossError), format and dtypes (InvalidArgumentError),
    fit to the task (FailedPreconditionError), then values (InvalidArgumentError on NaN/Inf).
    """
    view = memoryview(blob).cast("B")
    digest = _check_declared(view, declared_sha256, declared_size)
    parsed = parse_safetensors(view)
    not_float = [f"{name} ({info.dtype})" for name, info in parsed.tensors.items() if info.dtype not in FLOAT_DTYPES]
    if not_float:
        raise InvalidArgumentError(f"weights must be {'/'.join(FLOAT_DTYPES)}; found {not_float[:5]}")
    _check_shapes(parsed.tensors, expected_shapes)
    _check_finite(view, parsed.tensors)
    return WeightsSummary(
        sha256=digest,
        size_bytes=len(view),
        tensor_count=len(parsed.tensors),
        parameter_count=sum(info.num_elements for info in parsed.tensors.values()),
        metadata=parsed.metadata,
    )


def check_edge_weights(
    blob: bytes | memoryview, expected: EdgeNetworkConfig | None = None
) -> tuple[EdgeNetworkConfig, dict[str, str]]:
    """Checks edge-network weights before anything is loaded: (the config they carry, their metadata).

    The same strict parse as the registry's, plus what the tuner needs to rebuild the network: a valid config
    in the metadata (else InvalidArgumentError), equal to `expected` (the task's) when given, tensors exactly
    as that config's state shapes, float32 only (else FailedPreconditionError). Values are checked later.
    """
    parsed = parse_safetensors(blob)
    if CONFIG_METADATA_KEY not in parsed.metadata:
        raise InvalidArgumentError(f"safetensors metadata lacks {CONFIG_METADATA_KEY!r}: not edge network weights")
    config = EdgeNetworkConfig.from_json(parsed.metadata[CONFIG_METADATA_KEY])
    if expected is not None and config != expected:
        raise FailedPreconditionError(
            f"weights are for edge network {config.to_json()}, the task expects {expected.to_json()}"
        )
    check_state_shapes(config, {name: info.shape for name, info in parsed.tensors.items()})
    not_f32 = sorted(name for name, info in parsed.tensors.items() if info.dtype != "F32")
    if not_f32:
        raise FailedPreconditionError(f"edge network weights must be float32; not so: {not_f32[:5]}")
    return config, parsed.metadata
