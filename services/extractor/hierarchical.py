"""The MIST gather on hierarchical backbones: timm's `pvt_v2_*` family, the design family of SegFormer's MiT encoder
(timm has no `mit_*`), for dense tasks such as semantic segmentation.

A plain ViT keeps one token grid, so its gather is a sum of block outputs. A hierarchical backbone shrinks the grid
and widens the tokens at every stage, so the sum is carried across stages the way the paper's appendix does it for
SegFormer: with each stage's own downsampling module, untrained (its weights as they are), applied to the running
sum. Per stage s, with u_s its input (the stem's patch embedding for stage 0, the stage's downsampling of the
previous stage's output after that) and b_s1 .. b_sn the residual stream after each of its blocks:

    A_s = u_s + b_s1 + ... + b_sn               the ViT gather, within one stage
    G_0 = A_0;   G_s = DS_s(G_{s-1}) + A_s      DS_s: stage s's downsampling (overlapping conv + LayerNorm)

MIST's k on a hierarchical backbone is a stage number: k = s sends G_s, [T_s, D_s]. G of the last stage is the full
aggregate: [H/32 * W/32 tokens, D_last] for pvt_v2, the size of the last stage's output alone. Next to it, the two
baselines of dense tasks: every stage's output (what a side network needs, the LST-like cost) and the last stage's
output (a frozen encoder with a trained head). The extractor serves all three (GATHER_MODE_MIST, _STAGES,
_LAST_STAGE) through `gather_hierarchical`, which services/extractor/gather.py dispatches to.

    features = hierarchical_gather(model, images)     # model: timm.create_model("pvt_v2_b0"), eval mode
    features.aggregate          # [B, T, D] tokens, row-major over features.grid
    features.aggregates[s - 1]  # G_s, [B, T_s, D_s]
    options = transfer_options(model, image_size=512)  # shape and float32 bytes per image of each option
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from services.common.errors import InvalidArgumentError
from services.common.wire.gather_modes import GatherModeName, StageShape, check_mode, validate_ks

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class HierarchicalFeatures:
    """What one forward gives: the MIST aggregate and every stage's output."""

    aggregate: torch.Tensor  # [B, T, D]: G of the last stage run, tokens row-major over `grid`
    grid: tuple[int, int]  # (H, W) of the aggregate's tokens
    stage_outputs: tuple[torch.Tensor, ...]  # [B, D_s, H_s, W_s] each: exactly forward_intermediates' features
    aggregates: tuple[torch.Tensor, ...] = ()  # G_s [B, T_s, D_s] of every stage run, stage 1 first


@dataclass(frozen=True)
class TransferOption:
    """One way to send a dense task's features: its shapes and what they cost as float32 per image."""

    name: str  # "mist" (the aggregate), "stages" (every stage's output), "last_stage"
    shapes: tuple[tuple[int, int], ...]  # (tokens, dims) of each tensor sent
    float32_bytes: int


def check_hierarchical(model: nn.Module) -> None:
    """InvalidArgumentError unless `model` has the structure of timm's PyramidVisionTransformerV2."""
    stages = getattr(model, "stages", None)
    if not hasattr(model, "patch_embed") or not isinstance(stages, nn.Sequential) or not len(stages):
        raise InvalidArgumentError(
            f"{type(model).__name__} is not a hierarchical backbone of the pvt_v2 family (patch_embed, stages)"
        )
    for index, stage in enumerate(stages):
        if not all(hasattr(stage, name) for name in ("downsample", "blocks", "norm")):
            raise InvalidArgumentError(f"stage {index} of {type(model).__name__} lacks downsample, blocks or norm")
        if index and stage.downsample is None:
            raise InvalidArgumentError(f"stage {index} of {type(model).__name__} does not downsample")


@torch.inference_mode()
def hierarchical_gather(model: nn.Module, images: torch.Tensor, num_stages: int | None = None) -> HierarchicalFeatures:
    """The aggregates G_s (module docstring) and the stage outputs, in one forward of `model` (in eval mode) over
    normalised images [B, 3, H, W], through stage `num_stages` (default: all of them; later stages never run).

    The running sums are float32 whatever the compute dtype (under bf16 autocast, a sum of many maps in bf16 would
    lose precision); the stage outputs are what the model computes."""
    check_hierarchical(model)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidArgumentError(f"images must be a [B, C, H, W] tensor with B >= 1; got {shape}")
    stages = model.stages if num_stages is None else model.stages[: validate_ks([num_stages], len(model.stages))[0]]
    x = model.patch_embed(images)  # [B, H, W, C]
    carried: torch.Tensor | None = None  # G of the stage before, [B, C, H, W]
    previous: torch.Tensor | None = None  # the stage before's output, [B, C, H, W]
    outputs, aggregates = [], []
    for stage in stages:
        if stage.downsample is not None and previous is not None:
            x = stage.downsample(previous)  # the stage's input, [B, H, W, C]
        batch, height, width, dims = x.shape
        tokens = x.reshape(batch, -1, dims)
        total = tokens.float()  # A_s, from u_s (a copy unless already float32)
        total = total.clone() if total is tokens else total
        for block in stage.blocks:
            tokens = block(tokens, (height, width))
            total += tokens.float()
        if carried is not None:
            total += stage.downsample(carried).reshape(batch, -1, dims).float()  # DS_s(G_{s-1})
        aggregates.append(total)
        carried = total.reshape(batch, height, width, dims).permute(0, 3, 1, 2)
        previous = stage.norm(tokens).reshape(batch, height, width, dims).permute(0, 3, 1, 2).contiguous()
        outputs.append(previous)
    assert carried is not None  # check_hierarchical: at least one stage
    return HierarchicalFeatures(aggregates[-1], (height, width), tuple(outputs), tuple(aggregates))


def gather_hierarchical(
    model: nn.Module, images: torch.Tensor, mode: GatherModeName, ks: Iterable[int] = ()
) -> dict[int, torch.Tensor]:
    """The extractor's gather on a hierarchical backbone, float32 [B, T_s, D_s] tensors keyed by the wire's k:
    mist {s: G_s} for each requested stage s (stopping after the deepest), stages {s: stage s's output} for every s
    in 1..S, last_stage {0: stage S's output}. The ViT-only modes are refused by name."""
    check_hierarchical(model)
    num_stages = len(model.stages)
    if check_mode(mode) == "mist":
        wanted = validate_ks(ks, num_stages, "stages")
        features = hierarchical_gather(model, images, max(wanted))
        return {s: features.aggregates[s - 1] for s in sorted(wanted)}
    ks = tuple(ks)
    if mode not in ("stages", "last_stage"):
        raise InvalidArgumentError(
            f"gather mode {mode!r} is not served on a hierarchical backbone; this backbone serves mist, stages, "
            f"last_stage"
        )
    if ks:
        raise InvalidArgumentError(f"gather mode {mode!r} takes no k; got ks={list(ks)}")
    outputs = hierarchical_gather(model, images).stage_outputs
    as_tokens = [output.flatten(2).transpose(1, 2).float() for output in outputs]  # [B, H*W, C], row-major
    if mode == "last_stage":
        return {0: as_tokens[-1]}
    return dict(enumerate(as_tokens, start=1))


def _conv_out(size: int, conv: nn.Conv2d, axis: int) -> int:
    return (size + 2 * conv.padding[axis] - conv.dilation[axis] * (conv.kernel_size[axis] - 1) - 1) // conv.stride[
        axis
    ] + 1


def stage_geometry(model: nn.Module, image_size: int) -> list[tuple[int, int]]:
    """(tokens, dims) of every stage's output for square images of `image_size` pixels, from the convolutions of the
    stem and of each stage's downsampling (no forward pass)."""
    return [(shape.tokens, shape.dims) for shape in stage_shapes(model, image_size)]


def stage_shapes(model: nn.Module, image_size: int) -> tuple[StageShape, ...]:
    """Every stage's output grid (tokens, dims, height, width) for square images of `image_size` pixels."""
    check_hierarchical(model)
    height = width = image_size
    shapes = []
    for index, stage in enumerate(model.stages):
        conv = (model.patch_embed if index == 0 else stage.downsample).proj
        height, width = _conv_out(height, conv, 0), _conv_out(width, conv, 1)
        shapes.append(StageShape(height * width, conv.out_channels, height, width))
    return tuple(shapes)


def transfer_options(model: nn.Module, image_size: int) -> tuple[TransferOption, ...]:
    """The three ways to send a dense task's features, with their float32 bytes per image (compression aside):
    the MIST aggregate, every stage's output, the last stage's output."""
    geometry = stage_geometry(model, image_size)
    last = geometry[-1]

    def option(name: str, shapes: list[tuple[int, int]]) -> TransferOption:
        return TransferOption(name, tuple(shapes), FLOAT32_BYTES * sum(t * d for t, d in shapes))

    return option("mist", [last]), option("stages", geometry), option("last_stage", [last])
