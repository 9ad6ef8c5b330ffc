"""Benchmark section 7 (the serving path against a bare gRPC echo) in its smoke profile, against real processes: the
free-forward extractor, the echo, `--workers 2`, the tiny model's real server and the load clients; plus its pieces.

Timings on a shared machine are noise at these sizes, so the tests assert the structure, that every figure is a
positive finite number and that every target was evaluated, never whether it passed.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch

from bench import run, serving
from bench.echo_server import read_features, write_features
from bench.report import write_report
from bench.serving_load import distinct_images, process_tree, sample_tree, tree_delta
from services.common.wire.codec import DEFAULT_CODEC, FeatureCodec
from services.extractor import engine
from services.extractor.backbone import load_backbone
from services.extractor.gather import gather
from tests.conftest import TINY_VIT_KWARGS

MICRO_BLOCKS = 4  # bench.common.VIT_MICRO's depth
FIGURE_KEYS = ("images_per_s", "cpu_ms_per_image", "voluntary_switches_per_image")


@pytest.fixture(scope="module")
def section(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return serving.run("smoke", tmp_path_factory.mktemp("serving"))


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _check_figures(figures: dict) -> None:
    for key in FIGURE_KEYS:
        spread = figures[key]
        assert spread["n"] == serving.SETTINGS["smoke"].reps, key
        assert all(_positive(spread[s]) for s in ("median", "min", "max")), (key, spread)
    smoke = serving.SETTINGS["smoke"]
    assert figures["images_per_pass"] in (smoke.clients * smoke.images, smoke.clients * smoke.tiny_images)
    assert figures["answer_bytes_per_image"] > 0


@pytest.mark.slow
def test_smoke_section_measures_every_figure(section: dict) -> None:
    # Assert: the free-forward server, its echo and the tiny model's passes were all measured
    for figures in (section["free_forward"], section["echo"], *(section["tiny"][s] for s in ("miss", "hit", "echo"))):
        _check_figures(figures)
    # the echo answers with the server's own features: the same answer size, a few bytes of item_id aside
    echo_bytes, server_bytes = (
        section["echo"]["answer_bytes_per_image"],
        section["free_forward"]["answer_bytes_per_image"],
    )
    assert abs(echo_bytes - server_bytes) < 32
    assert section["feature_bytes_per_image"] > 0 and section["request_bytes_per_image"] > 0
    for ratio in ("miss_vs_echo", "hit_vs_echo"):
        assert _positive(section["tiny"][ratio]["median"])


@pytest.mark.slow
def test_smoke_section_sums_the_isolated_stages(section: dict) -> None:
    stages = section["stages_ms"]
    # Assert: every stage ran (or says which older API folds it into another one)
    assert set(stages) == {"cache_lookup", "decode", "normalize", "quantize", "encode", "answer"}
    for name, value in stages.items():
        assert value is None or _positive(value), name
        assert section["stage_apis"][name], name
    assert _positive(stages["decode"]) and _positive(stages["encode"])
    total = sum(v for v in stages.values() if v is not None) + section["echo_cpu_ms_per_message"]
    assert section["stage_sum_ms"] == pytest.approx(total)
    # one round in the smoke profile: the per-round pairing reduces to these identities
    assert section["orchestration_spread"]["n"] == serving.SETTINGS["smoke"].reps == 1
    assert section["orchestration_ms"] == pytest.approx(section["measured_cpu_ms_per_image"] - total)
    assert section["measured_cpu_ms_per_image"] == section["free_forward"]["cpu_ms_per_image"]["median"]
    assert all(_positive(v) for v in section["legacy_stages_ms"].values())


@pytest.mark.slow
def test_smoke_section_evaluates_every_target(section: dict) -> None:
    targets = section["targets"]
    # Assert: five targets, each with a verdict; only the workers' may be unmeasured, and then it says why
    assert len(targets) == 5
    for target in targets[:4]:
        assert isinstance(target["passed"], bool) and target["measured"] and target["target"], target
    workers, verdict = section["workers"], targets[4]
    assert workers["requested"] == 2
    if workers["scaling"] is None:
        assert verdict["passed"] is None and verdict["measured"].startswith("not measured")
    else:
        assert isinstance(verdict["passed"], bool) and _positive(workers["scaling"]["median"])
        assert workers["serving_processes"] == 2 and sum(workers["connections_by_worker"]) == 2
        _check_figures(workers["figures"])


@pytest.mark.slow
def test_smoke_section_fits_the_harness_and_the_report(section: dict, tmp_path: Path) -> None:
    # Prepare
    spec = next(spec for spec in run.SECTIONS if spec.name == "serving")
    run._check_shape(spec, section)
    outcome = run.SectionOutcome(spec, "ok", 1.0, result=section)

    # Execute
    text = run.add_report_parts(outcome, tmp_path)
    results = run.build_results(
        [outcome], profile="smoke", date="d", commit="c" * 40, dirty=False, machine={}, seconds=1.0
    )
    report = write_report(tmp_path, results, {"serving": text}, {"serving": spec.title}).read_text()

    # Assert: method and targets go to details; the report holds the tables and a verdict per target
    assert "method" not in results["serving"] and "targets" not in results["serving"]
    assert [t["section"] for t in results["targets"]] == ["serving"] * 5
    assert "| bare gRPC echo, same answers |" in text and "| **sum** |" in text and "*Method.*" in text
    assert report.count("| serving |") == 5 and outcome.report_error == ""


# ---------------------------------------------------------------------------------------------- pieces


def test_distinct_images_never_repeat_across_calls() -> None:
    # Execute
    jpegs = distinct_images(24, 224, "jpeg", first=0) + distinct_images(24, 224, "jpeg", first=24)
    pngs = distinct_images(40, 32, "png", first=1000)

    # Assert
    assert len(set(jpegs)) == 48 and all(image[:3] == b"\xff\xd8\xff" for image in jpegs)
    assert len(set(pngs)) == 40 and all(image[:8] == b"\x89PNG\r\n\x1a\n" for image in pngs)


def test_features_file_round_trip(tmp_path: Path) -> None:
    # Prepare
    codec = FeatureCodec(DEFAULT_CODEC)
    features = [codec.encode(torch.randn(17, 32).numpy(), k=k) for k in (1, 4)]

    # Execute
    write_features(tmp_path / "f.bin", features)

    # Assert
    assert read_features(tmp_path / "f.bin") == features


def test_tree_sample_counts_this_process_cpu() -> None:
    # Prepare
    before = sample_tree(os.getpid())

    # Execute: about 50 ms of CPU
    deadline = time.thread_time() + 0.05
    while time.thread_time() < deadline:
        pass
    cpu, switches = tree_delta(before, sample_tree(os.getpid()))

    # Assert
    assert process_tree(os.getpid())[0] == os.getpid()
    assert cpu[os.getpid()] >= 0.03 and switches >= 0


def test_free_forward_returns_real_features_as_views() -> None:
    # Prepare: the harness patches the engine on import; the real gather is put back afterwards
    import bench.free_forward_server as free

    backbone = load_backbone("vit_tiny_patch16_224", model_kwargs=TINY_VIT_KWARGS)
    images = torch.randn(6, 3, 32, 32)
    try:
        assert engine.gather is free.free_gather

        # Execute
        first = free.free_gather(backbone.model, images, "mist", (2, MICRO_BLOCKS))
        second = free.free_gather(backbone.model, images[:3], "mist", (2, MICRO_BLOCKS))
        other_mode = free.free_gather(backbone.model, images[:2], "cls", ())
    finally:
        engine.gather = gather

    # Assert: shapes as gather's; the first SEED_IMAGES rows are the real features; later calls are views
    real = gather(backbone.model, images[: free.SEED_IMAGES], "mist", (2, MICRO_BLOCKS))
    assert set(first) == {2, MICRO_BLOCKS} and first[2].shape == (6, 17, 32) and first[2].dtype == torch.float32
    torch.testing.assert_close(first[MICRO_BLOCKS][: free.SEED_IMAGES], real[MICRO_BLOCKS])
    torch.testing.assert_close(first[2][free.SEED_IMAGES], real[2][0])  # rows cycle
    assert second[2].data_ptr() == first[2].data_ptr() and second[2].shape[0] == 3
    assert set(other_mode) == {0} and other_mode[0].shape == (2, 32)


def test_rotation_alternates_which_side_runs_first() -> None:
    assert [serving._rotated(["a", "b", "c"], rep) for rep in range(3)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
    ]


def test_the_warm_up_fills_a_vit_b_cache_but_not_a_tiny_models() -> None:
    cache_bytes = 256 << 20  # the extractor's default --cache-max-bytes
    one = serving._cache_fill_images(139_246, 1)  # a ViT-B/16 MIST answer, i8o-zstd
    assert one * 139_246 >= cache_bytes * 1.05 and one < 2_200
    assert serving._cache_fill_images(139_246, 2) == 2 * one  # one cache per worker
    assert serving._cache_fill_images(700, 1) == 0  # a tiny model's cache would need ~380,000 images
