"""The transfer table: every figure comes from encoding real gathered features."""

from __future__ import annotations

import json

import pytest

from services.common.wire.codec import ALL_CODECS
from services.common.wire.gather_modes import baseline_bytes_per_image
from services.extractor.backbone import load_backbone
from services.extractor.transfer import main, measure_transfer, synthetic_png_images
from tests.conftest import TINY_VIT_KWARGS


@pytest.fixture(scope="module")
def tiny_backbone():
    return load_backbone("vit_tiny_patch16_224", model_kwargs=TINY_VIT_KWARGS)


def test_every_mode_and_codec_is_measured_on_real_messages(tiny_backbone):
    # Prepare
    images = synthetic_png_images(3, size=32)
    baselines = baseline_bytes_per_image(tiny_backbone.geometry)

    # Execute
    rows = measure_transfer(tiny_backbone, images)

    # Assert: 5 modes x 7 codecs; float32 rows cost the float32 bytes plus a small header
    assert len(rows) == 5 * len(ALL_CODECS)
    by_cell = {(row.method, row.codec): row for row in rows}
    for method, key in (("mist", "mist_f32"), ("lst", "lst"), ("last", "last"), ("partial", "partial"), ("cls", "cls")):
        raw = by_cell[(method, "f32-none")]
        assert raw.float32_bytes_per_image == baselines[key]
        assert baselines[key] < raw.bytes_per_image < baselines[key] + 200
        assert raw.max_relative_error == 0.0
    default = [row for row in rows if row.is_default]
    assert [(row.method, row.codec) for row in default] == [("mist", "i8o-zstd")]
    assert (
        default[0].bytes_per_image
        < by_cell[("mist", "f16-none")].bytes_per_image
        < by_cell[("mist", "f32-none")].bytes_per_image
    )
    assert 0 < default[0].max_relative_error <= 1 / 254 + 1e-6


def test_command_line_writes_json_and_prints_both_tables(tmp_path, capsys):
    # Execute
    code = main(
        [
            "--backbone",
            "vit_tiny_patch16_224",
            "--model-kwargs",
            json.dumps(TINY_VIT_KWARGS),
            "--images",
            "2",
            "--codecs",
            "f32-none,i8-zstd",
            "--json",
            str(tmp_path / "t.json"),
        ]
    )

    # Assert
    assert code == 0
    out = capsys.readouterr().out
    assert "RANDOM-INIT" in out and "| mist | " in out and "x smaller than LST" in out
    report = json.loads((tmp_path / "t.json").read_text())
    assert {row["codec"] for row in report["transfer"]} == {"f32-none", "i8-zstd"}
    assert report["float32_baselines"]["mist_f32"] == 17 * 32 * 4


def test_command_line_refuses_zero_images():
    with pytest.raises(SystemExit) as caught:
        main(["--images", "0"])
    assert caught.value.code == 2
