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

from bench import accuracy, codec_study, edge, edge_probe
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
    device=False,  # no servers and no .venv-device in unit tests: the device rows are tested on a made-up section
)
# What measure_device adds to the section (figures made up): the markdown and verdict tests use it.
DEVICE_FIGURES = {
    "device_environment": ".venv-device (reused): '.[device]'",
    "device_environment_kind": "edge-venv",
    "device_torch_importable": False,
    "device_timm_importable": False,
    "device_torch_imported": False,
    "device_timm_imported": False,
    "device_predict_peak_rss_bytes": 60 * MB,
    "device_rss_after_imports_bytes": 40 * MB,
    "device_rss_after_load_bytes": 45 * MB,
    "device_predictions": 1000,
    "device_distinct_images": 8,
    "device_warmup_ms": [300.0] * 8,
    "device_roundtrip_ms_p50": 12.5,
    "device_roundtrip_ms_p99": 30.25,
    "device_roundtrip_ms_mean": 13.0,
    "device_edge_ms_p50": 4.5,
    "device_edge_ms_p99": 6.0,
    "device_runtime": "numpy",
    "device_load_seconds": 0.2,
    "device_labels": {"circle": 1000},
    "device_image_bytes": 100_000,
    "device_extractor": "vit_base_patch16_224 (random init), fingerprint random-0-abc",
    "device_same_backbone_as_training": True,
    "device_version": 1,
    "device_weights_metadata": {"mist.k": "12", "mist.codec": "i8-zstd"},
}


@pytest.fixture(scope="module")
def accuracy_section(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return accuracy.run(True, tmp_path_factory.mktemp("accuracy"), config=TINY_ACCURACY)


@pytest.fixture(scope="module")
def edge_section(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return edge.run(True, tmp_path_factory.mktemp("edge"), config=TINY_EDGE)


# ------------------------------------------------------------------------------------------ accuracy


def _family_rows(section: dict, family: str) -> dict[str, dict]:
    return {row["codec"]: row for row in section["rows"] if row["family"] == family}


def test_accuracy_rows_cover_the_reference_and_every_codec(accuracy_section: dict) -> None:
    # Prepare / Execute: the module fixture ran the whole section once.
    assert accuracy_section["families"] == ["plain", "outliers"]
    for family in accuracy_section["families"]:
        rows = _family_rows(accuracy_section, family)

        # Assert: f32-none first as the reference, then the codecs asked for, then the default codec.
        assert list(rows) == ["f32-none", "f32-zstd", "f16-zstd", "i8-zstd", DEFAULT_CODEC.name]
        _check_rows(rows)
    assert [row["codec"] for row in accuracy_section["rows"] if row["is_default"]] == [DEFAULT_CODEC.name] * 2


def _check_rows(rows: dict[str, dict]) -> None:
    for row in rows.values():
        assert {"codec", "mean", "std", "seeds", "paired_delta_mean", "paired_delta_std",
                "f32_model_on_codec_features"} <= set(row)  # fmt: skip
        assert row["seeds"] == 2 and len(row["accuracies"]) == 2
        assert all(
            0.0 <= value <= 1.0 for value in (*row["accuracies"], row["mean"], row["f32_model_on_codec_features"])
        )
        assert row["std"] >= 0.0 and row["paired_delta_std"] >= 0.0
        assert row["paired_delta_min"] <= row["paired_delta_mean"] <= row["paired_delta_max"]


def test_accuracy_outlier_family_starves_per_token_int8_and_not_the_default(accuracy_section: dict) -> None:
    plain, outliers = (_family_rows(accuracy_section, family) for family in ("plain", "outliers"))

    # Assert: on plain features the default decodes to exactly i8's floats (no column is an outlier there) ...
    assert plain[DEFAULT_CODEC.name]["same_features_as"] == "i8-zstd"
    # ... while the injected outliers blow up per-token int8's error on the ordinary entries, and i8o's far less
    # (the tiny ViT's 32 dims allow 2 outlier columns: the massive activations take them, hence only "less").
    assert outliers["i8-zstd"]["ordinary_relative_error"] > 5 * plain["i8-zstd"]["ordinary_relative_error"]
    assert outliers[DEFAULT_CODEC.name]["ordinary_relative_error"] < outliers["i8-zstd"]["ordinary_relative_error"]
    assert outliers["f32-zstd"]["ordinary_relative_error"] == 0.0
    assert accuracy_section["outliers"]["high_norm_tokens_per_image"] == 1


def test_accuracy_pairs_lossless_codecs_exactly_with_float32(accuracy_section: dict) -> None:
    rows = _family_rows(accuracy_section, "plain")

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
    targets = accuracy_section["targets"]
    assert len(targets) == 4  # accuracy and agreement, on each family
    for family, (delta, agreement) in zip(("plain", "outliers"), (targets[0:2], targets[2:4]), strict=True):
        default = _family_rows(accuracy_section, family)[DEFAULT_CODEC.name]
        assert delta["passed"] == (default["paired_delta_mean"] >= -0.005)
        assert delta["target"] == ">= -0.5 points" and "2 seeds" in delta["name"] and family in delta["name"]
        assert agreement["passed"] == (default["f32_model_agreement"] >= 0.99) and family in agreement["name"]


def test_accuracy_markdown_has_a_row_per_codec(accuracy_section: dict) -> None:
    # Execute
    text = accuracy.markdown(accuracy_section)

    # Assert: one table row per codec, the default codec in bold, shared runs named, the method stated.
    tables, candidates = text.split("**Candidate schemes**")
    assert sum(line.startswith("| ") and "KiB/img" not in line for line in tables.splitlines()) == 10
    assert sum(line.startswith("| ") for line in candidates.splitlines()) == 1 + len(codec_study.CANDIDATES)
    assert "**plain features**" in text and "**outliers features**" in text
    assert f"| **{DEFAULT_CODEC.name}**" in text and "| f32-zstd (= f32-none) |" in text
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
    assert edge_section["target_bytes"] == {
        "finetune_peak_rss_bytes": 350 * MB,
        "predict_peak_rss_bytes": 255 * MB,
        "device_predict_peak_rss_bytes": 80 * MB,
    }
    assert edge_section["target_runtime_ratio"] == 1.5
    assert "device_predict_peak_rss_bytes" not in edge_section and "EdgeConfig.device" in edge_section["device_skipped"]


def test_edge_runtimes_are_both_measured_and_compared(edge_section: dict) -> None:
    # Assert: both runtimes timed on the same weights and features; the numpy one loaded no torch.
    p50 = edge_section["edge_ms_p50"]
    assert p50["torch"] > 0 and p50["numpy"] > 0
    assert edge_section["runtime_ratio"] == pytest.approx(p50["numpy"] / p50["torch"])
    assert edge_section["predict_numpy_torch_imported"] is False
    assert edge_section["predict_numpy_peak_rss_bytes"] < edge_section["predict_peak_rss_bytes"]
    ratio_row = edge_section["targets"][-1]
    assert ratio_row["target"] == "<= 1.5x" and ratio_row["passed"] == (edge_section["runtime_ratio"] <= 1.5)


def test_edge_memory_figures_are_ordered_and_the_probe_own(edge_section: dict) -> None:
    # Assert: torch alone weighs tens of MB; each job adds to it; nothing near the parent's ViT + pytest heap.
    baseline = edge_section["import_torch_rss_bytes"]
    assert 50 * MIB < baseline < 1500 * MIB
    assert edge_section["finetune_rss_after_imports_bytes"] <= edge_section["finetune_rss_after_store_bytes"]
    assert edge_section["finetune_rss_after_store_bytes"] <= edge_section["finetune_peak_rss_bytes"]
    assert baseline < edge_section["finetune_peak_rss_bytes"] < baseline + 300 * MIB
    assert baseline < edge_section["predict_peak_rss_bytes"] <= edge_section["predict_cli_imports_peak_rss_bytes"]
    # The harness's target rows: name, target, measured, passed, judged on the same bytes.
    fine_tune, predict, _ratio = edge_section["targets"]  # no device row: the device run was not asked for
    assert fine_tune["target"] == "<= 350 MB" and fine_tune["passed"] == (
        edge_section["finetune_peak_rss_bytes"] <= 350 * MB
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
    # Prepare: the same section with a fine-tune peak 1 byte over its 350 MB target.
    over = dict(edge_section, finetune_peak_rss_bytes=350 * MB + 1)

    # Execute
    row = edge.markdown(over).split("| fine-tune peak RSS |")[1].splitlines()[0]

    # Assert
    assert "<= 350 MB: MISSED" in row and "350.0 MB" in row


def test_edge_markdown_without_device_run_says_skipped(edge_section: dict) -> None:
    text = edge.markdown(edge_section)

    # Assert: the reason is given, no device row, the runtime ratio row is judged.
    assert "Device run (torch-free venv through a real extractor): skipped (not asked for" in text
    assert "| device predict peak RSS" not in text
    assert "| edge network per image, numpy runtime (p50) |" in text and "<= 1.5x: " in text


@pytest.mark.parametrize(("peak", "verdict"), [(80 * MB, "met"), (80 * MB + 1, "MISSED")])
def test_edge_device_rows_and_verdict(edge_section: dict, peak: int, verdict: str) -> None:
    # Prepare: the section as a device run would complete it, the peak at and 1 byte over 80 MB.
    section = {**edge_section, **DEVICE_FIGURES, "device_predict_peak_rss_bytes": peak}
    section["targets"] = edge.targets(section)

    # Execute
    text = edge.markdown(section)
    row = text.split("| device predict peak RSS (`.venv-device`, numpy runtime, 1,000 images through the extractor) |")[
        1
    ]

    # Assert: the table row with its verdict, the paragraph with the conditions, the harness's target row.
    assert f"<= 80 MB: {verdict}" in row.splitlines()[0]
    assert "| device round trip per image (p50 / p99 of 1,000) | 12.5 / 30.2 ms |" in text
    assert "| device edge network per image (p50 / p99) | 4.50 / 6.00 ms |" in text
    assert "torch/timm in sys.modules after the run: neither loaded" in text and "8 distinct synthetic PNGs" in text
    device_row = next(row for row in section["targets"] if row["name"].startswith("device predict peak RSS"))
    assert device_row["passed"] is (verdict == "met") and device_row["target"] == "<= 80 MB"
    assert "1,000 images" in device_row["name"]


def test_edge_device_markdown_shouts_when_torch_was_loaded(edge_section: dict) -> None:
    section = {**edge_section, **DEVICE_FIGURES, "device_torch_imported": True}

    assert "torch/timm in sys.modules after the run: LOADED: torch" in edge.markdown(section)


@pytest.mark.parametrize(("numpy_ms", "verdict", "passed"), [(3.0, "met", True), (3.02, "MISSED", False)])
def test_edge_runtime_ratio_verdict(edge_section: dict, numpy_ms: float, passed: bool, verdict: str) -> None:
    # Prepare: torch 2 ms; numpy at exactly 1.5x, then just over.
    section = dict(edge_section, edge_ms_p50={"torch": 2.0, "numpy": numpy_ms}, runtime_ratio=numpy_ms / 2.0)

    # Execute
    rows = edge.targets(section)
    text = edge.markdown(section)

    # Assert
    assert rows[-1]["passed"] is passed and rows[-1]["measured"] == f"{numpy_ms / 2:.2f}x"
    assert (
        f"| edge network per image, numpy runtime (p50) | {numpy_ms:.2f} ms ({numpy_ms / 2:.2f}x torch) | "
        f"<= 1.5x: {verdict} |" in text
    )


def test_edge_device_venv_falls_back_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: no device venv and pip fails.
    monkeypatch.setattr(edge, "_device_venv_ready", lambda python: False)

    def refuse(python: Path) -> None:
        raise RuntimeError("no index")

    monkeypatch.setattr(edge, "_create_device_venv", refuse)

    # Execute
    environment = edge.ensure_device_environment("edge-venv")

    # Assert
    assert environment.kind == "current" and environment.note.startswith("FALLBACK") and "no index" in environment.note


def test_edge_device_venv_with_torch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a device venv that exists (whether or not this checkout has one) and imports torch
    monkeypatch.setattr(edge, "_device_venv_ready", lambda python: True)
    monkeypatch.setattr(edge, "_timm_free", lambda python: True)
    monkeypatch.setattr(edge, "_torch_free", lambda python: False)

    with pytest.raises(RuntimeError, match="can import torch"):
        edge.ensure_device_environment("edge-venv")


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
    [
        {"seed_images": 1},
        {"train_images": 0},
        {"epochs": 0},
        {"codec": "i7"},
        {"environment": "cloud"},
        {"device_predictions": 0},
        {"device_images": 0},
    ],  # fmt: skip
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
