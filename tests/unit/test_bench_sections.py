"""Benchmark sections 2 (codec cost in accuracy) and 5 (edge memory and speed), run on tiny sizes.

The same code paths as `make bench`: a tiny random-init ViT instead of ViT-B, a few images, the probes in the
current interpreter instead of the CPU-only edge venv (creating that one takes a pip install).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench import accuracy, edge, edge_probe
from services.common.errors import InvalidArgumentError
from services.common.wire.codec import DEFAULT_CODEC
from services.common.wire.edge_spec import EdgeNetworkConfig, macs_per_image, parameter_breakdown
from services.tuner.synthetic import SplitSizes
from tests.conftest import TINY_VIT_KWARGS

MB, MIB = 1_000_000, 1 << 20
TINY_ACCURACY = accuracy.AccuracyConfig(
    model_kwargs=TINY_VIT_KWARGS,
    classes=4,
    sizes=SplitSizes(train=6, val=3, test=6),
    codecs=("f32-zstd", "f16-zstd", "i8-zstd"),
    seeds=(0, 1),
    epochs=2,
)
TINY_EDGE = edge.EdgeConfig(
    backbone="vit_tiny_patch16_224",
    model_kwargs=TINY_VIT_KWARGS,
    seed_images=3,
    train_images=20,
    epochs=1,
    batch_size=8,
    predictions=3,
    environment="current",
    variants=(),  # each variant is one more probe process: a few seconds of torch import on a busy machine
)


@pytest.fixture(scope="module")
def accuracy_section(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return accuracy.run(True, tmp_path_factory.mktemp("accuracy"), config=TINY_ACCURACY)


@pytest.fixture(scope="module")
def edge_section(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return edge.run(True, tmp_path_factory.mktemp("edge"), config=TINY_EDGE)


# ------------------------------------------------------------------------------------------ accuracy


def test_accuracy_rows_cover_the_reference_and_every_codec(accuracy_section: dict) -> None:
    # Prepare / Execute: the module fixture ran the whole section once.
    rows = {row["codec"]: row for row in accuracy_section["rows"]}

    # Assert: f32-none comes first as the reference, then the codecs asked for, each with the documented keys.
    assert list(rows) == ["f32-none", "f32-zstd", "f16-zstd", "i8-zstd"]
    for row in rows.values():
        assert {"codec", "mean", "std", "seeds", "paired_delta_mean", "paired_delta_std",
                "f32_model_on_codec_features"} <= set(row)  # fmt: skip
        assert row["seeds"] == 2 and len(row["accuracies"]) == 2
        assert all(
            0.0 <= value <= 1.0 for value in (*row["accuracies"], row["mean"], row["f32_model_on_codec_features"])
        )
        assert row["std"] >= 0.0 and row["paired_delta_std"] >= 0.0
        assert row["paired_delta_min"] <= row["paired_delta_mean"] <= row["paired_delta_max"]
    assert [row["codec"] for row in accuracy_section["rows"] if row["is_default"]] == [DEFAULT_CODEC.name]


def test_accuracy_pairs_lossless_codecs_exactly_with_float32(accuracy_section: dict) -> None:
    rows = {row["codec"]: row for row in accuracy_section["rows"]}

    # Assert: lossless f32-zstd decodes to the same bytes, so its runs are the reference's, delta exactly 0.
    assert rows["f32-zstd"]["same_features_as"] == "f32-none"
    assert rows["f32-zstd"]["accuracies"] == rows["f32-none"]["accuracies"]
    assert rows["f32-none"]["paired_delta_mean"] == 0.0 and rows["f32-none"]["f32_model_agreement"] == 1.0
    assert rows["f32-none"]["feature_relative_error"] == 0.0
    # The codecs' own error on the features: f16 rounding far below i8 quantisation (MIST.md: 0.02 % vs 0.6 %).
    assert 0.0 < rows["f16-zstd"]["feature_relative_error"] < 1e-3
    assert 1e-3 < rows["i8-zstd"]["feature_relative_error"] < 2e-2
    assert (
        rows["i8-zstd"]["bytes_per_image"] < rows["f16-zstd"]["bytes_per_image"] < rows["f32-none"]["bytes_per_image"]
    )
    delta = [a - b for a, b in zip(rows["i8-zstd"]["accuracies"], rows["f32-none"]["accuracies"], strict=True)]
    assert rows["i8-zstd"]["paired_delta_mean"] == pytest.approx(sum(delta) / 2)


def test_accuracy_section_states_backbone_dataset_and_target(accuracy_section: dict) -> None:
    # Assert: 4 classes x 6/3/6 images, the tiny ViT described, the target judged on the default codec.
    assert accuracy_section["dataset"] == {"classes": 4, "train": 24, "val": 12, "test": 24, "seed": 0}
    assert "random init" in accuracy_section["backbone"] and "T=17, D=32" in accuracy_section["backbone"]
    assert accuracy_section["epochs"] == 2 and accuracy_section["seed_values"] == [0, 1]
    default = next(row for row in accuracy_section["rows"] if row["is_default"])
    (target,) = accuracy_section["targets"]
    assert target["passed"] == (default["paired_delta_mean"] >= -0.005)
    assert target["target"] == ">= -0.5 points" and "2 seeds" in target["name"]


def test_accuracy_markdown_has_a_row_per_codec(accuracy_section: dict) -> None:
    # Execute
    text = accuracy.markdown(accuracy_section)

    # Assert: one table row per codec, the default codec in bold, shared runs named, the method stated.
    assert sum(line.startswith("| ") and "KiB/img" not in line for line in text.splitlines()) == 4
    assert f"| **{DEFAULT_CODEC.name}** |" in text and "| f32-zstd (= f32-none) |" in text
    assert "*Method.*" in text


def test_plots_write_one_png_per_section(accuracy_section: dict, edge_section: dict, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")

    # Execute
    written = [*accuracy.plots(accuracy_section, tmp_path), *edge.plots(edge_section, tmp_path)]

    # Assert: real PNG files where the harness expects them.
    assert [path.name for path in written] == ["accuracy_codecs.png", "edge_memory.png"]
    assert all(path.parent == tmp_path and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in written)


@pytest.mark.parametrize(
    "overrides",
    [{"codecs": ("i9-zstd",)}, {"seeds": ()}, {"seeds": (3, 3)}, {"epochs": 0}, {"classes": 9}, {"classes": True}],
)
def test_accuracy_config_rejects_bad_settings(overrides: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        replace(TINY_ACCURACY, **overrides)


# ------------------------------------------------------------------------------------------------ edge


def test_edge_section_has_the_documented_figures(edge_section: dict) -> None:
    # Assert: every key bench/README.md documents, with sane values for a 17 x 32 tiny-ViT run.
    for key in ("finetune_peak_rss_bytes", "predict_peak_rss_bytes", "import_torch_rss_bytes", "trainable_params",
                "macs_per_image", "epoch_seconds", "images_per_second", "predict_ms_per_image", "torch_version",
                "target_bytes", "targets", "paper", "environment", "method"):  # fmt: skip
        assert key in edge_section, key
    assert (edge_section["tokens"], edge_section["dims"], edge_section["num_classes"]) == (17, 32, 3)
    assert edge_section["environment_kind"] == "current" and "CURRENT interpreter" in edge_section["environment"]
    assert edge_section["timm_imported"] is False
    assert (
        edge_section["train_images"] == 20
        and edge_section["epochs"] == 1
        and len(edge_section["epoch_seconds_each"]) == 1
    )
    assert edge_section["epoch_seconds"] > 0 and edge_section["images_per_second"] > 0
    assert edge_section["predict_ms_per_image"] > 0 and edge_section["predictions"] == 3
    assert edge_section["paper"]["finetune_peak_rss_bytes"] == 663 * MB
    assert edge_section["target_bytes"] == {"finetune_peak_rss_bytes": 500 * MB, "predict_peak_rss_bytes": 255 * MB}


def test_edge_memory_figures_are_ordered_and_the_probe_own(edge_section: dict) -> None:
    # Assert: torch alone weighs tens of MB; each job adds to it; nothing near the parent's ViT + pytest heap.
    baseline = edge_section["import_torch_rss_bytes"]
    assert 50 * MIB < baseline < 1500 * MIB
    assert edge_section["finetune_rss_after_imports_bytes"] <= edge_section["finetune_rss_after_store_bytes"]
    assert edge_section["finetune_rss_after_store_bytes"] <= edge_section["finetune_peak_rss_bytes"]
    assert baseline < edge_section["finetune_peak_rss_bytes"] < baseline + 300 * MIB
    assert baseline < edge_section["predict_peak_rss_bytes"] <= edge_section["predict_cli_imports_peak_rss_bytes"]
    # The harness's target rows: name, target, measured, passed, judged on the same bytes.
    fine_tune, predict = edge_section["targets"]
    assert fine_tune["target"] == "<= 500 MB" and fine_tune["passed"] == (
        edge_section["finetune_peak_rss_bytes"] <= 500 * MB
    )
    assert predict["measured"] == f"{edge_section['predict_peak_rss_bytes'] / MB:.1f} MB"


def test_edge_parameters_and_macs_match_the_spec_and_the_module(edge_section: dict) -> None:
    config = EdgeNetworkConfig(dims=32, tokens=17, num_classes=3)

    # Assert: edge_spec's formulas, and the real module trained in the probe counts the same parameters.
    assert edge_section["trainable_params"] == parameter_breakdown(config).total == edge_section["module_params"]
    assert (
        edge_section["trainable_params_blocks"] + edge_section["trainable_params_head"]
        == edge_section["trainable_params"]
    )
    assert edge_section["macs_per_image"] == macs_per_image(config)


def test_edge_markdown_tables_measured_target_and_paper(edge_section: dict) -> None:
    # Prepare: the section plus one variant row as _variant reports it.
    variant = {"name": "one torch thread", "env": {}, "threads": 1, "finetune_peak_rss_bytes": 300 * MB,
               "epoch_seconds": 1.5, "predict_peak_rss_bytes": 250 * MB, "predict_ms_per_image": 2.5}  # fmt: skip

    # Execute
    text = edge.markdown(dict(edge_section, variants=[variant]))

    # Assert: the table shows measured figures next to target and paper, then the settings tried, then the method.
    assert "| fine-tune peak RSS |" in text and "| 663 MB |" in text and "| 0.38 M |" in text
    assert "| one torch thread | 1 | 300.0 MB (286.1 MiB) | 1.5 s | 250.0 MB (238.4 MiB) | 2.5 ms |" in text
    assert "other settings" not in edge.markdown(edge_section) and "*Method.*" in text


def test_edge_markdown_says_missed_when_over_target(edge_section: dict) -> None:
    # Prepare: the same section with a fine-tune peak 1 byte over its 500 MB target.
    over = dict(edge_section, finetune_peak_rss_bytes=500 * MB + 1)

    # Execute
    row = edge.markdown(over).split("| fine-tune peak RSS |")[1].splitlines()[0]

    # Assert
    assert "<= 500 MB: MISSED" in row and "500.0 MB" in row


def test_edge_falls_back_loudly_when_the_edge_venv_cannot_be_made(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: no venv present and creating one fails.
    monkeypatch.setattr(edge, "_edge_venv_ready", lambda python: False)

    def refuse(python: Path) -> None:
        raise RuntimeError("pip said no")

    monkeypatch.setattr(edge, "_create_edge_venv", refuse)

    # Execute
    environment = edge.ensure_environment("edge-venv")

    # Assert
    assert environment.kind == "current" and environment.python == sys.executable
    assert environment.note.startswith("FALLBACK") and "pip said no" in environment.note


def test_edge_probe_failure_raises_with_its_stderr() -> None:
    # An unknown mode fails in argparse, before the probe pays for importing torch.
    with pytest.raises(RuntimeError, match=r"(?s)probe teleport failed \(exit 2\).*invalid choice"):
        edge.run_probe(sys.executable, "teleport")


@pytest.mark.parametrize(
    "overrides",
    [{"seed_images": 1}, {"train_images": 0}, {"epochs": 0}, {"codec": "i7"}, {"environment": "cloud"}],
)
def test_edge_config_rejects_bad_settings(overrides: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        replace(TINY_EDGE, **overrides)


# ------------------------------------------------------------------------------------------ probe file


def test_probe_reads_framed_records_and_rejects_broken_files(tmp_path: Path) -> None:
    # Prepare: two good records; a file cut inside a body; a header claiming 1 GiB.
    good = tmp_path / "good.bin"
    good.write_bytes(struct.pack("<Q", 3) + b"abc" + struct.pack("<Q", 0))
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(struct.pack("<Q", 10) + b"abc")
    huge = tmp_path / "huge.bin"
    huge.write_bytes(struct.pack("<Q", 1 << 30))

    # Execute / Assert
    assert list(edge_probe.read_records(good)) == [b"abc", b""]
    with pytest.raises(ValueError, match="truncated record body"):
        list(edge_probe.read_records(truncated))
    with pytest.raises(ValueError, match="exceeds"):
        list(edge_probe.read_records(huge))
