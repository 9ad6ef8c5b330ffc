"""Tests of the LAE edge network: its pure-Python spec (config, shapes, cost model) and its torch module.

Run: .venv/bin/pytest -q tests/unit/test_edge_network.py  (add -s to see the paper comparison printed)
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors
from torch import nn

from services.common.errors import FailedPreconditionError, InvalidArgumentError
from services.common.pb import feature_pb2
from services.common.wire.edge_spec import (
    CONFIG_METADATA_KEY,
    EdgeNetworkConfig,
    macs_per_image,
    parameter_breakdown,
    state_shapes,
    trainable_parameters,
)
from services.common.wire.weights import check_edge_weights, inspect_safetensors
from services.tuner.edge_network import EdgeNetwork, from_safetensors_bytes, to_safetensors_bytes

VIT_B16 = EdgeNetworkConfig(dims=768, tokens=197, num_classes=10)  # M = 4, r = 16, one head, CLS pooling
SMALL = EdgeNetworkConfig(dims=32, tokens=5, num_classes=3, num_blocks=2, rank=8, heads=2)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These tensors are tiny: a second intra-op thread only spins, and on a loaded 2-core runner the
    spinning made the learning test 18x slower (0.7 s -> 12.9 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def perturbed(config: EdgeNetworkConfig, seed: int = 0) -> EdgeNetwork:
    """A network whose output projections are not zero, so every block does something."""
    torch.manual_seed(seed)
    return EdgeNetwork(config, zero_init_proj=False)


# --- the cost model, pinned at ViT-B/16 geometry ---------------------------------------------------------


def test_parameters_at_vit_b16_geometry_match_hand_count_and_module():
    # Prepare: per block LayerNorm 2*768, qkv 768*48 + 48, proj 16*768 + 768; head LayerNorm + 768*10 + 10.
    per_block = 2 * 768 + (768 * 48 + 48) + (16 * 768 + 768)
    assert per_block == 1_536 + 36_912 + 13_056 == 51_504
    blocks = 4 * per_block  # 206,016: the "about 0.21 M without the head" of MIST.md
    head = 2 * 768 + (768 * 10 + 10)  # 9,226
    # Execute
    breakdown = parameter_breakdown(VIT_B16)
    model = EdgeNetwork(VIT_B16)
    # Assert
    assert (breakdown.blocks, breakdown.head) == (206_016, 9_226) == (blocks, head)
    assert trainable_parameters(VIT_B16) == 215_242 == trainable_count(model)
    assert sum(p.numel() for p in model.blocks.parameters()) == 206_016


def test_macs_at_vit_b16_geometry_match_hand_count():
    # Prepare: per block q, k, v 3*T*D*r, scores T*T*r, attention*V T*T*r, proj T*r*D; head D*C.
    t, d, r, c = 197, 768, 16, 10
    per_block = 3 * t * d * r + t * t * r + t * t * r + t * r * d
    assert per_block == 7_262_208 + 620_944 + 620_944 + 2_420_736 == 10_924_832
    # Execute
    macs = macs_per_image(VIT_B16)
    multi_head = macs_per_image(dataclasses.replace(VIT_B16, heads=4))
    # Assert
    assert macs == 4 * per_block + d * c == 43_707_008
    assert multi_head == macs  # 4 heads of 4 dims do the same T*T*r work as 1 head of 16


def test_rank_32_reproduces_the_papers_figures_within_rounding():
    # Prepare: the paper reports 0.38 M parameters and 0.09 GMACs; r = 16 gives 0.215 M and 0.044 G.
    rank_32 = dataclasses.replace(VIT_B16, rank=32)
    # Execute
    blocks_32 = parameter_breakdown(rank_32).blocks
    macs_32 = macs_per_image(rank_32)
    # Assert: 4 * (1,536 + 768*96 + 96 + 32*768 + 768) and 4 * (3*197*768*32 + 2*197*197*32 + 197*32*768) + 7,680
    assert blocks_32 == 4 * (1_536 + 73_824 + 25_344) == 402_816
    assert macs_32 == 4 * (14_524_416 + 2_483_776 + 4_841_472) + 7_680 == 87_406_336
    print(
        f"\nViT-B/16, M=4, C=10  r=16: {trainable_parameters(VIT_B16) / 1e6:.3f} M params "
        f"({parameter_breakdown(VIT_B16).blocks / 1e6:.3f} M blocks), {macs_per_image(VIT_B16) / 1e9:.4f} GMACs;"
        f"  r=32: {trainable_parameters(rank_32) / 1e6:.3f} M, {macs_32 / 1e9:.4f} GMACs;  paper: 0.38 M, 0.09 GMACs"
    )


# --- state_shapes against the real module ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("heads", "pooling", "num_blocks"),
    [
        (1, "cls", 4),
        (2, "mean", 1),
        (4, "cls", 1),
        (4, "mean", 4),
        (1, "mean", 1),
        (2, "cls+tokens", 2),
        (1, "mean+tokens", 1),
    ],  # fmt: skip
)
def test_state_shapes_equal_the_modules_state_dict(heads, pooling, num_blocks):
    # Prepare
    config = EdgeNetworkConfig(
        dims=24, tokens=7, num_classes=5, num_blocks=num_blocks, rank=8, heads=heads, pooling=pooling
    )
    # Execute
    real = {name: tuple(t.shape) for name, t in EdgeNetwork(config).state_dict().items()}
    # Assert: same keys, same order, same shapes, and the count formula agrees with the shapes
    assert list(state_shapes(config).items()) == list(real.items())
    assert trainable_parameters(config) == sum(math.prod(s) for s in real.values())


# --- forward stages ----------------------------------------------------------------------------------------


def test_forward_stages_shapes():
    # Prepare
    model = perturbed(SMALL)
    x = torch.randn(6, 5, 32)
    # Execute
    features = model.forward_features(x)
    pooled = model.forward_head(features, pre_logits=True)
    logits = model(x)
    # Assert
    assert features.shape == (6, 5, 32)
    assert pooled.shape == (6, 32)
    assert logits.shape == (6, 3)
    assert torch.equal(logits, model.forward_head(features))


def test_cls_and_mean_pooling_read_different_tokens():
    # Prepare: the same weights under both poolings
    cls_model = perturbed(SMALL)
    mean_model = EdgeNetwork(dataclasses.replace(SMALL, pooling="mean"))
    mean_model.load_state_dict(cls_model.state_dict())
    x = torch.randn(4, 5, 32)
    # Execute
    with torch.no_grad():
        normed = cls_model.norm(cls_model.forward_features(x))
        cls_pooled = cls_model.forward_head(cls_model.forward_features(x), pre_logits=True)
        mean_pooled = mean_model.forward_head(mean_model.forward_features(x), pre_logits=True)
    # Assert
    torch.testing.assert_close(cls_pooled, normed[:, 0])
    torch.testing.assert_close(mean_pooled, normed.mean(dim=1))
    assert (cls_pooled - mean_pooled).abs().max() > 0.1


def test_multi_head_block_matches_a_reference_attention():
    # Prepare: heads = 4 split r = 8 into four 2-dim heads, each scaled by 1 / sqrt(2)
    model = perturbed(EdgeNetworkConfig(dims=32, tokens=5, num_classes=3, num_blocks=1, rank=8, heads=4))
    block = model.blocks[0]
    x = torch.randn(3, 5, 32)
    # Execute
    with torch.no_grad():
        q, k, v = block.qkv(block.norm(x)).split(8, dim=-1)
        heads = [
            torch.softmax(q[..., h : h + 2] @ k[..., h : h + 2].transpose(1, 2) / math.sqrt(2), dim=-1)
            @ v[..., h : h + 2]
            for h in range(0, 8, 2)
        ]
        reference = x + block.proj(torch.cat(heads, dim=-1))
        single_head = EdgeNetwork(dataclasses.replace(model.config, heads=1))
        single_head.load_state_dict(model.state_dict())
        actual, one_head = block(x), single_head.blocks[0](x)
    # Assert
    torch.testing.assert_close(actual, reference, rtol=1e-5, atol=1e-5)
    assert (actual - one_head).abs().max() > 1e-3  # same weights, different head split


def test_fresh_network_is_a_probe_and_every_parameter_trains_after_one_step():
    # Prepare
    torch.manual_seed(0)
    model = EdgeNetwork(SMALL)
    x, y = torch.randn(8, 5, 32), torch.randint(0, 3, (8,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # Execute: step 0 from the zero-initialised projections, then a second backward after one update
    F.cross_entropy(model(x), y).backward()
    first = {name: p.grad.abs().sum().item() for name, p in model.named_parameters()}
    optimizer.step()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    second = {name: p.grad.abs().sum().item() for name, p in model.named_parameters()}
    # Assert: features pass through unchanged at first; q/k/v (and their LayerNorms) learn from step 1 on
    torch.testing.assert_close(EdgeNetwork(SMALL).forward_features(x), x)
    assert {n for n, g in first.items() if g == 0} == {
        f"blocks.{i}.{p}" for i in range(2) for p in ("norm.weight", "norm.bias", "qkv.weight", "qkv.bias")
    }
    assert all(g > 0 for g in second.values()), second


def test_same_seed_gives_identical_network_and_outputs():
    # Prepare
    x = torch.randn(2, 5, 32)
    # Execute
    a, b, c = perturbed(SMALL, seed=7), perturbed(SMALL, seed=7), perturbed(SMALL, seed=8)
    # Assert
    assert all(torch.equal(a.state_dict()[n], t) for n, t in b.state_dict().items())
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), c(x))


def test_learns_a_token_pattern_task_through_attention():
    # Prepare: the class is a direction added to one random patch token; the CLS token (read by the
    # head) carries none of it, so attention must move it there.
    generator = torch.Generator().manual_seed(0)
    n, tokens, dims, classes = 128, 9, 16, 4
    directions = torch.linalg.qr(torch.randn(dims, dims, generator=generator))[0][:classes]
    x = torch.randn(n, tokens, dims, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    x[torch.arange(n), torch.randint(1, tokens, (n,), generator=generator)] += 4.0 * directions[y]
    torch.manual_seed(0)
    model = EdgeNetwork(EdgeNetworkConfig(dims=dims, tokens=tokens, num_classes=classes, rank=8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.no_grad():
        before = (model(x).argmax(1) == y).float().mean().item()
    # Execute
    for _ in range(50):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Assert
    with torch.no_grad():
        after = (model(x).argmax(1) == y).float().mean().item()
    assert before < 0.5
    assert after >= 0.98, (before, after, loss.item())


def test_training_activations_for_batch_32_at_vit_b16_fit_the_edge_budget():
    # Prepare: count every tensor autograd keeps for backward (by storage, so views count once).
    torch.manual_seed(0)
    model = EdgeNetwork(VIT_B16)
    x = torch.randn(32, 197, 768)
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    # Execute
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    # Assert: about two [32, 197, 768] maps per block (its input and its LayerNorm output) plus the
    # final LayerNorm's input and the attention weights: about 190 MiB of a Pi 4B's 2 GB.
    feature_map_bytes = 32 * 197 * 768 * 4  # 18.5 MiB
    assert 9 * feature_map_bytes <= sum(kept.values()) < 200 * 2**20


# --- input checks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x",
    [torch.randn(2, 5, 31), torch.randn(2, 6, 32), torch.randn(5, 32), torch.randn(1, 2, 5, 32), torch.zeros(0, 5, 32)],
    ids=["wrong-dims", "wrong-tokens", "rank-2", "rank-4", "empty-batch"],
)
def test_features_of_the_wrong_geometry_are_invalid_argument(x):
    model = EdgeNetwork(SMALL)
    with pytest.raises(InvalidArgumentError, match=r"expects features \[B >= 1, 5, 32\]"):
        model(x)


def test_integer_features_are_rejected_and_half_features_computed_in_float32():
    # Prepare
    model = perturbed(SMALL)
    x = torch.randn(2, 5, 32)
    # Execute
    half = model(x.half())
    # Assert
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, model(x.half().float()))
    with pytest.raises(InvalidArgumentError, match="floating point"):
        model(torch.ones(2, 5, 32, dtype=torch.int64))


# --- safetensors weights -----------------------------------------------------------------------------------


def blob_with(tensors: dict[str, torch.Tensor], config: EdgeNetworkConfig = SMALL) -> bytes:
    return save_safetensors(tensors, metadata={CONFIG_METADATA_KEY: config.to_json()})


def test_safetensors_round_trip_gives_identical_outputs_and_metadata():
    # Prepare
    model = perturbed(SMALL)
    x = torch.randn(3, 5, 32)
    # Execute
    blob = to_safetensors_bytes(model, {"task": "flowers", "k": "6"})
    loaded, metadata = from_safetensors_bytes(blob, expected=SMALL)
    # Assert: a safetensors header (8-byte length, then JSON), never a pickle
    assert int.from_bytes(blob[:8], "little") < len(blob) and blob[8:9] == b"{"
    assert loaded.config == SMALL
    assert metadata == {"task": "flowers", "k": "6", "format": "pt", CONFIG_METADATA_KEY: SMALL.to_json()}
    assert torch.equal(loaded(x), model(x))
    assert len(blob) == 4 * trainable_parameters(SMALL) + 8 + int.from_bytes(blob[:8], "little")


def test_weights_missing_a_tensor_are_failed_precondition():
    tensors = perturbed(SMALL).state_dict()
    del tensors["blocks.1.qkv.bias"]
    with pytest.raises(FailedPreconditionError, match=r"missing: \['blocks.1.qkv.bias'\]"):
        from_safetensors_bytes(blob_with(tensors))


def test_weights_with_an_extra_tensor_are_failed_precondition():
    tensors = {**perturbed(SMALL).state_dict(), "blocks.2.proj.weight": torch.zeros(32, 8)}
    with pytest.raises(FailedPreconditionError, match="unexpected"):
        from_safetensors_bytes(blob_with(tensors))


def test_weights_with_a_wrong_shape_are_failed_precondition():
    tensors = {**perturbed(SMALL).state_dict(), "head.weight": torch.zeros(4, 32)}
    with pytest.raises(FailedPreconditionError, match=r"head.weight \(4, 32\) != \(3, 32\)"):
        from_safetensors_bytes(blob_with(tensors))


def test_weights_in_float16_are_failed_precondition():
    tensors = {name: t.half() for name, t in perturbed(SMALL).state_dict().items()}
    with pytest.raises(FailedPreconditionError, match="float32"):
        from_safetensors_bytes(blob_with(tensors))


def test_weights_of_another_config_than_the_task_are_failed_precondition():
    blob = to_safetensors_bytes(perturbed(SMALL))
    with pytest.raises(FailedPreconditionError, match="the task expects"):
        from_safetensors_bytes(blob, expected=dataclasses.replace(SMALL, rank=4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_invalid_argument_on_load_and_on_save(bad):
    # Prepare
    model = perturbed(SMALL)
    with torch.no_grad():
        model.blocks[0].proj.weight[3, 1] = bad
    tensors = model.state_dict()
    # Execute / Assert
    with pytest.raises(InvalidArgumentError, match=r"NaN or Inf in \['blocks.0.proj.weight'\]"):
        from_safetensors_bytes(blob_with(tensors))
    with pytest.raises(InvalidArgumentError, match="NaN or Inf"):
        to_safetensors_bytes(model)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x00" * 7,
        bytes(range(256)) * 8,
        (10**9).to_bytes(8, "little") + b"{}",
        (4).to_bytes(8, "little") + b"[1,2]",
        (2).to_bytes(8, "little") + b"{}" + b"\x00" * 4,
    ],
    ids=["empty", "short", "random", "huge-header-length", "not-an-object", "uncovered-data"],
)
def test_bytes_that_are_not_safetensors_are_invalid_argument(blob):
    with pytest.raises(InvalidArgumentError, match="not a valid safetensors file"):
        from_safetensors_bytes(blob)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_ever_raise_invalid_argument(blob):
    with pytest.raises(InvalidArgumentError):
        from_safetensors_bytes(blob)


def tiny_blob() -> bytes:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return to_safetensors_bytes(
            EdgeNetwork(EdgeNetworkConfig(dims=8, tokens=3, num_classes=2, num_blocks=1, rank=4))
        )


GOOD_BLOB = tiny_blob()


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(GOOD_BLOB) - 1), st.integers(1, 255))
def test_corrupted_weights_load_or_raise_a_domain_error(position, flip):
    # Prepare: one byte changed anywhere: length prefix, JSON header or tensor data
    blob = bytearray(GOOD_BLOB)
    blob[position] ^= flip
    # Execute / Assert: a changed weight may load (the registry's sha256 catches that); nothing else escapes
    try:
        model, _ = from_safetensors_bytes(bytes(blob))
    except (InvalidArgumentError, FailedPreconditionError):
        return
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_truncated_blob_and_blob_without_config_are_invalid_argument():
    # Prepare
    good = to_safetensors_bytes(perturbed(SMALL))
    plain = save_safetensors(perturbed(SMALL).state_dict())
    # Execute / Assert
    with pytest.raises(InvalidArgumentError, match="not a valid safetensors file"):
        from_safetensors_bytes(good[:-4])
    with pytest.raises(InvalidArgumentError, match="lacks 'mist.edge_network_config'"):
        from_safetensors_bytes(plain)


def test_header_check_without_torch_reports_config_and_entries():
    # Prepare
    blob = to_safetensors_bytes(perturbed(SMALL), {"task": "t"})
    # Execute
    config, metadata = check_edge_weights(blob, expected=SMALL)
    entries = inspect_safetensors(blob)
    # Assert
    assert config == SMALL and metadata["task"] == "t"
    assert entries["head.weight"].dtype == "F32" and entries["head.weight"].shape == (3, 32)
    assert {name: e.shape for name, e in entries.items()} == state_shapes(SMALL)


def test_save_rejects_bad_metadata():
    model = perturbed(SMALL)
    with pytest.raises(InvalidArgumentError, match="strings to strings"):
        to_safetensors_bytes(model, {"epochs": 3})  # type: ignore[dict-item]
    with pytest.raises(InvalidArgumentError, match="disagrees"):
        to_safetensors_bytes(model, {CONFIG_METADATA_KEY: VIT_B16.to_json()})


def test_spec_module_imports_neither_torch_nor_numpy():
    # The registry checks weights with it and has no torch; a stray import would break it only there.
    code = "import sys, services.common.wire.edge_spec; print(sorted({'torch', 'numpy', 'safetensors'} & set(sys.modules)))"
    # Execute
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Assert
    assert result.stdout.strip() == "[]"


# --- config validation and (de)serialisation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rank": 6, "heads": 4}, "not divisible by heads"),
        ({"num_classes": 1}, "at least 2"),
        ({"pooling": "max"}, "pooling must be one of"),
        ({"dims": 0}, r"dims must be in \[1, 8192\]"),
        ({"tokens": -1}, "tokens must be in"),
        ({"num_blocks": True}, "must be an integer"),
        ({"rank": 16.0}, "must be an integer"),
        ({"rank": 64}, "exceeds dims 32"),
        ({"heads": 16}, r"heads must be in \[1, 8\]"),
        ({"dims": 8192, "rank": 1024, "num_blocks": 64}, "over the limit"),
    ],
)
def test_bad_configs_are_invalid_argument(changes, message):
    with pytest.raises(InvalidArgumentError, match=message):
        dataclasses.replace(SMALL, **changes)


def test_proto_round_trip_and_zero_fields_mean_defaults():
    # Prepare
    sparse = feature_pb2.EdgeNetworkConfig(dims=768, tokens=197, num_classes=10)
    # Execute
    from_sparse = EdgeNetworkConfig.from_proto(sparse)
    round_trip = EdgeNetworkConfig.from_proto(SMALL.to_proto())
    # Assert
    assert from_sparse == VIT_B16
    assert (from_sparse.num_blocks, from_sparse.rank, from_sparse.heads, from_sparse.pooling) == (4, 16, 1, "cls")
    assert round_trip == SMALL
    assert SMALL.to_proto().heads == 2 and SMALL.to_proto().pooling == "cls"


def test_proto_geometry_can_be_derived_but_not_contradicted():
    # Prepare: a TuneSpec's edge config names only hyperparameters
    spec_edge = feature_pb2.EdgeNetworkConfig(rank=8, heads=2, pooling="mean")
    # Execute
    config = EdgeNetworkConfig.from_proto(spec_edge, dims=32, tokens=5, num_classes=3)
    # Assert
    assert config == dataclasses.replace(SMALL, num_blocks=4, pooling="mean")
    with pytest.raises(InvalidArgumentError, match="dims is 64 in the request but 32 here"):
        EdgeNetworkConfig.from_proto(feature_pb2.EdgeNetworkConfig(dims=64), dims=32, tokens=5, num_classes=3)
    with pytest.raises(InvalidArgumentError, match="dims must be in"):
        EdgeNetworkConfig.from_proto(spec_edge)


def test_dict_and_json_round_trip_strictly():
    # Prepare
    data = SMALL.to_dict()
    # Execute / Assert
    assert data == {"dims": 32, "tokens": 5, "num_classes": 3, "num_blocks": 2, "rank": 8, "heads": 2, "pooling": "cls"}
    assert EdgeNetworkConfig.from_dict(data) == SMALL
    assert EdgeNetworkConfig.from_json(SMALL.to_json()) == SMALL
    assert EdgeNetworkConfig.from_dict({"dims": 768, "tokens": 197, "num_classes": 10}) == VIT_B16
    with pytest.raises(InvalidArgumentError, match=r"unknown edge network config keys: \['depth'\]"):
        EdgeNetworkConfig.from_dict({**data, "depth": 3})
    with pytest.raises(InvalidArgumentError, match=r"lacks required keys: \['tokens'\]"):
        EdgeNetworkConfig.from_dict({"dims": 32, "num_classes": 3})
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        EdgeNetworkConfig.from_json("{dims: 32")
    with pytest.raises(InvalidArgumentError, match="must be a mapping"):
        EdgeNetworkConfig.from_json("[32, 5, 3]")


_HASH_SCRIPT = """
import hashlib, torch
from services.common.wire.edge_spec import EdgeNetworkConfig
from services.tuner.edge_network import EdgeNetwork, to_safetensors_bytes
torch.manual_seed(0)
model = EdgeNetwork(EdgeNetworkConfig(dims=16, tokens=5, num_classes=3, rank=4))
meta = {f"key{i}": str(i) for i in range(12)}
print(hashlib.sha256(to_safetensors_bytes(model, meta)).hexdigest())
"""


def test_equal_weights_serialise_to_equal_bytes_in_every_process():
    # Prepare / Execute: safetensors orders metadata by a per-process hash seed; three fresh interpreters
    digests = {
        subprocess.run([sys.executable, "-c", _HASH_SCRIPT], capture_output=True, text=True, check=True).stdout
        for _ in range(3)
    }

    # Assert: one digest, and the file still loads
    assert len(digests) == 1


# --- the token readout ---------------------------------------------------------------------------------------


def test_a_new_task_gets_the_token_readout_and_an_existing_one_keeps_its_head():
    from services.common.clients.extractor import BackboneInfo
    from services.common.wire.gather_modes import BackboneId
    from services.tuner.options import TuneOptions
    from services.tuner.tune import resolve_edge_config

    def info(prefix: int) -> BackboneInfo:
        return BackboneInfo(backbone=BackboneId("vit", "random-0"), num_blocks=4, tokens=17, dims=32,
                            num_prefix_tokens=prefix, pretrained=False, warning="", data_config=None, baselines={},
                            max_image_bytes=1, max_image_pixels=1)  # fmt: skip

    options = TuneOptions(task="t")
    assert resolve_edge_config(None, info(1), ["a", "b"], options).pooling == "cls+tokens"
    assert resolve_edge_config(None, info(0), ["a", "b"], options).pooling == "mean+tokens"
    paper = dataclasses.replace(options, pooling="cls")
    assert resolve_edge_config(None, info(1), ["a", "b"], paper).pooling == "cls"


def test_the_readout_starts_silent_and_its_dropout_acts_only_while_training():
    config = dataclasses.replace(SMALL, pooling="cls+tokens")
    torch.manual_seed(0)
    fresh = EdgeNetwork(config, readout_dropout=0.5)
    plain = EdgeNetwork(dataclasses.replace(SMALL, pooling="cls"))
    plain.load_state_dict({k: v for k, v in fresh.state_dict().items() if not k.startswith("readout.")})
    x = torch.randn(4, SMALL.tokens, SMALL.dims)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), plain.eval()(x))  # a zero readout adds nothing
        nn.init.normal_(fresh.readout.head.weight)
        assert torch.equal(fresh.eval()(x), fresh.eval()(x))  # eval: no dropout, deterministic
        torch.manual_seed(1)
        first = fresh.train()(x)
        torch.manual_seed(2)
        assert not torch.equal(first, fresh.train()(x))  # training: dropout on the readout's inputs


def test_cls_configs_serialise_as_before_and_the_readout_counts_in_parameters_and_macs():
    cls_config = EdgeNetworkConfig(dims=768, tokens=197, num_classes=10)
    readout = dataclasses.replace(cls_config, pooling="cls+tokens")
    assert cls_config.to_json() == (
        '{"dims":768,"heads":1,"num_blocks":4,"num_classes":10,"pooling":"cls","rank":16,"tokens":197}'
    )
    assert trainable_parameters(readout) - trainable_parameters(cls_config) == 395 * 10 + 1538
    assert macs_per_image(readout) - macs_per_image(cls_config) == 197 * 768 * 2 + 197 * 2 * 10
    with pytest.raises(InvalidArgumentError, match="pooling must be one of"):
        dataclasses.replace(cls_config, pooling="tokens")
