"""The Gather stage against timm's own forward: prefix sums, early stop, baselines, ViT-B/16 sizes, bad inputs."""

from __future__ import annotations

import pytest
import timm
import torch

from services.common.errors import InvalidArgumentError
from services.common.wire.gather_modes import VIT_B16, BackboneGeometry, baseline_bytes_per_image, last_block_indices
from services.extractor.gather import (
    backbone_geometry,
    check_supported,
    embed_tokens,
    gather,
    gather_baseline,
    gather_prefix_sums,
)

TINY = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, num_heads=2)
# name -> (timm model, extra kwargs): class token + CLIP-style pre-norm, no class token + avg pool, registers,
# distilled; depths 2 to 5.
TINY_SPECS = {
    "vit_cls_d3": ("vit_tiny_patch16_224", dict(depth=3, pre_norm=True)),
    "vit_avg_d4": ("vit_tiny_patch16_224", dict(depth=4, class_token=False, global_pool="avg")),
    "vit_reg4_d2": ("vit_tiny_patch16_224", dict(depth=2, reg_tokens=4, no_embed_class=True)),
    "deit_distilled_d5": ("deit_tiny_distilled_patch16_224", dict(depth=5)),
}
PREFIX_TOKENS = {"vit_cls_d3": 1, "vit_avg_d4": 0, "vit_reg4_d2": 5, "deit_distilled_d5": 2}
BATCH = 2
MIB = 2**20


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {key: timm.create_model(name, **TINY, **extra).eval() for key, (name, extra) in TINY_SPECS.items()}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def vit_b16() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False).eval()


def reference_maps(model: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """[x_0, x_1, ..., x_N] from timm's own forward_intermediates (x_0 from a hook on norm_pre)."""
    captured = []
    handle = model.norm_pre.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            outputs = model.forward_intermediates(
                images, norm=False, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
            )
    finally:
        handle.remove()
    # Models with prefix tokens give (spatial, prefix) pairs; put the prefix back in front as in the sequence.
    blocks = [torch.cat([out[1], out[0]], dim=1) if isinstance(out, tuple) else out for out in outputs]
    return [captured[0], *blocks]


class BlockCounter:
    """Counts forward calls per block through hooks; use as a context manager."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = [0] * len(model.blocks)
        self._handles = [
            block.register_forward_hook(lambda *_, i=i: self._count(i)) for i, block in enumerate(model.blocks)
        ]

    def _count(self, index: int) -> None:
        self.calls[index] += 1

    def __enter__(self) -> BlockCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


def ks_for(depth: int) -> list[tuple[int, ...]]:
    return [(1,), (depth,), tuple(range(1, depth + 1)), (depth, 1)]


@pytest.mark.parametrize("key", TINY_SPECS)
def test_geometry_matches_the_tokens_the_model_makes(tiny_models, images, key):
    model = tiny_models[key]

    geometry = backbone_geometry(model)
    x_0 = embed_tokens(model, images)

    prefix = PREFIX_TOKENS[key]
    assert geometry == BackboneGeometry(len(model.blocks), 16 + prefix, 32, prefix)
    assert x_0.shape == (BATCH, geometry.tokens, geometry.dims)


@pytest.mark.parametrize("key", TINY_SPECS)
def test_prefix_sums_equal_timm_intermediates(tiny_models, images, key):
    # Prepare
    model = tiny_models[key]
    maps = reference_maps(model, images)
    depth = len(model.blocks)

    for ks in ks_for(depth):
        # Execute
        sums = gather_prefix_sums(model, images, ks)

        # Assert
        assert list(sums) == sorted(set(ks))
        for k, total in sums.items():
            expected = torch.stack(maps[: k + 1]).sum(dim=0)
            assert total.shape == (BATCH, 16 + PREFIX_TOKENS[key], 32)
            assert total.dtype == torch.float32 and not total.requires_grad
            torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", TINY_SPECS)
def test_embed_tokens_equals_norm_pre_output(tiny_models, images, key):
    model = tiny_models[key]

    x_0 = embed_tokens(model, images)

    torch.testing.assert_close(x_0, reference_maps(model, images)[0], rtol=0, atol=0)


def test_a_small_k_runs_only_k_blocks(tiny_models, images):
    model = tiny_models["deit_distilled_d5"]

    with BlockCounter(model) as counter:
        gather_prefix_sums(model, images, [2])

    assert counter.calls == [1, 1, 0, 0, 0]


def test_several_ks_share_one_pass_to_the_deepest(tiny_models, images):
    model = tiny_models["deit_distilled_d5"]

    with BlockCounter(model) as counter:
        sums = gather(model, images, "mist", ks=(3, 1, 2, 3))

    assert counter.calls == [1, 1, 1, 0, 0]
    assert list(sums) == [1, 2, 3]


@pytest.mark.parametrize("mode", ["lst", "last", "partial", "cls"])
def test_baselines_run_each_needed_block_once(tiny_models, images, mode):
    model = tiny_models["deit_distilled_d5"]

    with BlockCounter(model) as counter:
        gather_baseline(model, images, mode)

    needed = 4 if mode == "partial" else 5  # partial stops before the last block
    assert counter.calls == [1] * needed + [0] * (5 - needed)


@pytest.mark.parametrize("key", TINY_SPECS)
def test_baseline_shapes_and_values(tiny_models, images, key):
    # Prepare
    model = tiny_models[key]
    depth, tokens = len(model.blocks), 16 + PREFIX_TOKENS[key]
    sums = {0: embed_tokens(model, images), **gather_prefix_sums(model, images, range(1, depth + 1))}
    last_block_input = []
    handle = model.blocks[-1].register_forward_pre_hook(lambda module, args: last_block_input.append(args[0]))
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
    handle.remove()

    # Execute
    out = {mode: gather(model, images, mode)[0] for mode in ("lst", "last", "partial", "cls")}

    # Assert: shapes
    indices = last_block_indices(depth)
    assert out["lst"].shape == (BATCH, depth + 1, tokens, 32)
    assert out["last"].shape == (BATCH, len(indices) + 1, tokens, 32)
    assert out["partial"].shape == (BATCH, tokens, 32)
    assert out["cls"].shape == (BATCH, 32)
    assert all(tensor.dtype == torch.float32 for tensor in out.values())
    # Assert: values. lst slice i is x_i = S_i - S_{i-1}; last picks x_0 and the listed block outputs.
    torch.testing.assert_close(out["lst"][:, 0], sums[0], rtol=0, atol=0)
    for i in range(1, depth + 1):
        torch.testing.assert_close(out["lst"][:, i], sums[i] - sums[i - 1], rtol=1e-5, atol=1e-5)
    for slot, i in enumerate([0, *indices]):
        torch.testing.assert_close(out["last"][:, slot], sums[i] - sums[i - 1] if i else sums[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["partial"], last_block_input[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["cls"], pooled, rtol=1e-5, atol=1e-5)


def test_batch_of_one_matches_the_same_image_in_a_batch(tiny_models, images):
    model = tiny_models["vit_cls_d3"]

    single = gather(model, images[:1], "mist", ks=[2])[2]
    batched = gather(model, images, "mist", ks=[2])[2]

    assert single.shape == (1, 17, 32)
    torch.testing.assert_close(single, batched[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["mist", "lst", "cls"])
def test_bfloat16_autocast_gives_float32_close_to_float32(tiny_models, images, mode):
    # Prepare
    model = tiny_models["vit_reg4_d2"]
    ks = (1, 2) if mode == "mist" else ()
    reference = gather(model, images, mode, ks)

    # Execute
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = gather(model, images, mode, ks)

    # Assert: same keys and shapes, float32, within bfloat16 rounding of the float32 result.
    assert list(mixed) == list(reference)
    for key, tensor in mixed.items():
        assert tensor.dtype == torch.float32 and tensor.shape == reference[key].shape
        relative_error = (tensor - reference[key]).norm() / reference[key].norm()
        assert 0 < relative_error < 0.05


@pytest.mark.slow  # four full ViT-B passes and one of 11 blocks on one image: 2-5 s on 2 busy cores
def test_vit_b16_one_image_sizes_match_the_paper(vit_b16):
    # Prepare
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    expected_bytes = baseline_bytes_per_image(VIT_B16)

    # Execute
    geometry = backbone_geometry(vit_b16)
    tensors = {"mist_f32": gather(vit_b16, image, "mist", ks=[3])[3]}  # the size does not depend on k
    tensors.update({mode: gather(vit_b16, image, mode)[0] for mode in ("lst", "last", "partial", "cls")})

    # Assert: the actual per-image float32 bytes of each tensor, and the paper's MiB.
    assert geometry == VIT_B16
    sent = {name: tensor[0].numel() * tensor.element_size() for name, tensor in tensors.items()}
    assert all(tensor.dtype == torch.float32 and tensor.shape[0] == 1 for tensor in tensors.values())
    assert sent == expected_bytes
    mib = {name: round(size / MIB, 3) for name, size in sent.items()}
    assert mib == {"lst": 7.503, "last": 4.040, "partial": 0.577, "cls": 0.003, "mist_f32": 0.577}


@pytest.mark.parametrize("ks", [[0], [6], [1, 6], [-1]])
def test_k_out_of_range_is_invalid_argument(tiny_models, images, ks):
    with pytest.raises(InvalidArgumentError, match=r"k must be an integer in \[1, 5\]"):
        gather(tiny_models["deit_distilled_d5"], images, "mist", ks)


def test_empty_ks_is_invalid_argument(tiny_models, images):
    with pytest.raises(InvalidArgumentError, match=r"at least one k in \[1, 3\]"):
        gather_prefix_sums(tiny_models["vit_cls_d3"], images, [])


def test_ks_with_a_baseline_mode_is_invalid_argument(tiny_models, images):
    with pytest.raises(InvalidArgumentError, match="takes no k"):
        gather(tiny_models["vit_cls_d3"], images, "lst", ks=[2])


@pytest.mark.parametrize("mode", ["lora", "MIST", ""])
def test_unknown_mode_is_invalid_argument(tiny_models, images, mode):
    with pytest.raises(InvalidArgumentError, match="expected one of mist, lst, last, partial, cls"):
        gather(tiny_models["vit_cls_d3"], images, mode, ks=[1])


def test_gather_baseline_refuses_mist(tiny_models, images):
    with pytest.raises(InvalidArgumentError, match="gather_prefix_sums"):
        gather_baseline(tiny_models["vit_cls_d3"], images, "mist")


def test_unsupported_model_is_invalid_argument(images):
    resnet = timm.create_model("resnet10t", pretrained=False).eval()

    for call in (
        lambda: check_supported(resnet),
        lambda: backbone_geometry(resnet),
        lambda: gather(resnet, images, "cls"),
    ):
        with pytest.raises(InvalidArgumentError, match="timm VisionTransformer.*ResNet"):
            call()


@pytest.mark.parametrize(
    ("shape", "message"),
    [((2, 3, 48, 48), "must be 32x32"), ((3, 32, 32), r"\[B, C, H, W\]"), ((0, 3, 32, 32), "B >= 1")],
)
def test_bad_image_tensors_are_invalid_argument(tiny_models, shape, message):
    with pytest.raises(InvalidArgumentError, match=message):
        gather(tiny_models["vit_cls_d3"], torch.zeros(shape), "mist", ks=[1])


def test_cls_needs_a_pooling_model(images):
    unpooled = timm.create_model("vit_tiny_patch16_224", **TINY, depth=1, global_pool="").eval()

    with pytest.raises(InvalidArgumentError, match="global_pool=''"):
        gather(unpooled, images, "cls")
