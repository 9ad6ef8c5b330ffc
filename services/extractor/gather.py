"""The Gather stage: MIST prefix sums x_0 + ... + x_k and the baseline gathers for timm ViT backbones.

A stage in the timm sense: it calls the model's own sub-modules (patch_embed, _pos_embed, blocks, norm,
forward_head) in the order its forward does, and stops after the last block a request needs.

Callers must put the model in eval mode (`model.eval()`) first: this module never changes the mode, and in
train mode dropout, drop-path and patch dropout would make the features random. Every function runs under
`torch.inference_mode()` and returns float32 tensors whatever the compute dtype (bfloat16 autocast included),
because sums are accumulated in float32 and the wire codec, not the stage, decides what dtype travels.

    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    features = gather(model, images, "mist", ks=(3, 6, 9, 12))  # {3: [B, 197, 768], 6: ..., 12: ...}

`gather` also serves hierarchical backbones (timm's pvt_v2_*), whose gather lives in hierarchical.py: there k is a
stage and the modes are mist, stages and last_stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from timm.models.vision_transformer import VisionTransformer

from services.common.errors import InvalidArgumentError
from services.common.wire.gather_modes import (
    BASELINE_MODES,
    BackboneGeometry,
    GatherModeName,
    check_mode,
    last_block_indices,
    validate_ks,
)
from services.extractor.hierarchical import check_hierarchical, gather_hierarchical, stage_shapes


def is_hierarchical(model: torch.nn.Module) -> bool:
    """True for a hierarchical backbone of the pvt_v2 family (hierarchical.py), False for anything else."""
    if isinstance(model, VisionTransformer):
        return False
    try:
        check_hierarchical(model)
    except InvalidArgumentError:
        return False
    return True


def check_supported(model: torch.nn.Module) -> VisionTransformer:
    """Return `model` if it is a timm VisionTransformer (vit_*, deit_* incl. distilled), else raise."""
    if not isinstance(model, VisionTransformer):
        raise InvalidArgumentError(
            f"gathering needs a timm VisionTransformer (vit_*, deit_* and their subclasses); "
            f"got {type(model).__module__}.{type(model).__qualname__}"
        )
    return model


def backbone_geometry(model: torch.nn.Module, image_size: int = 0) -> BackboneGeometry:
    """Blocks, tokens (prefix tokens included) and dims of a ViT at its default input size; the stages of a
    hierarchical backbone at square `image_size` pixels (required for one)."""
    if is_hierarchical(model):
        if image_size < 1:
            raise InvalidArgumentError(f"a hierarchical backbone's geometry needs an image size; got {image_size!r}")
        return BackboneGeometry.hierarchical(stage_shapes(model, image_size))
    vit = check_supported(model)
    return BackboneGeometry(
        num_blocks=len(vit.blocks),
        tokens=vit.patch_embed.num_patches + vit.num_prefix_tokens,
        dims=vit.embed_dim,
        num_prefix_tokens=vit.num_prefix_tokens,
    )


def _check_images(vit: VisionTransformer, images: torch.Tensor) -> None:
    """Reject what the model would reject with a bare assert (or worse, silently misread)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidArgumentError(f"images must be a [B, C, H, W] tensor with B >= 1; got {shape}")
    patch_embed = vit.patch_embed
    strict = getattr(patch_embed, "strict_img_size", False) and not getattr(vit, "dynamic_img_size", False)
    expected = getattr(patch_embed, "img_size", None)
    if strict and expected is not None and tuple(images.shape[-2:]) != tuple(expected):
        raise InvalidArgumentError(
            f"images must be {expected[0]}x{expected[1]} for this backbone; got {images.shape[-2]}x{images.shape[-1]}"
        )


def _embed(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    # The same calls, in the same order, as VisionTransformer.forward_features before its blocks.
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)  # class / register / distillation tokens + position embedding
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def _block_outputs(vit: VisionTransformer, x: torch.Tensor, num_blocks: int) -> Iterator[torch.Tensor]:
    """Yield x_1 .. x_num_blocks; blocks past `num_blocks` never run."""
    for block in vit.blocks[:num_blocks]:
        x = block(x)
        yield x


@torch.inference_mode()
def embed_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """x_0 [B, T, D]: the token sequence the model's forward feeds to block 0 (float32)."""
    vit = check_supported(model)
    _check_images(vit, images)
    return _embed(vit, images).float()


@torch.inference_mode()
def gather_prefix_sums(model: torch.nn.Module, images: torch.Tensor, ks: Iterable[int]) -> dict[int, torch.Tensor]:
    """{k: x_0 + x_1 + ... + x_k [B, T, D]} for every requested k, from one pass over blocks 0..max(ks)-1.

    Keys come in ascending k. Every k must be in [1, N]; duplicates are dropped.
    """
    vit = check_supported(model)
    wanted = set(validate_ks(ks, len(vit.blocks)))
    _check_images(vit, images)
    deepest = max(wanted)
    x = _embed(vit, images)
    # Accumulate in float32: under bf16 autocast, summing up to 13 maps in bf16 would lose precision.
    total = x.float()
    sums: dict[int, torch.Tensor] = {}
    for k, x_k in enumerate(_block_outputs(vit, x, deepest), start=1):
        total = total + x_k.float()  # a fresh tensor each step, so stored sums are never overwritten
        if k in wanted:
            sums[k] = total
    return sums


def _stack_maps(vit: VisionTransformer, images: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """[B, len(indices), T, D]: x_i for each 1-based block index i (0 = x_0), in the order given."""
    keep = set(indices)
    x = _embed(vit, images)
    maps = {0: x} if 0 in keep else {}
    for i, x_i in enumerate(_block_outputs(vit, x, max(indices)), start=1):
        if i in keep:  # hold only what is sent: for LAST on a big batch, half the maps stay unallocated
            maps[i] = x_i
    return torch.stack([maps[i].float() for i in indices], dim=1)


def _pooled(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    # The model's own two stages up to the pre-logits: the vector a linear probe is trained on
    # (class token, average or attention pooling, distilled token average, fc_norm: whatever the model does).
    pooled = vit.forward_head(vit.forward_features(images), pre_logits=True)
    if pooled.ndim != 2:  # global_pool='' keeps every token: there is no single vector to send
        raise InvalidArgumentError(
            f"gather mode 'cls' needs a model that pools to one vector; this one has global_pool={vit.global_pool!r}"
        )
    return pooled.float()


@torch.inference_mode()
def gather_baseline(model: torch.nn.Module, images: torch.Tensor, mode: GatherModeName) -> torch.Tensor:
    """The tensor a baseline sends for each image (float32):

    lst [B, N+1, T, D] (x_0 and every block output), last [B, maps, T, D] (x_0 and the outputs listed by
    `last_block_indices`), partial [B, T, D] (the input of the last block), cls [B, D] (the final pooled,
    normalised vector). Partial runs N-1 blocks; the others run all N.
    """
    vit = check_supported(model)
    if check_mode(mode) not in BASELINE_MODES:
        raise InvalidArgumentError(
            f"gather_baseline serves lst, last, partial and cls on a ViT; got {mode!r} (gather_prefix_sums for mist; "
            f"stages and last_stage need a hierarchical backbone)"
        )
    _check_images(vit, images)
    num_blocks = len(vit.blocks)
    if mode == "lst":
        return _stack_maps(vit, images, list(range(num_blocks + 1)))
    if mode == "last":
        return _stack_maps(vit, images, [0, *last_block_indices(num_blocks)])
    if mode == "partial":
        return _stack_maps(vit, images, [num_blocks - 1])[:, 0]
    return _pooled(vit, images)


def gather(
    model: torch.nn.Module, images: torch.Tensor, mode: GatherModeName, ks: Iterable[int] = ()
) -> dict[int, torch.Tensor]:
    """One entry point for every mode: mist gives {k: [B, T, D]} for each k in `ks`; the baselines give
    {0: tensor} (0 is the wire's "no k") and take no ks: a non-empty `ks` with them is an error rather than
    silently ignored, since it means the caller expected a prefix sum.

    On a hierarchical backbone (hierarchical.gather_hierarchical): mist {s: G_s [B, T_s, D_s]} for each stage s in
    `ks`, stages {s: stage s's output [B, T_s, D_s]} for s in 1..S, last_stage {0: [B, T_S, D_S]}.
    """
    if is_hierarchical(model):
        return gather_hierarchical(model, images, mode, ks)
    if check_mode(mode) == "mist":
        return gather_prefix_sums(model, images, ks)
    ks = tuple(ks)
    if ks:
        raise InvalidArgumentError(f"gather mode {mode!r} takes no k; got ks={list(ks)}")
    return {0: gather_baseline(model, images, mode)}
