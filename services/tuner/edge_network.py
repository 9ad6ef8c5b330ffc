"""The LAE edge network of MIST (Tang, Fu, Wu, arXiv 2406.17559): low-rank attention on gathered features.

The tuner trains it on [B, T, D] gathered features and ships its weights as safetensors; torch only (the
CPU build on devices), never timm. Geometry, shapes and cost model: services/common/wire/edge_spec.py.
"""

from __future__ import annotations

import json
import struct

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from services.common.errors import InvalidArgumentError
from services.common.wire.edge_spec import CONFIG_METADATA_KEY, LAYER_NORM_EPS, READOUT_RANK, EdgeNetworkConfig
from services.common.wire.weights import check_edge_weights


class LowRankAttentionBlock(nn.Module):
    """x + proj(attention(q, k, v)) with q, k, v = qkv(LayerNorm(x)) projected D -> r, split into heads.

    The output projection starts at zero (as LoRA's B and AdaptFormer's up-projection), so a fresh block
    is the identity and a fresh network is a linear probe on LayerNorm(gathered feature), a strong
    baseline that training then improves rather than first undoing random perturbations of the feature
    (the measurement: docs/explanation/mist.md). At step 0 only proj and the head get gradients;
    q, k and v start moving after the first update. `zero_init_proj=False` gives nn.Linear's default.
    """

    def __init__(self, dims: int, rank: int, heads: int = 1, *, zero_init_proj: bool = True) -> None:
        super().__init__()
        if rank % heads:
            raise InvalidArgumentError(f"rank {rank} is not divisible by heads {heads}")
        self.rank = rank
        self.heads = heads
        self.norm = nn.LayerNorm(dims, eps=LAYER_NORM_EPS)
        self.qkv = nn.Linear(dims, 3 * rank)  # one matmul for Q, K and V: rows q | k | v
        self.proj = nn.Linear(rank, dims)
        if zero_init_proj:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, tokens, 3, self.heads, self.rank // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, r / heads]
        attended = F.scaled_dot_product_attention(q, k, v)  # scale 1 / sqrt(r / heads)
        return x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, self.rank))


class TokenReadout(nn.Module):
    """Logits from every token: each (normalised) token projected D -> READOUT_RANK, all of them flattened, a Linear
    to the classes. Its Linear starts at zero, so a fresh network answers as the pooled head alone; dropout on the
    flattened projections (training only) keeps it from memorising where things were (docs/explanation/recipe.md)."""

    def __init__(
        self, dims: int, tokens: int, num_classes: int, *, dropout: float = 0.0, zero_init: bool = True
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(dims, READOUT_RANK)
        self.head = nn.Linear(tokens * READOUT_RANK, num_classes)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.dropout = dropout

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        return self.head(F.dropout(self.proj(normed).flatten(1), self.dropout, self.training))


class EdgeNetwork(nn.Module):
    """M low-rank attention blocks, then final LayerNorm, pooling (CLS token or mean) and a Linear head (plus a
    low-rank readout of every token with a "+tokens" pooling, its logits added).

    Stages as in timm: forward_features ([B, T, D] -> [B, T, D]), forward_head (-> [B, C] logits).
    """

    def __init__(self, config: EdgeNetworkConfig, *, zero_init_proj: bool = True, readout_dropout: float = 0.0) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.Sequential(
            *(
                LowRankAttentionBlock(config.dims, config.rank, config.heads, zero_init_proj=zero_init_proj)
                for _ in range(config.num_blocks)
            )
        )
        self.norm = nn.LayerNorm(config.dims, eps=LAYER_NORM_EPS)
        self.head = nn.Linear(config.dims, config.num_classes)
        self.readout = (
            TokenReadout(
                config.dims, config.tokens, config.num_classes, dropout=readout_dropout, zero_init=zero_init_proj
            )
            if config.token_readout
            else None
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self._checked(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits [B, C]; with pre_logits the pooled, normalised [B, D] vector the pooled head reads. A dense network
        (pooling "dense") gives every token's logits, [B, T, C] (pre_logits: the normalised [B, T, D] tokens)."""
        x = self.norm(self._checked(x))
        if self.config.dense:
            return x if pre_logits else self.head(x)
        pooled = x[:, 0] if self.config.pool == "cls" else x.mean(dim=1)
        if pre_logits:
            return pooled
        logits = self.head(pooled)
        return logits if self.readout is None else logits + self.readout(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        # Fail with the geometry the user got wrong, not with a matmul shape error three frames deep.
        expected = (self.config.tokens, self.config.dims)
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or tuple(x.shape[1:]) != expected or x.shape[0] == 0:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InvalidArgumentError(
                f"edge network expects features [B >= 1, {expected[0]}, {expected[1]}], got {got}"
            )
        if not x.is_floating_point():
            raise InvalidArgumentError(f"edge network expects floating point features, got {x.dtype}")
        return x.to(self.head.weight.dtype)  # decoded f16/bf16 features compute in the weights' dtype


def dense_logits(model: EdgeNetwork, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] logits of a dense network at the label resolution `size`: its per-token logits on the token grid,
    upsampled bilinearly (align_corners=False; services/tuner/dense.py computes the same in numpy)."""
    if not model.config.dense:
        raise InvalidArgumentError(
            f"dense_logits needs a network with pooling 'dense'; this one has {model.config.pooling!r}"
        )
    tokens = model(features)  # [B, T, C]
    height, width = model.config.grid
    maps = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)
    if (height, width) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def to_safetensors_bytes(model: EdgeNetwork, metadata: dict[str, str] | None = None) -> bytes:
    """Serialises the weights (float32) with the config as JSON under CONFIG_METADATA_KEY.

    Refuses non-string metadata, a conflicting config entry and non-finite weights (a diverged run
    should fail on the device, not at the registry).
    """
    entries = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in entries.items()):
        raise InvalidArgumentError("safetensors metadata must map strings to strings")
    config_json = model.config.to_json()
    if entries.get(CONFIG_METADATA_KEY, config_json) != config_json:
        raise InvalidArgumentError(f"metadata {CONFIG_METADATA_KEY!r} disagrees with the model's config")
    entries[CONFIG_METADATA_KEY] = config_json
    entries.setdefault("format", "pt")
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in model.state_dict().items()}
    _check_finite(tensors)
    return _canonical_header(save_safetensors(tensors, metadata=entries))


def _canonical_header(blob: bytes) -> bytes:
    """The same file with its JSON header in sorted key order, so equal weights hash equally.

    safetensors writes metadata in hash-map order, which differs between processes: the same weights would get
    a new sha256 (and a new registry blob) on every run. Data offsets are relative to the end of the header, so
    only the header changes; it is padded with spaces to 8 bytes as the reference writer does.
    """
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + header_len :]


def from_safetensors_bytes(
    blob: bytes, expected: EdgeNetworkConfig | None = None
) -> tuple[EdgeNetwork, dict[str, str]]:
    """Rebuilds the network from a blob's metadata and loads its weights strictly; never unpickles.

    Not safetensors, no config, NaN/Inf -> InvalidArgumentError; a config other than `expected`, missing,
    extra or mis-shaped tensors, non-float32 dtypes -> FailedPreconditionError (docs/reference/errors.md).
    """
    config, metadata = check_edge_weights(blob, expected)  # header, config and shapes checked before any allocation
    try:
        tensors = load_safetensors(bytes(blob))
    except SafetensorError as error:
        raise InvalidArgumentError(f"not a safetensors blob: {error}") from error
    _check_finite(tensors)
    model = EdgeNetwork(config)
    model.load_state_dict(tensors, strict=True)
    return model, metadata


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    bad = sorted(name for name, t in tensors.items() if not torch.isfinite(t).all())
    if bad:
        raise InvalidArgumentError(f"edge network weights contain NaN or Inf in {bad[:5]}")
