"""Wire codec for gathered features: a float array <-> one `feature_pb2.FeatureTensor` message.

The extractor encodes (f32 / f16 / bf16 / per-row i8 / i8 with outlier columns / 4-bit per group, byte shuffle,
zstd); the edge tuner decodes. Decoding trusts nothing in the message: every field is checked and memory stays
bounded by the declared shape. Layouts: docs/reference/wire-format.md.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import zlib
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import zstandard

from services.common.errors import DataLossError, InvalidArgumentError
from services.common.pb import feature_pb2

DTypeName = Literal["f32", "f16", "bf16", "i8", "i8o", "i4"]
CompressionName = Literal["none", "zstd"]
DTYPES: tuple[DTypeName, ...] = get_args(DTypeName)
COMPRESSIONS: tuple[CompressionName, ...] = get_args(CompressionName)
# The default element type, also for a CodecSpec that leaves dtype unset: per-row int8 that stays accurate on the
# outlier channels and massive activations of pretrained ViTs (docs/explanation/transfer.md, "Codec choice").
DEFAULT_DTYPE: DTypeName = "i8o"

# zstd's own default. Features gain from entropy coding, not matches: levels 9 and 19 shrink i8/f16 features by
# under 1 % (measured) at 2x and 100x the CPU.
DEFAULT_ZSTD_LEVEL = 3
MIN_ZSTD_LEVEL, MAX_ZSTD_LEVEL = 1, 22
# The largest sensible tensor: LST on ViT-L/14 at 336 px is 25 maps x 577 tokens x 1024 dims = 14.8 M elements
# (ViT-g/14 at 224 px, 41 x 257 x 1408, is 14.8 M too). 2**24 = 16.8 M covers both: 64 MiB as float32.
DEFAULT_MAX_ELEMENTS = 1 << 24
MAX_DIMS = 4
# Largest zstd window a frame may ask for, whatever its size: 128 MiB holds a whole 2**25-element f32 tensor.
MAX_ZSTD_WINDOW_BYTES = 1 << 27
# Windows up to this size are accepted even for small tensors: streaming encoders (unknown content size) use
# the level's full window, at most 8 MiB up to level 19.
_SMALL_WINDOW_BYTES = 1 << 23
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # a zstd frame (skippable frames and other formats are refused)
F16_MAX = 65504.0  # the largest finite float16
_F16_OVERFLOW = 65520.0  # halfway to the next power of two: from here on, round-to-nearest gives inf
_I8_MAX = 127
# Rows whose max |x| is below this are stored as zeros: a smaller scale (max / 127) would be subnormal in
# float32 and its reciprocal would overflow. The absolute error of such a row is below 1.5e-36.
_F32_TINY = float(np.finfo(np.float32).tiny)
_I8_MIN_ROW_MAX = _F32_TINY * _I8_MAX
# Outlier columns (i8o, i4): a column of the last dim is carried apart, as int16 with its own float32 scale, when
# one of its values exceeds this many times the mean |x| of that value's row. Pretrained ViTs have a few channels
# 20-100x the rest in every token and rare single activations far beyond that; Gaussian-like features never reach
# 12x their row's mean |x| (about 10 sigma), so on them no column is flagged and i8o is exactly i8.
OUTLIER_RATIO = 12.0
# At most 1/16 of the columns are carried apart (the most extreme ones): a bound on the bytes they can add.
OUTLIER_COLUMN_SHARE = 16
_I16_MAX = 32767
_I16_MIN_COLUMN_MAX = _F32_TINY * _I16_MAX
# i4: symmetric levels -7..7 stored as the nibble q + 8 (so nibble 0 is never written), one bfloat16 scale per
# group of I4_GROUP_SIZE values along the last dim (rounded up, so no value clips), two values per byte.
_I4_MAX = 7
I4_GROUP_SIZE = 32
_I4_MIN_GROUP_MAX = _F32_TINY * _I4_MAX
_QUANTIZED_DTYPES = frozenset({"i8", "i8o", "i4"})  # one byte or less per element: no byte shuffle
_OUTLIER_DTYPES = frozenset({"i8o", "i4"})
_ROW_SCALED_DTYPES = frozenset({"i8", "i8o"})  # one float32 scale per row in `scales`

# How each dtype's elements are stored in the (decompressed, unshuffled) payload: little-endian always.
_STORED_NUMPY_DTYPE: dict[DTypeName, np.dtype] = {
    "f32": np.dtype("<f4"),
    "f16": np.dtype("<f2"),
    "bf16": np.dtype("<u2"),  # numpy has no bfloat16: the raw upper 16 bits of a float32
    "i8": np.dtype("i1"),
    "i8o": np.dtype("i1"),  # then the outlier columns as <i2, column after column
    "i4": np.dtype("u1"),  # bfloat16 group scales, then packed nibbles, then the outlier columns as <i2
}
# Unsigned little-endian words of each element size, for byte shuffling by shifts.
_WORD_DTYPE: dict[int, np.dtype] = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_DTYPE_TO_PROTO: dict[DTypeName, int] = {name: feature_pb2.DType.Value(f"DTYPE_{name.upper()}") for name in DTYPES}
_DTYPE_FROM_PROTO: dict[int, DTypeName] = {value: name for name, value in _DTYPE_TO_PROTO.items()}
_COMPRESSION_TO_PROTO: dict[CompressionName, int] = {
    name: feature_pb2.Compression.Value(f"COMPRESSION_{name.upper()}") for name in COMPRESSIONS
}
_COMPRESSION_FROM_PROTO: dict[int, CompressionName] = {value: name for name, value in _COMPRESSION_TO_PROTO.items()}
_GATHER_MODES = frozenset(feature_pb2.GatherMode.values())

_NAME_PATTERN = re.compile(r"^(f32|f16|bf16|i8o|i8|i4)(?:-(none|zstd)(?:-(\d{1,2}))?)?(-noshuffle)?$")
_VALID_NAMES = (
    '"<dtype>[-<compression>[-<level>]][-noshuffle]" with dtype f32|f16|bf16|i8|i8o|i4, compression none|zstd '
    f"(default zstd), level {MIN_ZSTD_LEVEL}..{MAX_ZSTD_LEVEL} (zstd only, default {DEFAULT_ZSTD_LEVEL}); "
    'e.g. "i8o-zstd", "i4-zstd", "f16-zstd-9", "f32-none", "f16", "bf16-zstd-noshuffle"'
)


def _is_integer(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class FeatureDecodeError(DataLossError):
    """A FeatureTensor that cannot be what its header claims; `field` names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"bad FeatureTensor: {field}: {problem}")
        self.field = field


class UnsupportedFeatureError(InvalidArgumentError):
    """A FeatureTensor in a dtype this decoder does not know (a newer encoder's): INVALID_ARGUMENT, not DATA_LOSS.

    Nothing in such a message can be checked or read, so it is refused before its payload is touched.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"unsupported FeatureTensor: {field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class CodecConfig:
    """How features are encoded. Settings that do nothing are normalised so equal encodings compare equal."""

    dtype: DTypeName = DEFAULT_DTYPE  # element type on the wire; i8o = per-row int8 plus int16 outlier columns
    compression: CompressionName = "zstd"  # zstd or none (none only makes sense on a fast local link)
    zstd_level: int = DEFAULT_ZSTD_LEVEL  # 1..22; reset to the default when compression is none
    byte_shuffle: bool = True  # group float bytes by significance before zstd; False for i8 and for none

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidArgumentError(f"unknown codec dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.compression not in COMPRESSIONS:
            raise InvalidArgumentError(
                f"unknown codec compression {self.compression!r}: expected one of {', '.join(COMPRESSIONS)}"
            )
        level = self.zstd_level
        if not _is_integer(level) or not MIN_ZSTD_LEVEL <= level <= MAX_ZSTD_LEVEL:
            raise InvalidArgumentError(
                f"zstd level must be an integer in {MIN_ZSTD_LEVEL}..{MAX_ZSTD_LEVEL}, got {level!r}"
            )
        # Shuffling 1-byte elements is the identity and shuffling without compression buys nothing.
        if self.dtype in _QUANTIZED_DTYPES or self.compression == "none":
            object.__setattr__(self, "byte_shuffle", False)
        if self.compression == "none":
            object.__setattr__(self, "zstd_level", DEFAULT_ZSTD_LEVEL)

    @classmethod
    def parse(cls, text: str) -> CodecConfig:
        """Parse a user-facing name such as "i8-zstd", "f16-zstd-9", "f32-none" or "f16" (zstd, default level)."""
        match = _NAME_PATTERN.match(text.strip().lower()) if isinstance(text, str) else None
        if match is None:
            raise InvalidArgumentError(f"bad codec name {text!r}: expected {_VALID_NAMES}")
        dtype, compression, level, noshuffle = match.groups()
        if compression == "none" and level is not None:
            raise InvalidArgumentError(
                f"bad codec name {text!r}: a level only applies to zstd; expected {_VALID_NAMES}"
            )
        try:
            return cls(
                dtype=dtype,
                compression=compression or "zstd",
                zstd_level=int(level) if level is not None else DEFAULT_ZSTD_LEVEL,
                byte_shuffle=noshuffle is None,
            )
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"bad codec name {text!r}: {exc}; expected {_VALID_NAMES}") from None

    @functools.cached_property  # read per image on the extractor's hot path (cache keys, metrics)
    def name(self) -> str:
        """The canonical name: `CodecConfig.parse(config.name) == config`."""
        parts = [self.dtype, self.compression]
        if self.compression == "zstd" and self.zstd_level != DEFAULT_ZSTD_LEVEL:
            parts.append(str(self.zstd_level))
        if self.compression == "zstd" and self.dtype not in _QUANTIZED_DTYPES and not self.byte_shuffle:
            parts.append("noshuffle")
        return "-".join(parts)

    @classmethod
    def from_proto(cls, spec: feature_pb2.CodecSpec) -> CodecConfig:
        """Server-side view of a client's CodecSpec: unset fields take the defaults (i8o, zstd, level 3)."""
        dtype = DEFAULT_DTYPE if spec.dtype == feature_pb2.DTYPE_UNSPECIFIED else _DTYPE_FROM_PROTO.get(spec.dtype)
        if dtype is None:
            raise InvalidArgumentError(f"unknown CodecSpec.dtype enum value {spec.dtype}")
        compression = (
            "zstd"
            if spec.compression == feature_pb2.COMPRESSION_UNSPECIFIED
            else _COMPRESSION_FROM_PROTO.get(spec.compression)
        )
        if compression is None:
            raise InvalidArgumentError(f"unknown CodecSpec.compression enum value {spec.compression}")
        level = spec.zstd_level or DEFAULT_ZSTD_LEVEL
        return cls(dtype=dtype, compression=compression, zstd_level=level, byte_shuffle=not spec.no_byte_shuffle)

    def to_proto(self) -> feature_pb2.CodecSpec:
        """The explicit CodecSpec for this config (no_byte_shuffle only where shuffling applies)."""
        shuffle_applies = self.dtype not in _QUANTIZED_DTYPES and self.compression == "zstd"
        return feature_pb2.CodecSpec(
            dtype=_DTYPE_TO_PROTO[self.dtype],
            compression=_COMPRESSION_TO_PROTO[self.compression],
            zstd_level=self.zstd_level,
            no_byte_shuffle=shuffle_applies and not self.byte_shuffle,
        )


DEFAULT_CODEC = CodecConfig()
# The codecs the benchmark compares, by canonical name.
ALL_CODECS: tuple[str, ...] = (
    "f32-none", "f32-zstd", "f16-none", "f16-zstd", "bf16-zstd", "i8-none", "i8-zstd", "i8o-zstd", "i4-zstd",
)  # fmt: skip


@dataclass(frozen=True)
class _Stored:
    """What an encoder puts in a message besides the header: the payload before shuffling and compression
    (1-D or typed elements), and the dtype-specific side fields."""

    plain: np.ndarray  # elements in their stored little-endian type (i8o, i4: the whole payload as uint8)
    scales: np.ndarray | None = None  # i8, i8o: float32 per row
    outlier_columns: np.ndarray | None = None  # i8o, i4: uint32, increasing
    outlier_scales: np.ndarray | None = None  # i8o, i4: float32 per outlier column
    group_size: int = 0  # i4: values per scale along the last dim


class FeatureCodec:
    """Encodes float arrays into FeatureTensor messages. One instance may be shared by many threads."""

    def __init__(self, config: CodecConfig = DEFAULT_CODEC) -> None:
        self._config = config

    @property
    def config(self) -> CodecConfig:
        return self._config

    def encode(
        self,
        array: np.ndarray,
        *,
        backbone: feature_pb2.BackboneId | None = None,
        mode: int = feature_pb2.GATHER_MODE_MIST,
        k: int = 0,
    ) -> feature_pb2.FeatureTensor:
        """Encode a finite float array with 1 to 4 dims (e.g. [197, 768]) into one self-describing message."""
        _check_mode_and_k(mode, k)
        values = _validated_input(array)
        return self._message(values.shape, _to_stored(values, self._config.dtype), backbone, mode, k)

    def encode_quantized(
        self,
        quantized: np.ndarray,
        scales: np.ndarray,
        *,
        outlier_columns: np.ndarray | None = None,
        outlier_values: np.ndarray | None = None,
        backbone: feature_pb2.BackboneId | None = None,
        mode: int = feature_pb2.GATHER_MODE_MIST,
        k: int = 0,
    ) -> feature_pb2.FeatureTensor:
        """Encode features already quantized to int8 elsewhere (the extractor does it on the backbone's device).

        For i8: `quantized` is int8 with 1 to 4 dims, `scales` float32 with one value per row (the product of all
        dims but the last), exactly what `quantize_i8` returns. For i8o, also `outlier_columns` (integer indices
        into the last dim, increasing, as `find_outlier_columns` returns) and `outlier_values` (float32, the
        original values of those columns, shape [rows, columns]), with `quantized` and `scales` computed with
        those columns set to zero. The message is byte-identical to `encode` of the floats when the columns are
        the ones `encode` finds. Only for i8 and i8o codecs; the values are checked (range, finite non-negative
        scales, zeros in the outlier columns) since a bad quantizer would otherwise put a tensor on the wire that
        decoders reject.
        """
        dtype = self._config.dtype
        if dtype not in _ROW_SCALED_DTYPES:
            raise InvalidArgumentError(f"encode_quantized needs an i8 or i8o codec, this one is {self._config.name}")
        _check_mode_and_k(mode, k)
        plain, row_scales = _validated_quantized(quantized, scales)
        if dtype == "i8":
            if outlier_columns is not None or outlier_values is not None:
                raise InvalidArgumentError("outlier columns are an i8o feature; this codec is i8")
            stored = _Stored(plain, row_scales)
        else:
            columns, values = _validated_outliers(plain, outlier_columns, outlier_values)
            stored = _i8o_stored(plain, row_scales, columns, values)
        return self._message(plain.shape, stored, backbone, mode, k)

    def _message(
        self,
        shape: tuple[int, ...],
        stored: _Stored,
        backbone: feature_pb2.BackboneId | None,
        mode: int,
        k: int,
    ) -> feature_pb2.FeatureTensor:
        config = self._config
        msg = feature_pb2.FeatureTensor(
            shape=shape,
            dtype=_DTYPE_TO_PROTO[config.dtype],
            compression=_COMPRESSION_TO_PROTO[config.compression],
            byte_shuffle=config.byte_shuffle,
            crc32=_checksum(stored.plain, stored.scales, stored.outlier_columns, stored.outlier_scales),
            mode=int(mode),
            k=int(k),
            group_size=stored.group_size,
        )
        if stored.scales is not None:
            msg.scales.extend(stored.scales.tolist())
        if stored.outlier_columns is not None and len(stored.outlier_columns):
            msg.outlier_columns.extend(stored.outlier_columns.tolist())
            msg.outlier_scales.extend(stored.outlier_scales.tolist())
        body = _shuffled(stored.plain) if config.byte_shuffle else stored.plain
        msg.payload = self._compress(body) if config.compression == "zstd" else body.tobytes()
        if backbone is not None:
            msg.backbone.CopyFrom(backbone)
        return msg

    def _compress(self, body: np.ndarray) -> bytes:
        return _compressor(self._config.zstd_level).compress(body)


# zstd contexts are not thread-safe: one per thread, kept for the level that thread used last. Reusing it measured
# 20 % less CPU than a fresh context per call for a [197, 768] i8 tensor at level 3 (0.15 against 0.19 ms); a
# context is 2 MB at level 3 (19 MB at level 19), held once per encoding thread. write_content_size lets decoders
# check sizes before allocating.
_compressors = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    held = getattr(_compressors, "held", None)
    if held is None or held[0] != level:
        held = (level, zstandard.ZstdCompressor(level=level, write_content_size=True))
        _compressors.held = held
    return held[1]


def quantize_i8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 of a finite float array: (int8 array of the same shape, float32 scale per row)."""
    return _quantize_i8(_validated_input(values))


def find_outlier_columns(values: np.ndarray) -> np.ndarray:
    """The columns (indices into the last dim, uint32, increasing) that i8o and i4 carry apart as int16.

    A column is an outlier column when one of its values exceeds OUTLIER_RATIO (12) times the mean |x| of that
    value's row; at most `dims // OUTLIER_COLUMN_SHARE` columns are taken, those with the largest ratio.
    """
    rows = _validated_input(values)
    return _outlier_columns(rows.reshape(-1, rows.shape[-1]))


def _outlier_columns(rows: np.ndarray) -> np.ndarray:
    cap = rows.shape[1] // OUTLIER_COLUMN_SHARE
    if cap == 0:
        return np.empty(0, dtype=np.uint32)
    magnitude = np.abs(rows)
    row_mean = magnitude.mean(axis=1, dtype=np.float32)
    # Rows whose mean is below float32's smallest normal count as all-zero (1 / mean would overflow); a ratio is
    # at most `dims` (the max of a row is at most its sum), so it stays finite.
    inverse = np.divide(np.float32(1), row_mean, out=np.zeros_like(row_mean), where=row_mean >= _F32_TINY)
    magnitude *= inverse[:, None]
    ratio = magnitude.max(axis=0)
    columns = np.flatnonzero(ratio > np.float32(OUTLIER_RATIO))
    if len(columns) > cap:
        columns = np.sort(columns[np.argsort(-ratio[columns], kind="stable")[:cap]])
    return columns.astype(np.uint32)


def _validated_quantized(quantized: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(quantized, np.ndarray) or quantized.dtype != np.int8:
        raise InvalidArgumentError(f"quantized features must be an int8 numpy array, got {_describe(quantized)}")
    if not 1 <= quantized.ndim <= MAX_DIMS or min(quantized.shape) < 1 or max(quantized.shape) >= 2**32:
        raise InvalidArgumentError(
            f"quantized features need 1 to {MAX_DIMS} dims, each in 1..2**32-1; got shape {list(quantized.shape)}"
        )
    rows = math.prod(quantized.shape[:-1])
    if not isinstance(scales, np.ndarray) or scales.dtype != np.float32 or scales.size != rows:
        raise InvalidArgumentError(
            f"scales must be a float32 numpy array with one value per row ({rows}); got {_describe(scales)}"
        )
    row_scales = np.ascontiguousarray(scales.reshape(-1), dtype="<f4")
    if not (np.isfinite(row_scales).all() and (row_scales >= 0).all()):
        raise InvalidArgumentError("scales must be finite and >= 0 (a non-finite scale: the features held NaN or Inf)")
    plain = np.ascontiguousarray(quantized)
    if int(plain.min()) < -_I8_MAX:
        raise InvalidArgumentError(f"quantized values must lie in [-{_I8_MAX}, {_I8_MAX}]; found -128")
    return plain, row_scales


def _validated_outliers(
    plain: np.ndarray, columns: np.ndarray | None, values: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 columns, float32 [rows, columns] values) for encode_quantized's i8o input, checked."""
    dims, rows = plain.shape[-1], plain.size // plain.shape[-1]
    if columns is None and values is None:
        return np.empty(0, dtype=np.uint32), np.empty((rows, 0), dtype=np.float32)
    if not isinstance(columns, np.ndarray) or columns.ndim != 1 or columns.dtype.kind not in "iu":
        raise InvalidArgumentError(f"outlier_columns must be a 1-D integer numpy array, got {_describe(columns)}")
    if len(columns) > dims // OUTLIER_COLUMN_SHARE:
        raise InvalidArgumentError(
            f"at most {dims // OUTLIER_COLUMN_SHARE} outlier columns for {dims} dims, got {len(columns)}"
        )
    # Every index checked, in a signed type: a diff of unsigned indices that go backwards wraps to a huge number.
    if (columns < 0).any() or (columns >= dims).any():
        raise InvalidArgumentError(f"outlier_columns must be increasing indices in 0..{dims - 1}")
    columns = columns.astype(np.int64)
    if (np.diff(columns) <= 0).any():
        raise InvalidArgumentError(f"outlier_columns must be increasing indices in 0..{dims - 1}")
    if not isinstance(values, np.ndarray) or values.dtype != np.float32 or values.shape != (rows, len(columns)):
        raise InvalidArgumentError(
            f"outlier_values must be a float32 numpy array of shape [{rows}, {len(columns)}], got {_describe(values)}"
        )
    if not np.isfinite(values).all():
        raise InvalidArgumentError("outlier_values hold NaN or Inf")
    if len(columns) and plain.reshape(rows, dims)[:, columns].any():
        raise InvalidArgumentError("quantized values must be 0 in the outlier columns")
    return columns.astype(np.uint32), values


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {list(value.shape)}"
    return type(value).__name__


def _check_mode_and_k(mode: int, k: int) -> None:
    if not _is_integer(mode) or mode not in _GATHER_MODES:
        raise InvalidArgumentError(f"unknown gather mode {mode!r}: expected one of {sorted(_GATHER_MODES)}")
    if not _is_integer(k) or not 0 <= k < 2**32:
        raise InvalidArgumentError(f"k must be an integer in 0..2**32-1, got {k!r}")


def _validated_input(array: np.ndarray) -> np.ndarray:
    """The array as C-contiguous little-endian float32, after checking rank, dims and finiteness."""
    if not isinstance(array, np.ndarray):
        raise InvalidArgumentError(f"features must be a numpy array, got {type(array).__name__}")
    if array.dtype.kind != "f":
        raise InvalidArgumentError(f"features must be a float array, got dtype {array.dtype}")
    if not 1 <= array.ndim <= MAX_DIMS:
        raise InvalidArgumentError(f"features must have 1 to {MAX_DIMS} dims, got shape {list(array.shape)}")
    if min(array.shape) < 1 or max(array.shape) >= 2**32:
        raise InvalidArgumentError(f"every feature dim must be in 1..2**32-1, got shape {list(array.shape)}")
    with np.errstate(over="ignore"):  # float64 beyond the float32 range becomes inf: reported just below
        values = np.ascontiguousarray(array, dtype="<f4")
    finite = np.isfinite(values)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        raise InvalidArgumentError(
            f"features hold {len(bad)} NaN/Inf values (or values beyond float32), first at index {first}"
        )
    return values


def _to_stored(values: np.ndarray, dtype: DTypeName) -> _Stored:
    """The elements in their stored little-endian type and the dtype's side fields."""
    if dtype == "f32":
        return _Stored(values)
    if dtype == "f16":
        # |x| >= 65520 rounds to inf in float16; checking the float32 extremes is 20x cheaper than isinf on halves.
        biggest = max(float(values.max()), -float(values.min()))
        if biggest >= _F16_OVERFLOW:
            raise InvalidArgumentError(
                f"features reach |x| = {biggest:.6g}, beyond float16's range (±{F16_MAX:g}): use bf16 or i8o"
            )
        return _Stored(values.astype("<f2"))
    if dtype == "bf16":
        return _Stored(_float32_to_bf16_bits(values))
    if dtype == "i8":
        return _Stored(*_quantize_i8(values))
    rows = values.reshape(-1, values.shape[-1])
    columns = _outlier_columns(rows)
    outliers = rows[:, columns]
    if len(columns):
        rows = rows.copy()
        rows[:, columns] = 0
    if dtype == "i8o":
        quantized, scales = _quantize_i8(rows)
        return _i8o_stored(quantized, scales, columns, outliers)
    return _i4_stored(rows, columns, outliers)


def _i8o_stored(quantized: np.ndarray, scales: np.ndarray, columns: np.ndarray, outliers: np.ndarray) -> _Stored:
    """i8o payload: the int8 elements (zeros in the outlier columns), then the outlier columns as int16."""
    column_values, column_scales = _quantize_columns_i16(outliers)
    plain = quantized.reshape(-1).view(np.uint8)
    if len(columns):  # no copy of the int8 payload for features without outliers
        plain = np.concatenate([plain, column_values.reshape(-1).view(np.uint8)])
    return _Stored(plain, scales, columns, column_scales)


def _i4_stored(rows: np.ndarray, columns: np.ndarray, outliers: np.ndarray) -> _Stored:
    """i4 payload: bfloat16 group scales, then the nibbles, two per byte (even index low), then int16 outliers."""
    count, dims = rows.shape
    groups = -(-dims // I4_GROUP_SIZE)
    padded = np.zeros((count, groups * I4_GROUP_SIZE), dtype=np.float32)
    padded[:, :dims] = rows
    grouped = padded.reshape(count, groups, I4_GROUP_SIZE)
    group_max = np.maximum(grouped.max(axis=2), -grouped.min(axis=2))
    exact = np.where(group_max >= _I4_MIN_GROUP_MAX, group_max / np.float32(_I4_MAX), np.float32(0))
    scale_bits = _float32_to_bf16_bits_up(exact.astype(np.float32))
    scales = (scale_bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    inverse = np.divide(np.float32(1), scales, out=np.zeros_like(scales), where=scales > 0)
    quantized = np.rint(grouped * inverse[:, :, None])
    np.clip(quantized, -_I4_MAX, _I4_MAX, out=quantized)
    nibbles = (quantized.reshape(count, -1)[:, :dims].astype(np.int8) + np.int8(8)).astype(np.uint8).reshape(-1)
    if len(nibbles) % 2:
        nibbles = np.append(nibbles, np.uint8(0))  # the pad nibble: always 0
    packed = nibbles[0::2] | (nibbles[1::2] << np.uint8(4))
    column_values, column_scales = _quantize_columns_i16(outliers)
    plain = np.concatenate([scale_bits.reshape(-1).view(np.uint8), packed, column_values.reshape(-1).view(np.uint8)])
    return _Stored(plain, None, columns, column_scales, I4_GROUP_SIZE)


def _quantize_columns_i16(outliers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-column int16 of [rows, columns] floats: (<i2 values column after column, float32 scales)."""
    column_max = np.abs(outliers).max(axis=0) if outliers.size else np.empty(0, dtype=np.float32)
    scales = np.where(column_max >= _I16_MIN_COLUMN_MAX, column_max / np.float32(_I16_MAX), np.float32(0))
    scales = scales.astype(np.float32)
    inverse = np.divide(np.float32(1), scales, out=np.zeros_like(scales), where=scales > 0)
    quantized = np.rint(outliers.T * inverse[:, None])
    np.clip(quantized, -_I16_MAX, _I16_MAX, out=quantized)
    return np.ascontiguousarray(quantized, dtype="<i2"), scales


def _float32_to_bf16_bits_up(values: np.ndarray) -> np.ndarray:
    """The upper 16 bits of each finite non-negative float32, rounded up: the bfloat16 at least as large."""
    bits = values.view(np.uint32)
    upper = bits >> np.uint32(16)
    upper += (bits & np.uint32(0xFFFF)) != 0
    return upper.astype("<u2")


def _float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """The upper 16 bits of each float32, rounded to nearest, ties to even (finite input only)."""
    bits = values.view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when rounding goes up.
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    upper = rounded.astype("<u2")
    if ((upper & np.uint16(0x7F80)) == np.uint16(0x7F80)).any():
        biggest = float(np.abs(values).max())
        raise InvalidArgumentError(f"features reach |x| = {biggest:.6g}, which rounds to infinity in bfloat16")
    return upper


def _quantize_i8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: scale = max|x| / 127 over the last dim, q = round(x / scale) in [-127, 127]."""
    rows = values.reshape(-1, values.shape[-1])
    row_max = np.abs(rows).max(axis=1)
    scales = np.where(row_max >= _I8_MIN_ROW_MAX, row_max / np.float32(_I8_MAX), np.float32(0)).astype(np.float32)
    # The reciprocal of the stored scale (not 127 / max) so that q * scale is what the decoder reproduces.
    inverse = np.divide(np.float32(1), scales, out=np.zeros_like(scales), where=scales > 0)
    quantized = np.rint(rows * inverse[:, None])
    np.clip(quantized, -_I8_MAX, _I8_MAX, out=quantized)
    return quantized.astype(np.int8).reshape(values.shape), scales


def _shuffled(plain: np.ndarray) -> np.ndarray:
    """Byte 0 of every element, then byte 1, ...: the sign/exponent bytes line up and compress."""
    itemsize = plain.dtype.itemsize
    # Shifting whole little-endian words is 2-4x faster than a transposed uint8 copy.
    words = plain.reshape(-1).view(_WORD_DTYPE[itemsize])
    planes = np.empty((itemsize, words.size), dtype=np.uint8)
    for byte in range(itemsize):
        np.right_shift(words, 8 * byte, out=planes[byte], casting="unsafe")  # unsafe = keep the low byte
    return planes


def _unshuffled(data: np.ndarray, itemsize: int) -> np.ndarray:
    """The inverse of `_shuffled`: plain little-endian element bytes (1-D uint8), in a new array."""
    planes = data.reshape(itemsize, -1)
    word_dtype = _WORD_DTYPE[itemsize]
    words = planes[0].astype(word_dtype)
    for byte in range(1, itemsize):
        words |= planes[byte].astype(word_dtype) << word_dtype.type(8 * byte)
    return words.view(np.uint8)


def _checksum(
    plain: np.ndarray | bytes,
    scales: np.ndarray | None,
    outlier_columns: np.ndarray | None = None,
    outlier_scales: np.ndarray | None = None,
) -> int:
    """CRC-32 of the plain payload bytes followed by the row scales as little-endian float32, the outlier columns as
    little-endian uint32 and their scales as little-endian float32 (each only where the dtype has it).

    Covering the side fields too means a corrupted scale or column index (still plausible) is caught as well;
    for f32/f16/bf16/i8 the sum is what it was before i8o and i4 existed.
    """
    crc = zlib.crc32(plain)
    if scales is not None:
        crc = zlib.crc32(np.ascontiguousarray(scales, dtype="<f4").tobytes(), crc)
    if outlier_columns is not None and len(outlier_columns):
        crc = zlib.crc32(np.ascontiguousarray(outlier_columns, dtype="<u4").tobytes(), crc)
        crc = zlib.crc32(np.ascontiguousarray(outlier_scales, dtype="<f4").tobytes(), crc)
    return crc


# --------------------------------------------------------------------------------------------------- decoding

# zstd decompression contexts are not thread-safe either. Unlike compression, reusing one per thread measured
# about 8 % faster than a fresh one per call (i8 decode), and a context holds only about 100 KB.
_decompressors = threading.local()


def decode_feature(msg: feature_pb2.FeatureTensor, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """Decode a message into a new, writable float32 array of `tuple(msg.shape)`.

    Raises FeatureDecodeError (DATA_LOSS) for any message that is not exactly what an encoder would write,
    without ever allocating more than the declared shape (at most `max_elements` elements) needs, and
    UnsupportedFeatureError (INVALID_ARGUMENT) for a dtype this decoder does not know.
    """
    if not _is_integer(max_elements) or max_elements < 1:
        raise InvalidArgumentError(f"max_elements must be a positive integer, got {max_elements!r}")
    shape = _checked_shape(msg, max_elements)
    dtype = _checked_dtype(msg)
    scales = _checked_scales(msg, dtype, shape)
    columns, column_scales = _checked_outliers(msg, dtype, shape)
    group_size = _checked_group_size(msg, dtype)
    if msg.byte_shuffle and dtype in _OUTLIER_DTYPES:
        raise FeatureDecodeError("byte_shuffle", f"set for dtype {dtype}, which is never shuffled")
    stored = _STORED_NUMPY_DTYPE[dtype]
    expected = _payload_nbytes(dtype, shape, len(columns), group_size)
    data = np.frombuffer(_plain_payload_bytes(msg, expected), dtype=np.uint8)
    if msg.byte_shuffle and stored.itemsize > 1:
        data = _unshuffled(data, stored.itemsize)
    crc = _checksum(data, scales, columns, column_scales)
    if crc != msg.crc32:
        raise FeatureDecodeError("crc32", f"payload checksum is {crc:#010x}, the message says {msg.crc32:#010x}")
    rows, dims = math.prod(shape[:-1]), shape[-1]
    if dtype == "i8o":
        values = _widened_i8o(data, rows, dims, scales, columns, column_scales)
    elif dtype == "i4":
        values = _widened_i4(data, rows, dims, group_size, columns, column_scales)
    else:
        values = _widened(data.view(stored), dtype, scales)
    values = values.reshape(shape)
    if not np.isfinite(values).all():
        raise FeatureDecodeError("payload", "decodes to NaN or Inf values, which no encoder writes")
    return values


def _checked_shape(msg: feature_pb2.FeatureTensor, max_elements: int) -> tuple[int, ...]:
    shape = tuple(msg.shape)
    if not 1 <= len(shape) <= MAX_DIMS:
        raise FeatureDecodeError("shape", f"expected 1 to {MAX_DIMS} dims, got {len(shape)}")
    if min(shape) < 1:
        raise FeatureDecodeError("shape", f"every dim must be >= 1, got {list(shape)}")
    elements = math.prod(shape)
    if elements > max_elements:
        raise FeatureDecodeError("shape", f"{list(shape)} holds {elements} elements, over the limit of {max_elements}")
    return shape


def _checked_dtype(msg: feature_pb2.FeatureTensor) -> DTypeName:
    dtype = _DTYPE_FROM_PROTO.get(msg.dtype)
    if dtype is None and msg.dtype == feature_pb2.DTYPE_UNSPECIFIED:  # every encoder sets it: a damaged message
        raise FeatureDecodeError("dtype", "unset (DTYPE_UNSPECIFIED), which no encoder writes")
    if dtype is None:
        known = ", ".join(f"{value} ({name})" for value, name in sorted(_DTYPE_FROM_PROTO.items()))
        raise UnsupportedFeatureError(
            "dtype",
            f"{msg.dtype} is not a dtype this decoder reads ({known}): the message comes from a newer encoder or "
            "was altered; ask the extractor for a codec this side knows (e.g. --codec i8-zstd)",
        )
    return dtype


def _checked_scales(msg: feature_pb2.FeatureTensor, dtype: DTypeName, shape: tuple[int, ...]) -> np.ndarray | None:
    count = len(msg.scales)
    if dtype not in _ROW_SCALED_DTYPES:
        if count:
            raise FeatureDecodeError("scales", f"expected none for dtype {dtype}, got {count}")
        return None
    rows = math.prod(shape[:-1])
    if count != rows:
        raise FeatureDecodeError("scales", f"expected one per row ({rows} for shape {list(shape)}), got {count}")
    scales = np.asarray(msg.scales, dtype=np.float32)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise FeatureDecodeError("scales", "expected finite values >= 0, got a negative, NaN or Inf scale")
    return scales


def _checked_outliers(
    msg: feature_pb2.FeatureTensor, dtype: DTypeName, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """(uint32 outlier columns, float32 scales), both empty for dtypes without them."""
    count, scale_count = len(msg.outlier_columns), len(msg.outlier_scales)
    if dtype not in _OUTLIER_DTYPES:
        if count or scale_count:
            raise FeatureDecodeError("outlier_columns", f"expected none for dtype {dtype}, got {count}")
        return np.empty(0, dtype=np.uint32), np.empty(0, dtype=np.float32)
    dims = shape[-1]
    if count > dims:
        raise FeatureDecodeError("outlier_columns", f"{count} columns for a last dim of {dims}")
    if scale_count != count:
        raise FeatureDecodeError("outlier_scales", f"expected one per outlier column ({count}), got {scale_count}")
    columns = np.asarray(msg.outlier_columns, dtype=np.uint32)
    if count and (int(columns[-1]) >= dims or (np.diff(columns.astype(np.int64)) <= 0).any()):
        raise FeatureDecodeError("outlier_columns", f"expected strictly increasing indices in 0..{dims - 1}")
    scales = np.asarray(msg.outlier_scales, dtype=np.float32)
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise FeatureDecodeError("outlier_scales", "expected finite values >= 0, got a negative, NaN or Inf scale")
    return columns, scales


def _checked_group_size(msg: feature_pb2.FeatureTensor, dtype: DTypeName) -> int:
    group_size = int(msg.group_size)
    if dtype != "i4":
        if group_size:
            raise FeatureDecodeError("group_size", f"expected 0 for dtype {dtype}, got {group_size}")
        return 0
    if group_size < 1:
        raise FeatureDecodeError("group_size", "expected at least 1 for dtype i4, got 0")
    return group_size


def _payload_nbytes(dtype: DTypeName, shape: tuple[int, ...], columns: int, group_size: int) -> int:
    """The decompressed payload's exact size: at most 3 bytes per element plus 2 per row and group (i4)."""
    elements = math.prod(shape)
    rows, dims = elements // shape[-1], shape[-1]
    if dtype == "i8o":
        return elements + 2 * rows * columns
    if dtype == "i4":
        return 2 * rows * -(-dims // group_size) + (elements + 1) // 2 + 2 * rows * columns
    return elements * _STORED_NUMPY_DTYPE[dtype].itemsize


def _plain_payload_bytes(msg: feature_pb2.FeatureTensor, expected: int) -> bytes:
    """The payload after decompression, exactly `expected` bytes long; never allocates more than that."""
    payload = msg.payload
    compression = _COMPRESSION_FROM_PROTO.get(msg.compression)
    if compression is None:
        raise FeatureDecodeError("compression", f"expected COMPRESSION_NONE or COMPRESSION_ZSTD, got {msg.compression}")
    if compression == "none":
        if len(payload) != expected:
            raise FeatureDecodeError(
                "payload", f"expected {expected} raw bytes for the shape and dtype, got {len(payload)}"
            )
        return payload
    plain = _bounded_zstd_decompress(payload, expected)
    if len(plain) != expected:
        raise FeatureDecodeError("payload", f"decompresses to {len(plain)} bytes, expected {expected}")
    return plain


def _bounded_zstd_decompress(payload: bytes, expected: int) -> bytes:
    if not payload.startswith(_ZSTD_MAGIC):
        raise FeatureDecodeError("payload", "is not a zstd frame (bad magic number)")
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as exc:
        raise FeatureDecodeError("payload", f"unreadable zstd frame header: {exc}") from None
    # decompress() allocates the size a frame header declares, whatever max_output_size says: check it first.
    if params.content_size != zstandard.CONTENTSIZE_UNKNOWN and params.content_size != expected:
        raise FeatureDecodeError("payload", f"zstd frame declares {params.content_size} bytes, expected {expected}")
    window_limit = min(max(expected, _SMALL_WINDOW_BYTES), MAX_ZSTD_WINDOW_BYTES)
    if params.window_size > window_limit:
        raise FeatureDecodeError(
            "payload", f"zstd window of {params.window_size} bytes, over the limit of {window_limit}"
        )
    if params.dict_id:
        raise FeatureDecodeError("payload", f"zstd frame needs dictionary {params.dict_id}; features use none")
    try:
        # One frame, nothing after it; without a declared size the output buffer is capped at `expected`.
        return _decompressor().decompress(payload, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FeatureDecodeError("payload", f"corrupt zstd data: {exc}") from None


def _decompressor() -> zstandard.ZstdDecompressor:
    decompressor = getattr(_decompressors, "decompressor", None)
    if decompressor is None:
        decompressor = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW_BYTES)
        _decompressors.decompressor = decompressor
    return decompressor


def _widened(stored: np.ndarray, dtype: DTypeName, scales: np.ndarray | None) -> np.ndarray:
    """Stored elements (1-D) as a new float32 array."""
    if dtype == "bf16":
        return (stored.astype(np.uint32) << np.uint32(16)).view(np.float32)
    if scales is not None:  # i8
        with np.errstate(over="ignore"):  # a huge scale times 127 overflows: caught by the finiteness check
            return (stored.reshape(len(scales), -1).astype(np.float32) * scales[:, None]).reshape(-1)
    # A copy unless the array is already a fresh float32 one (frombuffer over bytes is read-only).
    return stored.astype(np.float32, copy=not stored.flags.writeable)


def _widened_outliers(values: np.ndarray, data: np.ndarray, rows: int, columns: np.ndarray, scales: np.ndarray) -> None:
    """Write the int16 outlier columns held by `data` (column after column) into `values` [rows, dims]."""
    if not len(columns):
        return
    stored = data.view("<i2").reshape(len(columns), rows)
    if int(stored.min()) < -_I16_MAX:
        raise FeatureDecodeError(
            "payload", f"an outlier value of -32768, outside the written [-{_I16_MAX}, {_I16_MAX}]"
        )
    with np.errstate(over="ignore"):  # a huge scale overflows: caught by the finiteness check
        values[:, columns] = (stored.astype(np.float32) * scales[:, None]).T


def _widened_i8o(
    data: np.ndarray, rows: int, dims: int, scales: np.ndarray, columns: np.ndarray, column_scales: np.ndarray
) -> np.ndarray:
    elements = rows * dims
    quantized = data[:elements].view(np.int8).reshape(rows, dims)
    if len(columns) and quantized[:, columns].any():
        raise FeatureDecodeError("payload", "int8 values in an outlier column, where the encoder writes zeros")
    with np.errstate(over="ignore"):
        values = quantized.astype(np.float32) * scales[:, None]
    _widened_outliers(values, data[elements:], rows, columns, column_scales)
    return values


def _widened_i4(
    data: np.ndarray, rows: int, dims: int, group_size: int, columns: np.ndarray, column_scales: np.ndarray
) -> np.ndarray:
    groups = -(-dims // group_size)
    scale_end = 2 * rows * groups
    scale_bits = data[:scale_end].view("<u2")
    # bfloat16 scales: sign bit clear and exponent not all ones (finite, >= 0)
    if ((scale_bits & np.uint16(0x8000)) | ((scale_bits & np.uint16(0x7F80)) == np.uint16(0x7F80))).any():
        raise FeatureDecodeError("payload", "a group scale is negative, NaN or Inf")
    group_scales = (scale_bits.astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(rows, groups)
    elements = rows * dims
    packed = data[scale_end : scale_end + (elements + 1) // 2]
    nibbles = np.empty(2 * len(packed), dtype=np.uint8)
    nibbles[0::2] = packed & np.uint8(0x0F)
    nibbles[1::2] = packed >> np.uint8(4)
    if elements % 2 and nibbles[-1]:
        raise FeatureDecodeError("payload", "the pad nibble after the last value is not 0")
    nibbles = nibbles[:elements]
    if not nibbles.all():
        raise FeatureDecodeError("payload", "a 4-bit value of nibble 0, which no encoder writes (levels are 1..15)")
    quantized = nibbles.reshape(rows, dims).view(np.int8) - np.int8(8)
    if len(columns) and quantized[:, columns].any():
        raise FeatureDecodeError("payload", "4-bit values in an outlier column, where the encoder writes zeros")
    # Each column's group looked up, never a row padded to groups x group_size: group_size comes from the message,
    # and memory must stay bounded by the shape (a last dim below group_size is one short group).
    group_of_column = np.arange(dims, dtype=np.int64) // group_size
    with np.errstate(over="ignore"):
        values = quantized.astype(np.float32) * group_scales[:, group_of_column]
    _widened_outliers(values, data[scale_end + (elements + 1) // 2 :], rows, columns, column_scales)
    return values


def encoded_nbytes(msg: feature_pb2.FeatureTensor) -> int:
    """Bytes this feature costs on the wire: the serialized message (payload, scales and header)."""
    return msg.ByteSize()


def float32_nbytes(msg: feature_pb2.FeatureTensor) -> int:
    """What the same tensor costs as plain float32, the paper's unit (605,184 bytes for [197, 768])."""
    return 4 * math.prod(msg.shape)
