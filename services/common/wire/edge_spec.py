"""The LAE edge network's configuration, exact weight shapes and cost model, in pure Python.

The tuner builds the torch module from it (services/tuner/edge_network.py); the registry, which has no
torch, uses it to check pushed weights against a task's config and to report parameters and MACs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.pb import feature_pb2

# What the head reads: the class token ("cls") or the mean of the tokens ("mean"); "+tokens" adds a low-rank readout
# of every token (each token's LayerNorm output projected to READOUT_RANK dims, all of them flattened into a Linear
# to the classes), whose logits add to the pooled head's. One token read alone cannot weigh many places with their
# own signs, which is what telling fine pixel patterns apart takes (docs/explanation/recipe.md). "dense" pools nothing:
# the head classifies every token (segmentation), giving [T, C] logits on the token grid, which the task upsamples
# to its label resolution (docs/explanation/segmentation.md); it needs a square grid of tokens and no prefix token.
Pooling = Literal["cls", "mean", "cls+tokens", "mean+tokens", "dense"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
READOUT_RANK = 2  # dims per token of the "+tokens" readout: 395 * C + 1,538 parameters at ViT-B/16 geometry

# Safetensors metadata key under which weights carry their config as JSON (see to_json / from_json).
CONFIG_METADATA_KEY = "mist.edge_network_config"
# timm's ViTs use this LayerNorm epsilon; gathered features are sums of block outputs, far from zero variance.
LAYER_NORM_EPS = 1e-6

# Upper bounds: generous for any real ViT (ViT-22B has D = 6144; a 1024 px image at patch 16 has
# 4097 tokens; ImageNet-21k has 21,843 classes) yet small enough that a hostile config cannot make a
# registry, a tuner or a device allocate a gigantic network.
MAX_DIMS = 8192
MAX_TOKENS = 8192
MAX_NUM_CLASSES = 100_000
MAX_NUM_BLOCKS = 64
MAX_RANK = 1024
MAX_TRAINABLE_PARAMETERS = 2**25  # 33.5 M: 128 MiB of float32 weights, ~100x the paper's network


@dataclass(frozen=True)
class EdgeNetworkConfig:
    """Geometry and hyperparameters of one task's LAE edge network (validated on construction)."""

    dims: int  # D: width of the gathered feature (768 for ViT-B/16)
    tokens: int  # T: tokens per image, CLS included (197 for ViT-B/16 at 224 px)
    num_classes: int  # C: outputs of the classifier head (>= 2)
    num_blocks: int = 4  # M: low-rank attention blocks; the paper uses 4
    rank: int = 16  # r: width of the Q/K/V space; the paper uses 16 for D = 768
    heads: int = 1  # attention heads splitting the r dims; the paper uses one head
    pooling: Pooling = "cls"  # "cls" = token 0, "mean" = average over tokens (backbones without CLS); "+tokens" above

    def __post_init__(self) -> None:
        for name, upper in (
            ("dims", MAX_DIMS),
            ("tokens", MAX_TOKENS),
            ("num_classes", MAX_NUM_CLASSES),
            ("num_blocks", MAX_NUM_BLOCKS),
            ("rank", MAX_RANK),
        ):
            _check_int(name, getattr(self, name), 1, upper)
        _check_int("heads", self.heads, 1, self.rank)
        if self.num_classes < 2:
            raise InvalidArgumentError(f"edge network num_classes must be at least 2, got {self.num_classes}")
        if self.rank > self.dims:
            raise InvalidArgumentError(
                f"edge network rank {self.rank} exceeds dims {self.dims}: it would not be low rank"
            )
        if self.rank % self.heads:
            raise InvalidArgumentError(f"edge network rank {self.rank} is not divisible by heads {self.heads}")
        if self.pooling not in POOLINGS:
            raise InvalidArgumentError(f"edge network pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.dense and math.isqrt(self.tokens) ** 2 != self.tokens:
            raise InvalidArgumentError(
                f"edge network pooling 'dense' needs a square grid of tokens; {self.tokens} tokens are not one"
            )
        total = trainable_parameters(self)
        if total > MAX_TRAINABLE_PARAMETERS:
            raise InvalidArgumentError(
                f"edge network would have {total:,} parameters, over the limit of {MAX_TRAINABLE_PARAMETERS:,}"
            )

    @property
    def pool(self) -> str:
        """ "cls", "mean" or "dense": what the head reads."""
        return self.pooling.split("+", 1)[0]

    @property
    def dense(self) -> bool:
        """Whether the head classifies every token (pooling "dense", segmentation) instead of one pooled vector."""
        return self.pooling == "dense"

    @property
    def grid(self) -> tuple[int, int]:
        """(height, width) of the token grid a dense network's logits lie on (tokens row-major)."""
        side = math.isqrt(self.tokens)
        return side, side

    @property
    def token_readout(self) -> bool:
        """Whether the network also reads every token (pooling "cls+tokens" or "mean+tokens")."""
        return self.pooling.endswith("+tokens")

    def to_proto(self) -> feature_pb2.EdgeNetworkConfig:
        """Every field written explicitly, defaults included, so readers never guess."""
        return feature_pb2.EdgeNetworkConfig(**self.to_dict())

    @classmethod
    def from_proto(
        cls,
        message: feature_pb2.EdgeNetworkConfig,
        *,
        dims: int | None = None,
        tokens: int | None = None,
        num_classes: int | None = None,
    ) -> EdgeNetworkConfig:
        """Reads a proto; zero num_blocks/rank/heads and empty pooling mean the defaults.

        The keywords supply the geometry that a TuneSpec leaves to the tuner (derived from the features
        and the class list): they fill zero proto fields, and a non-zero field that disagrees is an error.
        """
        defaults = {f.name: f.default for f in fields(cls) if f.name in _HYPERPARAMETERS}
        values: dict[str, Any] = {name: getattr(message, name) or defaults[name] for name in _HYPERPARAMETERS}
        for name, derived in (("dims", dims), ("tokens", tokens), ("num_classes", num_classes)):
            given = getattr(message, name)
            if derived is not None and given and given != derived:
                raise InvalidArgumentError(f"edge network {name} is {given} in the request but {derived} here")
            values[name] = given or derived or 0
        return cls(**values)

    def to_dict(self) -> dict[str, int | str]:
        """JSON-friendly form (field name -> value), the shape used in safetensors metadata."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EdgeNetworkConfig:
        """Strict inverse of to_dict: unknown keys or missing required keys are errors; defaults fill the rest."""
        if not isinstance(data, Mapping):
            raise InvalidArgumentError(f"edge network config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown edge network config keys: {unknown}")
        missing = sorted(name for name in ("dims", "tokens", "num_classes") if name not in data)
        if missing:
            raise InvalidArgumentError(f"edge network config lacks required keys: {missing}")
        return cls(**data)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal configs give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> EdgeNetworkConfig:
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as error:
            raise InvalidArgumentError(f"edge network config is not valid JSON: {error}") from error
        return cls.from_dict(data)


_HYPERPARAMETERS = ("num_blocks", "rank", "heads", "pooling")


def _check_int(name: str, value: object, lower: int, upper: int) -> None:
    # bool is an int subclass; True as a block count is a bug upstream, not a 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgumentError(f"edge network {name} must be an integer, got {value!r}")
    if not lower <= value <= upper:
        raise InvalidArgumentError(f"edge network {name} must be in [{lower}, {upper}], got {value}")


def state_shapes(config: EdgeNetworkConfig) -> dict[str, tuple[int, ...]]:
    """The exact state_dict of EdgeNetwork(config): key -> shape, in the module's order.

    Q, K and V share one fused Linear (qkv: D -> 3r, rows ordered q | k | v, heads contiguous in each).
    """
    d, r, c = config.dims, config.rank, config.num_classes
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(config.num_blocks):
        shapes[f"blocks.{i}.norm.weight"] = (d,)
        shapes[f"blocks.{i}.norm.bias"] = (d,)
        shapes[f"blocks.{i}.qkv.weight"] = (3 * r, d)
        shapes[f"blocks.{i}.qkv.bias"] = (3 * r,)
        shapes[f"blocks.{i}.proj.weight"] = (d, r)
        shapes[f"blocks.{i}.proj.bias"] = (d,)
    shapes["norm.weight"] = (d,)
    shapes["norm.bias"] = (d,)
    shapes["head.weight"] = (c, d)
    shapes["head.bias"] = (c,)
    if config.token_readout:
        shapes["readout.proj.weight"] = (READOUT_RANK, d)
        shapes["readout.proj.bias"] = (READOUT_RANK,)
        shapes["readout.head.weight"] = (c, config.tokens * READOUT_RANK)
        shapes["readout.head.bias"] = (c,)
    return shapes


def shape_problems(
    expected: Mapping[str, Sequence[int]], shapes: Mapping[str, Sequence[int]], *, label_sep: str = ": "
) -> list[str]:
    """What keeps `shapes` (name -> shape) from being exactly `expected`; [] when they match.

    One entry per kind (missing, unexpected, wrong shape) naming the first few tensors, so a user can tell
    weights of another config from a truncated file. Unexpected names are cut to 80 characters: they may
    come from a hostile file.
    """
    missing = [name for name in expected if name not in shapes]
    extra = sorted(name[:80] for name in shapes if name not in expected)
    wrong = [
        f"{name} {shapes[name]} != {shape}"  # shown as the caller passed them (tuples or lists)
        for name, shape in expected.items()
        if name in shapes and tuple(shapes[name]) != tuple(shape)
    ]
    return [
        f"{label}{label_sep}{items[:5]}{' ...' if len(items) > 5 else ''}"
        for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong))
        if items
    ]


def check_state_shapes(config: EdgeNetworkConfig, shapes: Mapping[str, Sequence[int]]) -> None:
    """Raises FailedPreconditionError unless `shapes` (name -> shape) is exactly state_shapes(config)."""
    problems = shape_problems(state_shapes(config), shapes)
    if problems:
        raise FailedPreconditionError(f"weights do not fit the edge network {config.to_json()}: {'; '.join(problems)}")


@dataclass(frozen=True)
class ParameterBreakdown:
    """Trainable parameters of one edge network, split as the paper reports them."""

    blocks: int  # the M low-rank attention blocks (LayerNorms, QKV, output projections, biases)
    head: int  # final LayerNorm + Linear D -> C

    @property
    def total(self) -> int:
        return self.blocks + self.head


def parameter_breakdown(config: EdgeNetworkConfig) -> ParameterBreakdown:
    """Counts from the layer formulas (not from state_shapes) so the two can check each other."""
    d, r, c = config.dims, config.rank, config.num_classes
    per_block = 2 * d + (d * 3 * r + 3 * r) + (r * d + d)  # LayerNorm, qkv Linear, proj Linear
    head = 2 * d + (d * c + c)  # final LayerNorm, Linear
    if config.token_readout:  # per-token projection D -> R, then Linear T*R -> C
        head += (d * READOUT_RANK + READOUT_RANK) + (config.tokens * READOUT_RANK * c + c)
    return ParameterBreakdown(blocks=config.num_blocks * per_block, head=head)


def trainable_parameters(config: EdgeNetworkConfig) -> int:
    """Every parameter of the edge network is trainable: blocks + head."""
    return parameter_breakdown(config).total


def macs_per_image(config: EdgeNetworkConfig) -> int:
    """Multiply-accumulates of one forward pass for one image ([T, D] in, C logits out).

    Per block: the Q, K and V projections (T*D*r each), attention scores Q K^T (T*T*r summed over heads),
    attention times V (T*T*r) and the output projection (T*r*D); then the head Linear (D*C) on the pooled
    token (on every token, T*D*C, for a dense network; its bilinear upsampling is not counted). Not counted:
    LayerNorm, softmax, the 1/sqrt(d) scale, bias and residual adds and mean pooling.
    They are element-wise passes over [T, D] or [T, T] tensors (about 6 M operations at ViT-B geometry,
    next to 44 M MACs) whose cost depends on how a kernel fuses them, whereas the matrix products are what
    every paper's MAC column counts; counting only those keeps our figure comparable and exact. The head
    count does not change the total: h heads of r/h dims do the same T*T*r work as one head of r dims. A token
    readout adds its projection (T*D*R) and its Linear (T*R*C).
    """
    t, d, r, c = config.tokens, config.dims, config.rank, config.num_classes
    qkv = 3 * t * d * r
    scores = t * t * r
    weighted_values = t * t * r
    projection = t * r * d
    readout = (t * d * READOUT_RANK + t * READOUT_RANK * c) if config.token_readout else 0
    head = t * d * c if config.dense else d * c  # a dense head classifies every token
    return config.num_blocks * (qkv + scores + weighted_values + projection) + head + readout
