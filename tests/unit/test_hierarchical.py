"""The MIST gather of hierarchical backbones (services/extractor/hierarchical.py), proven against timm's own forward
on a random-init pvt_v2_b0: its stage outputs are forward_intermediates' to the bit, and the aggregate equals the
formula evaluated from the block outputs timm computes (caught with forward hooks during forward_intermediates)."""

from __future__ import annotations

import pytest
import timm
import torch

from services.common.errors import InvalidArgumentError
from services.extractor.hierarchical import (
    check_hierarchical,
    hierarchical_gather,
    stage_geometry,
    transfer_options,
)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("pvt_v2_b0", pretrained=False).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))  # not square: H and W kept apart


def test_stage_outputs_are_timms_forward_intermediates(model, images):
    features = hierarchical_gather(model, images)
    with torch.inference_mode():
        _, expected = model.forward_intermediates(images)
    assert [tuple(t.shape) for t in features.stage_outputs] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 160, 4, 6),
                                                                (2, 256, 2, 3)]  # fmt: skip
    for ours, theirs in zip(features.stage_outputs, expected, strict=True):
        assert torch.equal(ours, theirs)


def test_the_aggregate_is_the_running_sum_carried_by_each_stages_downsampling(model, images):
    # Prepare: every block's output and every stage's input as timm's own forward computes them
    captured: dict[str, list[torch.Tensor]] = {"inputs": [], "blocks": []}
    handles = [model.patch_embed.register_forward_hook(lambda m, a, out: captured["inputs"].append(out))]
    for stage in model.stages:
        if stage.downsample is not None:
            handles.append(stage.downsample.register_forward_hook(lambda m, a, out: captured["inputs"].append(out)))
        for block in stage.blocks:
            handles.append(block.register_forward_hook(lambda m, a, out: captured["blocks"].append(out)))
    with torch.inference_mode():
        model.forward_intermediates(images)
    for handle in handles:
        handle.remove()

    # Execute: G_0 = A_0; G_s = DS_s(G_{s-1}) + A_s, from the captured tensors
    blocks = iter(captured["blocks"])
    carried = None
    with torch.inference_mode():
        for stage, stage_input in zip(model.stages, captured["inputs"], strict=True):
            batch, height, width, dims = stage_input.shape
            total = stage_input.reshape(batch, -1, dims) + sum(next(blocks) for _ in stage.blocks)
            if carried is not None:
                total = total + stage.downsample(carried).reshape(batch, -1, dims)
            carried = total.reshape(batch, height, width, dims).permute(0, 3, 1, 2)
    expected = carried.flatten(2).transpose(1, 2)
    features = hierarchical_gather(model, images)

    # Assert: the same tensor (sums in another order: float32 rounding only), on the last stage's grid
    assert features.grid == (2, 3) and tuple(features.aggregate.shape) == (2, 6, 256)
    torch.testing.assert_close(features.aggregate, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(features.aggregate).all()


def test_the_three_transfer_options_at_512_px(model):
    options = {option.name: option for option in transfer_options(model, image_size=512)}
    assert stage_geometry(model, 512) == [(128 * 128, 32), (64 * 64, 64), (32 * 32, 160), (16 * 16, 256)]
    assert options["mist"].shapes == options["last_stage"].shapes == ((256, 256),)
    assert options["mist"].float32_bytes == 4 * 256 * 256 == 262_144
    assert options["stages"].float32_bytes == 4 * (16384 * 32 + 4096 * 64 + 1024 * 160 + 256 * 256) == 4_063_232
    # geometry from the convolutions agrees with a real forward at another size
    outputs = hierarchical_gather(model, torch.zeros(1, 3, 80, 80)).stage_outputs
    assert stage_geometry(model, 80) == [(out.shape[2] * out.shape[3], out.shape[1]) for out in outputs]


def test_a_plain_vit_is_refused_by_name():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    with pytest.raises(InvalidArgumentError, match="VisionTransformer is not a hierarchical backbone"):
        check_hierarchical(vit)
