"""Gather modes, backbone geometry and the transfer cost of MIST and its baselines: LST, LAST, Partial-1 and CLS on a
ViT; every stage's output and the last stage's output on a hierarchical backbone (pvt_v2), where MIST's k is a stage.

Pure Python (no torch, no numpy) so the edge tuner, the extractor and the metrics all share one definition
of what each mode sends and how many float32 bytes per image that is.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

from services.common.errors import InvalidArgumentError
from services.common.pb import feature_pb2

GatherModeName = Literal["mist", "lst", "last", "partial", "cls", "stages", "last_stage"]
ArchitectureName = Literal["vit", "hierarchical"]
GATHER_MODES: tuple[GatherModeName, ...] = get_args(GatherModeName)
BASELINE_MODES: tuple[GatherModeName, ...] = ("lst", "last", "partial", "cls")  # the ViT baselines
VIT_MODES: tuple[GatherModeName, ...] = ("mist", *BASELINE_MODES)
HIERARCHICAL_MODES: tuple[GatherModeName, ...] = ("mist", "stages", "last_stage")

FLOAT32_BYTES = 4
# The k-search candidates as fractions of the depth (num, den): N/4, N/2, 3N/4, N, as in the paper.
_CANDIDATE_FRACTIONS: tuple[tuple[int, int], ...] = ((1, 4), (1, 2), (3, 4), (1, 1))

_PROTO_BY_MODE: dict[str, int] = {
    name: feature_pb2.GatherMode.Value(f"GATHER_MODE_{name.upper()}") for name in GATHER_MODES
}
_MODE_BY_PROTO: dict[int, GatherModeName] = {value: name for name, value in _PROTO_BY_MODE.items()}
# Servers treat an unset mode as MIST (see feature.proto).
_MODE_BY_PROTO[feature_pb2.GATHER_MODE_UNSPECIFIED] = "mist"


@dataclass(frozen=True)
class BackboneId:
    """Which backbone and weights features come from: features of different weights must never be mixed."""

    name: str  # timm model name, e.g. "vit_base_patch16_224"
    weights_fingerprint: str  # sha256 hex of the weights, or "random-<seed>-<16 hex>" for a random init

    @classmethod
    def from_proto(cls, message: feature_pb2.BackboneId | BackboneId) -> BackboneId:
        return cls(message.name, message.weights_fingerprint)

    def to_proto(self) -> feature_pb2.BackboneId:
        return feature_pb2.BackboneId(name=self.name, weights_fingerprint=self.weights_fingerprint)

    def __str__(self) -> str:
        return f"{self.name or '<unnamed>'} (weights {self.weights_fingerprint[:16] or '<none>'})"


class StageShape(NamedTuple):
    """One stage's output grid of a hierarchical backbone at the served input size."""

    tokens: int  # height * width
    dims: int
    height: int
    width: int


@dataclass(frozen=True)
class BackboneGeometry:
    """The shape of a backbone as far as gathering is concerned: a ViT (one token grid through N blocks), or a
    hierarchical backbone when `stages` is given (then N is the number of stages S, T and D are stage S's)."""

    num_blocks: int  # N, the number of transformer blocks; S, the number of stages, for a hierarchical backbone
    tokens: int  # T, tokens per image at the default input size, prefix tokens included; T_S when hierarchical
    dims: int  # D, the embedding width; D_S when hierarchical
    num_prefix_tokens: int  # class + register + distillation tokens at the front of the sequence (0: hierarchical)
    stages: tuple[StageShape, ...] = ()  # hierarchical only: every stage's output grid, stage 1 first

    @classmethod
    def hierarchical(cls, stages: Iterable[StageShape]) -> BackboneGeometry:
        """The geometry of a hierarchical backbone from its stages' output grids (at least one)."""
        shapes = tuple(StageShape(*stage) for stage in stages)
        if not shapes:
            raise InvalidArgumentError("a hierarchical backbone needs at least one stage")
        return cls(len(shapes), shapes[-1].tokens, shapes[-1].dims, 0, shapes)

    @property
    def architecture(self) -> ArchitectureName:
        return "hierarchical" if self.stages else "vit"

    @property
    def modes(self) -> tuple[GatherModeName, ...]:
        """The gather modes a backbone of this architecture serves."""
        return HIERARCHICAL_MODES if self.stages else VIT_MODES

    @property
    def k_unit(self) -> str:
        """What k counts on this backbone: "blocks" (ViT) or "stages" (hierarchical)."""
        return "stages" if self.stages else "blocks"


# ViT-B/16 at 224x224: 14 * 14 patches + 1 class token, the backbone of the paper's table.
VIT_B16 = BackboneGeometry(num_blocks=12, tokens=197, dims=768, num_prefix_tokens=1)


def check_mode(mode: str) -> GatherModeName:
    """Return `mode` if it is a gather mode name, else raise InvalidArgumentError listing the allowed ones."""
    if mode not in GATHER_MODES:
        raise InvalidArgumentError(f"unknown gather mode {mode!r}; expected one of {', '.join(GATHER_MODES)}")
    return mode  # type: ignore[return-value]


def mode_to_proto(mode: GatherModeName) -> int:
    """The `feature_pb2.GatherMode` value of a mode name."""
    return _PROTO_BY_MODE[check_mode(mode)]


def mode_from_proto(value: int) -> GatherModeName:
    """The mode name of a `feature_pb2.GatherMode` value; UNSPECIFIED means "mist"."""
    try:
        return _MODE_BY_PROTO[value]
    except (KeyError, TypeError):
        allowed = ", ".join(str(v) for v in sorted(_MODE_BY_PROTO))
        raise InvalidArgumentError(f"unknown GatherMode value {value!r}; expected one of {allowed}") from None


def _check_num_blocks(num_blocks: int) -> None:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise InvalidArgumentError(f"num_blocks must be a positive integer; got {num_blocks!r}")


def last_block_indices(num_blocks: int) -> list[int]:
    """1-based indices of the block outputs LAST sends besides x_0.

    LAST groups the blocks in consecutive pairs (1, 2), (3, 4), ... and sends each group's output, i.e.
    every other block output: [2, 4, ..., 12] for N = 12 (7 maps with x_0). For an odd N the last group
    is block N alone, so block N is always included: N = 5 gives [2, 4, 5], N = 1 gives [1].
    """
    _check_num_blocks(num_blocks)
    indices = list(range(2, num_blocks + 1, 2))
    if num_blocks % 2:
        indices.append(num_blocks)
    return indices


def check_mode_served(geometry: BackboneGeometry, mode: str) -> GatherModeName:
    """Return `mode` if a backbone of this geometry serves it, else raise naming the architecture and its modes."""
    check_mode(mode)
    if mode not in geometry.modes:
        raise InvalidArgumentError(
            f"gather mode {mode!r} is not served on a {geometry.architecture} backbone; "
            f"this backbone serves {', '.join(geometry.modes)}"
        )
    return mode  # type: ignore[return-value]


def _check_k(k: object, num_blocks: int, unit: str = "blocks") -> int:
    """Return k as an int if it is an integer in [1, N], else raise naming the range."""
    allowed = f"k must be an integer in [1, {num_blocks}] for a backbone with {num_blocks} {unit}"
    if isinstance(k, bool):
        raise InvalidArgumentError(f"{allowed}; got {k!r}")
    try:
        value = operator.index(k)  # ints and numpy ints, not floats or strings
    except TypeError:
        raise InvalidArgumentError(f"{allowed}; got {k!r}") from None
    if not 1 <= value <= num_blocks:
        raise InvalidArgumentError(f"{allowed}; got {value}")
    return value


def validate_ks(ks: Iterable[int], num_blocks: int, unit: str = "blocks") -> tuple[int, ...]:
    """Check that every k is in [1, N] and at least one is given; drop duplicates, keep the order. `unit` names
    what k counts in error messages ("stages" on a hierarchical backbone)."""
    _check_num_blocks(num_blocks)
    if isinstance(ks, (str, bytes)):
        raise InvalidArgumentError(f"ks must be a sequence of integers in [1, {num_blocks}]; got {ks!r}")
    checked = tuple(dict.fromkeys(_check_k(k, num_blocks, unit) for k in ks))
    if not checked:
        raise InvalidArgumentError(f"at least one k in [1, {num_blocks}] is required; got none")
    return checked


def candidate_ks(num_blocks: int) -> list[int]:
    """The k-search candidates N/4, N/2, 3N/4, N: rounded half up, at least 1, deduplicated, ascending.

    [3, 6, 9, 12] for N = 12, [1, 2, 3, 4] for N = 4, [1, 2, 3] for N = 3, [1, 2] for N = 2, [1] for N = 1.
    """
    _check_num_blocks(num_blocks)
    # Integer arithmetic rounds half up exactly, where round() would round 4.5 down to 4 (banker's rounding).
    ks = {max(1, (2 * num_blocks * num + den) // (2 * den)) for num, den in _CANDIDATE_FRACTIONS}
    return sorted(ks)


def feature_shape(geometry: BackboneGeometry, mode: GatherModeName, k: int | None = None) -> tuple[int, ...]:
    """The per-image shape a mode gathers.

    ViT: mist (T, D), lst (N+1, T, D), last (maps, T, D), partial (T, D), cls (D,). `k` matters only for mist (the
    shape does not depend on it, but it is range-checked when given); other modes take no k (None, or 0 as on the
    wire). Hierarchical: mist with k = s (default S) and stages with k = s give stage s's (T_s, D_s); last_stage
    (T_S, D_S) takes no k. A mode the architecture does not serve raises InvalidArgumentError naming it.
    """
    check_mode_served(geometry, mode)
    if geometry.stages:
        return _hierarchical_shape(geometry, mode, k)
    if mode == "mist":
        if k is not None:
            _check_k(k, geometry.num_blocks)
    elif k not in (None, 0):
        raise InvalidArgumentError(f"gather mode {mode!r} takes no k; got k={k!r}")
    token_map = (geometry.tokens, geometry.dims)
    if mode == "lst":
        return (geometry.num_blocks + 1, *token_map)
    if mode == "last":
        return (len(last_block_indices(geometry.num_blocks)) + 1, *token_map)
    if mode == "cls":
        return (geometry.dims,)
    return token_map  # mist and partial: one [T, D] map


def _hierarchical_shape(geometry: BackboneGeometry, mode: GatherModeName, k: int | None) -> tuple[int, int]:
    num_stages = geometry.num_blocks
    if mode == "last_stage":
        if k not in (None, 0):
            raise InvalidArgumentError(f"gather mode {mode!r} takes no k; got k={k!r}")
        stage = num_stages
    elif mode == "stages" and k is None:
        raise InvalidArgumentError(f"gather mode 'stages' sends one tensor per stage: give k in [1, {num_stages}]")
    else:
        stage = num_stages if k is None else _check_k(k, num_stages, "stages")
    shape = geometry.stages[stage - 1]
    return (shape.tokens, shape.dims)


def float32_bytes_per_image(geometry: BackboneGeometry, mode: GatherModeName) -> int:
    """Bytes one image's gathered tensors take as raw float32 (the paper's transfer unit): every stage's together
    for "stages", MIST at k = N (or S) for "mist"."""
    if mode == "stages" and geometry.stages:
        return sum(stage.tokens * stage.dims for stage in geometry.stages) * FLOAT32_BYTES
    return math.prod(feature_shape(geometry, mode)) * FLOAT32_BYTES


def baseline_bytes_per_image(geometry: BackboneGeometry) -> dict[str, int]:
    """Float32 bytes per image of every baseline and of uncompressed MIST, for dashboards and reports.

    ViT keys: "lst", "last", "partial", "cls", "mist_f32"; for ViT-B/16 in MiB (bytes / 2**20): 7.503, 4.040, 0.577,
    0.003 and 0.577. Hierarchical keys: "stages", "last_stage", "mist_f32" (MIST at k = S); for pvt_v2_b0 at 512 px:
    4,063,232, 262,144 and 262,144.
    """
    baselines = [mode for mode in geometry.modes if mode != "mist"]
    sizes = {mode: float32_bytes_per_image(geometry, mode) for mode in baselines}
    sizes["mist_f32"] = float32_bytes_per_image(geometry, "mist")
    return sizes
