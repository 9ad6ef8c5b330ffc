"""The i8 and i8o codecs' quantization, run with torch on the backbone's device, so only int8 values and one scale per row
cross to the host (a quarter of the float32 bytes) and the CPU is left with compression.

    quantized, scales = quantize_rows_i8(features)   # float [..., D] on any device -> int8 [..., D], float32 [...]
    codec.encode_quantized(quantized[i].numpy(), scales[i].numpy(), ...)   # services/common/wire/codec.py
    batch = quantize_images_i8o(features).to_host()  # i8o: the same plus each image's outlier columns
    q, s, columns, values = batch.split()[i]; codec.encode_quantized(q, s, outlier_columns=columns, outlier_values=values)

The arithmetic is the codec's, operation for operation in float32 (scale = max|x| / 127, rows below the smallest
normal scale stored as zeros, q = round-half-to-even(x * (1 / scale)) clipped to +-127), so the message is
byte-identical to `FeatureCodec.encode` of the same floats; tests compare the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.common.errors import InvalidArgumentError
from services.common.wire.codec import OUTLIER_COLUMN_SHARE, OUTLIER_RATIO

_I8_MAX = 127
_TINY = torch.finfo(torch.float32).tiny
# The codec's threshold: below it a row's scale would be subnormal and its reciprocal overflow (codec.py).
_I8_MIN_ROW_MAX = _TINY * _I8_MAX
# On a CPU, one whole-batch temporary of 32 x 197 x 768 floats (19 MB) is fresh memory whose page faults cost three
# times the arithmetic (measured: 0.33 ms per image as one batch, 0.12 ms image by image); rows are therefore
# quantized in chunks of about this many bytes there. An accelerator's caching allocator has no such cost.
_CPU_CHUNK_BYTES = 1 << 20


def quantize_rows_i8(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 over the last dim: (int8 tensor of the same shape, float32 scales of shape[:-1]).

    `features` is any float dtype (computed in float32) with at least one dim; it is not modified. A row holding
    NaN or Inf gets a NaN or Inf scale (which `encode_quantized` refuses). Results stay on its device.
    """
    if not isinstance(features, torch.Tensor) or not features.is_floating_point() or features.dim() < 1:
        raise InvalidArgumentError(f"features must be a float tensor with at least one dim; got {features!r:.80}")
    return _quantize_rows(features.float(), None)


def _quantize_rows(values: torch.Tensor, row_max: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows_i8 of float32 `values`, with each row's max |x| given when the caller has it already."""
    if values.device.type != "cpu" or values.numel() * 4 <= _CPU_CHUNK_BYTES:
        return _quantize(values, None if row_max is None else row_max.reshape(values.shape[:-1]))
    rows = values.reshape(-1, values.shape[-1])
    maxima = None if row_max is None else row_max.reshape(-1)
    step = max(1, _CPU_CHUNK_BYTES // (4 * rows.shape[1]))
    quantized = torch.empty(rows.shape, dtype=torch.int8)
    scales = torch.empty(rows.shape[0], dtype=torch.float32)
    for start in range(0, rows.shape[0], step):
        given = None if maxima is None else maxima[start : start + step]
        quantized[start : start + step], scales[start : start + step] = _quantize(rows[start : start + step], given)
    return quantized.reshape(values.shape), scales.reshape(values.shape[:-1])


def _quantize(values: torch.Tensor, row_max: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if row_max is None:
        row_max = _row_max(values)
    # A row holding NaN or Inf keeps a non-finite scale, which encode_quantized refuses: never silently zeros.
    keep = (row_max >= _I8_MIN_ROW_MAX) | ~torch.isfinite(row_max)
    scales = torch.where(keep, row_max / _I8_MAX, 0.0)
    # The reciprocal of the stored scale, as the codec does, so that q * scale is what a decoder reproduces.
    inverse = torch.where(scales > 0, torch.div(1.0, scales), 0.0)
    scaled = values * inverse.unsqueeze(-1)
    return scaled.round_().clamp_(-_I8_MAX, _I8_MAX).to(torch.int8), scales


# The codec's outlier-column rule (OUTLIER_RATIO, OUTLIER_COLUMN_SHARE in services/common/wire/codec.py): a column
# of an image's features is carried apart when one of its values exceeds OUTLIER_RATIO times its row's mean |x|, at
# most dims // OUTLIER_COLUMN_SHARE of them.


@dataclass(frozen=True)
class QuantizedI8O:
    """A batch quantized for the i8o codec; `split()` gives each image's share, outlier columns and values included."""

    quantized: torch.Tensor  # int8 [B, ..., D], zeros in each image's outlier columns
    scales: torch.Tensor  # float32 [B, ...], one per row
    flags: torch.Tensor  # bool [B, D]: the outlier columns of each image
    values: torch.Tensor  # float32 [columns of all images together, rows per image], image after image

    def to_host(self) -> QuantizedI8O:
        """The same on the CPU (one copy each: int8 values, scales, flags and the few outlier values)."""
        return QuantizedI8O(self.quantized.cpu(), self.scales.cpu(), self.flags.cpu(), self.values.cpu())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.quantized, self.scales, self.flags, self.values))

    def split(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Per image, numpy (quantized, scales, outlier columns as int64, outlier values [rows, columns]); host only."""
        quantized, scales = self.quantized.numpy(), self.scales.numpy()
        flags, values = self.flags.numpy(), self.values.numpy()
        parts, start = [], 0
        for image in range(flags.shape[0]):
            columns = np.flatnonzero(flags[image])
            end = start + len(columns)
            # [image, ...] keeps a 0-d array (not a numpy scalar) for one-vector modes such as cls
            parts.append(
                (quantized[image, ...], scales[image, ...], columns, np.ascontiguousarray(values[start:end].T))
            )
            start = end
        return parts


def quantize_images_i8o(features: torch.Tensor) -> QuantizedI8O:
    """The i8o codec's quantization of a batch [B, ..., D] (image i is features[i]), on the features' device.

    Per image: the outlier columns as the codec finds them, those columns set to zero, then per-row int8 exactly as
    `quantize_rows_i8`. The detection sums in float32 in torch's order, so at a ratio within rounding of the
    threshold a column may be chosen differently than by `FeatureCodec.encode` (both encodings are valid).
    """
    if not isinstance(features, torch.Tensor) or not features.is_floating_point() or features.dim() < 2:
        raise InvalidArgumentError(f"features must be a float tensor [B, ..., D]; got {features!r:.80}")
    values = features.float()
    batch, dims = values.shape[0], values.shape[-1]
    flat = values.reshape(batch, -1, dims)
    flags, row_max = _outlier_flags(flat)
    # Without outlier columns anywhere in the batch (features without the statistics of pretrained ViTs) this is
    # quantize_rows_i8 itself, chunked on a CPU, reusing the row maxima; otherwise one copy of the batch with those
    # columns zeroed, whose maxima are computed afresh.
    if bool(flags.any()):
        quantized, scales = _quantize_rows(flat.masked_fill(flags.unsqueeze(1), 0.0), None)
    else:
        quantized, scales = _quantize_rows(flat, row_max)
    outliers = flat.transpose(1, 2)[flags]  # [columns, rows], image after image, columns increasing
    return QuantizedI8O(quantized.reshape(values.shape), scales.reshape(values.shape[:-1]), flags, outliers)


def _outlier_flags(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(bool [B, D] outlier columns of each image, each row's max |x| [B, R] or None when not computed)."""
    batch, rows, dims = flat.shape
    flags = torch.zeros(batch, dims, dtype=torch.bool, device=flat.device)
    cap = dims // OUTLIER_COLUMN_SHARE
    if cap == 0:
        return flags, None
    # Each row's largest ratio first: images whose rows all stay under the threshold, the usual case on features
    # without outliers, have no outlier column, and only the others get the per-column pass. Multiplying by the same
    # reciprocal keeps the two passes consistent: a row's max ratio is the max of its values' ratios.
    inverse, row_ratio, row_max = _row_ratios(flat.reshape(-1, dims))
    inverse, row_ratio = inverse.reshape(batch, rows), row_ratio.reshape(batch, rows)
    suspects = (row_ratio > OUTLIER_RATIO).any(dim=1).nonzero().flatten()
    if suspects.numel() == 0:
        return flags, row_max
    ratio = (flat[suspects].abs_() * inverse[suspects].unsqueeze(-1)).amax(dim=1)  # [suspects, D]
    chosen = ratio > OUTLIER_RATIO
    for n in (chosen.sum(dim=1) > cap).nonzero().flatten().tolist():
        # rare: keep the `cap` largest ratios (ties: the lower column, as the codec's stable sort)
        order = torch.argsort(-ratio[n], stable=True)[:cap]
        chosen[n] = False
        chosen[n, order] = True
    flags[suspects] = chosen
    return flags, row_max


def _row_max(values: torch.Tensor) -> torch.Tensor:
    # amax and amin separately: measured 10x faster on CPU than abs().amax() or vector_norm(inf), with no temporary.
    return torch.maximum(values.amax(dim=-1), values.amin(dim=-1).neg_())


def _row_ratios(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of [R, D]: 1 / mean|x| (0 where the mean is below float32's smallest normal), max|x| times that, and
    max|x| itself (the int8 scale's source, so quantizing a batch without outliers need not compute it again).

    On a CPU in chunks of about _CPU_CHUNK_BYTES, as quantize_rows_i8 does: a whole-batch |x| temporary is fresh
    memory whose page faults cost more than the arithmetic.
    """
    count, dims = rows.shape
    step = count if rows.device.type != "cpu" else max(1, _CPU_CHUNK_BYTES // (4 * dims))
    # Outputs written in place and one |x| buffer reused: tensors kept per chunk fragment the heap enough that each
    # chunk's temporary became fresh memory again (measured 3x slower than this).
    inverse = torch.empty(count, dtype=torch.float32, device=rows.device)
    ratio = torch.empty_like(inverse)
    top = torch.empty_like(inverse)
    magnitude = torch.empty((min(step, count), dims), dtype=torch.float32, device=rows.device)
    for start in range(0, count, step):
        chunk = rows[start : start + step]
        size = chunk.shape[0]
        torch.abs(chunk, out=magnitude[:size])
        mean = magnitude[:size].sum(dim=-1).div_(dims)  # 5x faster than linalg.vector_norm(ord=1) on a CPU
        inverse[start : start + size] = torch.where(mean >= _TINY, torch.div(1.0, mean), 0.0)
        top[start : start + size] = _row_max(chunk)
    torch.mul(top, inverse, out=ratio)
    return inverse, ratio, top
