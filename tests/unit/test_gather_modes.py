"""Gather modes, geometry, k candidates and the paper's transfer sizes (services.common.wire.gather_modes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.errors import InvalidArgumentError
from services.common.pb import feature_pb2
from services.common.wire.gather_modes import (
    BASELINE_MODES,
    GATHER_MODES,
    HIERARCHICAL_MODES,
    VIT_B16,
    VIT_MODES,
    BackboneGeometry,
    StageShape,
    baseline_bytes_per_image,
    candidate_ks,
    feature_shape,
    float32_bytes_per_image,
    last_block_indices,
    mode_from_proto,
    mode_to_proto,
    validate_ks,
)

MIB = 2**20
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_modes_and_proto_values_round_trip():
    # Prepare
    expected = {
        "mist": feature_pb2.GATHER_MODE_MIST,
        "lst": feature_pb2.GATHER_MODE_LST,
        "last": feature_pb2.GATHER_MODE_LAST,
        "partial": feature_pb2.GATHER_MODE_PARTIAL,
        "cls": feature_pb2.GATHER_MODE_CLS,
        "stages": feature_pb2.GATHER_MODE_STAGES,
        "last_stage": feature_pb2.GATHER_MODE_LAST_STAGE,
    }

    # Execute
    to_proto = {mode: mode_to_proto(mode) for mode in GATHER_MODES}
    back = {value: mode_from_proto(value) for value in to_proto.values()}

    # Assert
    assert GATHER_MODES == ("mist", "lst", "last", "partial", "cls", "stages", "last_stage")
    assert to_proto == expected
    assert to_proto == {"mist": 1, "lst": 2, "last": 3, "partial": 4, "cls": 5, "stages": 6, "last_stage": 7}
    assert back == {value: mode for mode, value in expected.items()}


def test_unspecified_proto_mode_means_mist():
    assert mode_from_proto(feature_pb2.GATHER_MODE_UNSPECIFIED) == "mist"


@pytest.mark.parametrize("value", [8, -1, 99, None])
def test_unknown_proto_mode_is_invalid_argument(value):
    with pytest.raises(InvalidArgumentError, match="unknown GatherMode"):
        mode_from_proto(value)


@pytest.mark.parametrize("name", ["MIST", "lora", "", "unspecified"])
def test_unknown_mode_name_is_invalid_argument(name):
    with pytest.raises(InvalidArgumentError, match="mist, lst, last, partial, cls"):
        mode_to_proto(name)


@pytest.mark.parametrize(
    ("num_blocks", "expected"),
    [(12, [2, 4, 6, 8, 10, 12]), (1, [1]), (2, [2]), (3, [2, 3]), (5, [2, 4, 5]), (4, [2, 4])],
)
def test_last_block_indices_pairs_blocks_and_always_ends_at_n(num_blocks, expected):
    assert last_block_indices(num_blocks) == expected


@pytest.mark.parametrize("num_blocks", [0, -3, 2.0, True])
def test_last_block_indices_rejects_non_positive_depth(num_blocks):
    with pytest.raises(InvalidArgumentError, match="num_blocks"):
        last_block_indices(num_blocks)


def test_feature_shapes_for_vit_b16():
    shapes = {mode: feature_shape(VIT_B16, mode) for mode in VIT_MODES}

    assert shapes == {
        "mist": (197, 768),
        "lst": (13, 197, 768),
        "last": (7, 197, 768),
        "partial": (197, 768),
        "cls": (768,),
    }


def test_feature_shape_last_for_odd_depth_counts_the_lone_last_block():
    geometry = BackboneGeometry(num_blocks=5, tokens=17, dims=32, num_prefix_tokens=1)

    shape = feature_shape(geometry, "last")

    assert shape == (4, 17, 32)  # x_0, x_2, x_4, x_5


def test_feature_shape_checks_k():
    assert feature_shape(VIT_B16, "mist", k=12) == (197, 768)
    assert feature_shape(VIT_B16, "partial", k=0) == (197, 768)
    with pytest.raises(InvalidArgumentError, match=r"\[1, 12\]"):
        feature_shape(VIT_B16, "mist", k=13)
    with pytest.raises(InvalidArgumentError, match="takes no k"):
        feature_shape(VIT_B16, "lst", k=3)
    with pytest.raises(InvalidArgumentError, match="unknown gather mode"):
        feature_shape(VIT_B16, "lora")


def test_vit_b16_bytes_match_the_paper_table():
    # Execute
    sizes = baseline_bytes_per_image(VIT_B16)

    # Assert: exact bytes, then the paper's MiB figures (bytes / 2**20, 3 decimals).
    assert sizes == {
        "lst": 13 * 605_184,
        "last": 7 * 605_184,
        "partial": 605_184,
        "cls": 3_072,
        "mist_f32": 605_184,
    }
    assert sizes["lst"] == 7_867_392 and sizes["last"] == 4_236_288
    mib = {name: round(size / MIB, 3) for name, size in sizes.items()}
    assert mib == {"lst": 7.503, "last": 4.040, "partial": 0.577, "cls": 0.003, "mist_f32": 0.577}


def test_float32_bytes_per_image_of_a_tiny_backbone():
    geometry = BackboneGeometry(num_blocks=3, tokens=17, dims=32, num_prefix_tokens=1)

    sizes = {mode: float32_bytes_per_image(geometry, mode) for mode in VIT_MODES}

    assert sizes == {"mist": 2176, "lst": 4 * 2176, "last": 3 * 2176, "partial": 2176, "cls": 128}


@pytest.mark.parametrize(
    ("num_blocks", "expected"),
    [
        (12, [3, 6, 9, 12]),
        (4, [1, 2, 3, 4]),
        (1, [1]),
        (2, [1, 2]),
        (3, [1, 2, 3]),
        (6, [2, 3, 5, 6]),
        (24, [6, 12, 18, 24]),
    ],
)
def test_candidate_ks(num_blocks, expected):
    assert candidate_ks(num_blocks) == expected


@given(st.integers(min_value=1, max_value=200))
def test_candidate_ks_are_valid_ascending_and_end_at_depth(num_blocks):
    ks = candidate_ks(num_blocks)

    assert ks == sorted(set(ks))
    assert 1 <= len(ks) <= 4
    assert ks[0] >= 1 and ks[-1] == num_blocks
    assert validate_ks(ks, num_blocks) == tuple(ks)


def test_validate_ks_drops_duplicates_and_keeps_order():
    assert validate_ks([9, 3, 9, 12, 3], 12) == (9, 3, 12)
    assert validate_ks(range(1, 5), 4) == (1, 2, 3, 4)


@pytest.mark.parametrize("ks", [[0], [13], [3, 13], [-1], [2.0], [True], ["3"]])
def test_validate_ks_out_of_range_names_the_range(ks):
    with pytest.raises(InvalidArgumentError, match=r"k must be an integer in \[1, 12\]"):
        validate_ks(ks, 12)


@pytest.mark.parametrize("ks", [[], (), "12"])
def test_validate_ks_needs_at_least_one_k(ks):
    with pytest.raises(InvalidArgumentError, match=r"\[1, 12\]"):
        validate_ks(ks, 12)


def test_module_imports_neither_torch_nor_numpy():
    # Prepare: a fresh interpreter, since this test process may have imported torch already.
    code = "import sys, services.common.wire.gather_modes; print(sorted({'torch', 'numpy'} & set(sys.modules)))"

    # Execute
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)

    # Assert
    assert result.stdout.strip() == "[]"


# pvt_v2_b0 at 512 px: stage grids 128, 64, 32, 16 with 32, 64, 160, 256 dims.
PVT_V2_B0_512 = BackboneGeometry.hierarchical(
    StageShape(side * side, dims, side, side) for side, dims in ((128, 32), (64, 64), (32, 160), (16, 256))
)


def test_a_hierarchical_geometry_is_its_last_stage_with_s_as_depth():
    geometry = PVT_V2_B0_512

    assert (geometry.num_blocks, geometry.tokens, geometry.dims, geometry.num_prefix_tokens) == (4, 256, 256, 0)
    assert geometry.architecture == "hierarchical" and VIT_B16.architecture == "vit"
    assert geometry.modes == HIERARCHICAL_MODES == ("mist", "stages", "last_stage")


def test_hierarchical_shapes_per_stage():
    geometry = PVT_V2_B0_512

    assert [feature_shape(geometry, "mist", s) for s in (1, 2, 3, 4)] == [(16384, 32), (4096, 64), (1024, 160),
                                                                          (256, 256)]  # fmt: skip
    assert feature_shape(geometry, "mist") == feature_shape(geometry, "last_stage") == (256, 256)
    assert feature_shape(geometry, "stages", 2) == (4096, 64)
    with pytest.raises(InvalidArgumentError, match=r"k must be an integer in \[1, 4\] for a backbone with 4 stages"):
        feature_shape(geometry, "mist", 5)
    with pytest.raises(InvalidArgumentError, match="one tensor per stage"):
        feature_shape(geometry, "stages")
    with pytest.raises(InvalidArgumentError, match="takes no k"):
        feature_shape(geometry, "last_stage", 2)


@pytest.mark.parametrize("mode", BASELINE_MODES)
def test_vit_baselines_are_refused_on_a_hierarchical_backbone(mode):
    with pytest.raises(InvalidArgumentError, match="not served on a hierarchical backbone.*mist, stages, last_stage"):
        feature_shape(PVT_V2_B0_512, mode)


@pytest.mark.parametrize("mode", ["stages", "last_stage"])
def test_hierarchical_modes_are_refused_on_a_vit(mode):
    with pytest.raises(InvalidArgumentError, match="not served on a vit backbone; this backbone serves mist, lst"):
        feature_shape(VIT_B16, mode, 1 if mode == "stages" else None)


def test_hierarchical_baselines_at_512_px():
    assert baseline_bytes_per_image(PVT_V2_B0_512) == {
        "stages": 4_063_232,  # 4 * (16384 * 32 + 4096 * 64 + 1024 * 160 + 256 * 256)
        "last_stage": 262_144,
        "mist_f32": 262_144,
    }
    assert set(baseline_bytes_per_image(VIT_B16)) == {"lst", "last", "partial", "cls", "mist_f32"}
