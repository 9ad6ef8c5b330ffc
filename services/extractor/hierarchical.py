"""The MIST gather on hierarchical backbones: timm's `pvt_v2_*` family, the design family of SegFormer's MiT encoder
(timm has no `mit_*`), for dense tasks such as semantic segmentation.

A plain ViT keeps one token grid, so its gather is a sum of block outputs. A hierarchical backbone shrinks the grid
and widens the tokens at every stage, so the sum is carried across stages the way the paper's appendix does it for
SegFormer: with each stage's own downsampling module, untrained (its weights as they are), applied to the running
sum. Per stage s, with u_s its input (the stem's patch embedding for stage 0, the stage's downsampling of the
previous stage's output after that) and b_s1 .. b_sn the residual stream after each of its blocks:

    A_s = u_s + b_s1 + ... + b_sn               the ViT gather, within one stage
    G_0 = A_0;   G_s = DS_s(G_{s-1}) + A_s      DS_s: stage s's downsampling (overlapping conv + LayerNorm)

G of the last stage is the aggregate a device receives: [H/32 * W/32 tokens, D_last] for pvt_v2, the size of the
last stage's output alone. Next to it, the two baselines of dense tasks: every stage's output (what a side network
needs, the LST-like cost) and the last stage's output (a frozen encoder with a trained head).

    features = hierarchical_gather(model, images)     # model: timm.create_model("pvt_v2_b0"), eval mode
    features.aggregate          # [B, T, D] tokens, row-major over features.grid
    options = transfer_options(model, image_size=512)  # shape and float32 bytes per image of each option

Not served yet: the extractor's wire and Describe carry the ViT gather only (the segmentation issue builds on this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from services.common.errors import InvalidArgumentError

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class HierarchicalFeatures:
    """What one forward gives: the MIST aggregate and every stage's output."""

    aggregate: torch.Tensor  # [B, T, D]: G of the last stage, tokens row-major over `grid`
    grid: tuple[int, int]  # (H, W) of the aggregate's tokens
    stage_outputs: tuple[torch.Tensor, ...]  # [B, D_s, H_s, W_s] each: exactly forward_intermediates' features


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
def hierarchical_gather(model: nn.Module, images: torch.Tensor) -> HierarchicalFeatures:
    """The aggregate G (module docstring) and every stage's output, in one forward of `model` (in eval mode) over
    normalised images [B, 3, H, W]."""
    check_hierarchical(model)
    x = model.patch_embed(images)  # [B, H, W, C]
    carried: torch.Tensor | None = None  # G of the stage before, [B, C, H, W]
    previous: torch.Tensor | None = None  # the stage before's output, [B, C, H, W]
    outputs = []
    for stage in model.stages:
        if stage.downsample is not None and previous is not None:
            x = stage.downsample(previous)  # the stage's input, [B, H, W, C]
        batch, height, width, dims = x.shape
        tokens = x.reshape(batch, -1, dims)
        total = tokens.clone()  # A_s, from u_s
        for block in stage.blocks:
            tokens = block(tokens, (height, width))
            total += tokens
        if carried is not None:
            total += stage.downsample(carried).reshape(batch, -1, dims)  # DS_s(G_{s-1})
        carried = total.reshape(batch, height, width, dims).permute(0, 3, 1, 2)
        previous = stage.norm(tokens).reshape(batch, height, width, dims).permute(0, 3, 1, 2).contiguous()
        outputs.append(previous)
    assert carried is not None  # check_hierarchical: at least one stage
    return HierarchicalFeatures(carried.flatten(2).transpose(1, 2).contiguous(), (height, width), tuple(outputs))


def _conv_out(size: int, conv: nn.Conv2d, axis: int) -> int:
    return (size + 2 * conv.padding[axis] - conv.dilation[axis] * (conv.kernel_size[axis] - 1) - 1) // conv.stride[
        axis
    ] + 1


def stage_geometry(model: nn.Module, image_size: int) -> list[tuple[int, int]]:
    """(tokens, dims) of every stage's output for square images of `image_size` pixels, from the convolutions of the
    stem and of each stage's downsampling (no forward pass)."""
    check_hierarchical(model)
    height = width = image_size
    geometry = []
    for index, stage in enumerate(model.stages):
        embed = model.patch_embed if index == 0 else stage.downsample
        conv = embed.proj
        height, width = _conv_out(height, conv, 0), _conv_out(width, conv, 1)
        geometry.append((height * width, conv.out_channels))
    return geometry


def transfer_options(model: nn.Module, image_size: int) -> tuple[TransferOption, ...]:
    """The three ways to send a dense task's features, with their float32 bytes per image (compression aside):
    the MIST aggregate, every stage's output, the last stage's output."""
    geometry = stage_geometry(model, image_size)
    last = geometry[-1]

    def option(name: str, shapes: list[tuple[int, int]]) -> TransferOption:
        return TransferOption(name, tuple(shapes), FLOAT32_BYTES * sum(t * d for t, d in shapes))

    return option("mist", [last]), option("stages", geometry), option("last_stage", [last])
