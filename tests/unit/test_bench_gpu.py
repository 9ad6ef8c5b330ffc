"""The accelerator benchmark (`make bench-gpu`, bench/gpu.py) on its CPU smoke path: real server processes, the
micro ViT at fp32 and bf16, gpu.json and GPU.md written; plus its time budget and that every server it starts is
stopped, also when a measurement fails.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench import gpu
from bench.common import BenchError
from bench.servers import ServerProcess
from services.extractor.backbone import load_backbone

MICRO_BLOCKS = 4  # bench.common.VIT_MICRO's depth: candidate ks 1, 2, 3 and N = 4


def _positive(summary: dict) -> bool:
    return summary["n"] >= 1 and all(
        math.isfinite(summary[key]) and summary[key] > 0 for key in ("median", "min", "max")
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, str, str]:
    """One CPU smoke run, as `python -m bench.gpu --smoke` makes it (a roomier budget: CI machines are shared)."""
    out = tmp_path_factory.mktemp("gpu")
    code = gpu.main(["--smoke", "--device", "cpu", "--out", str(out), "--budget-s", "240"], log=lambda text: None)
    return code, json.loads((out / gpu.JSON_NAME).read_text()), (out / gpu.MARKDOWN_NAME).read_text(), str(out)


@pytest.mark.slow
def test_smoke_run_measures_both_precisions(smoke_run: tuple[int, dict, str, str]) -> None:
    # Prepare / Execute: the module fixture ran the smoke profile once.
    code, results, _, _ = smoke_run

    # Assert: every measurement ran, on the CPU, with the micro ViT and the settings it reports.
    assert code == 0
    assert {name: phase["status"] for name, phase in results["phases"].items()} == {
        "load fp32": "ok", "load bf16": "ok", "images": "ok", "features, fp32": "ok", "features, bf16": "ok",
        "service vs direct, bf16": "ok", "service vs direct, fp32": "ok",
    }  # fmt: skip
    assert results["kind"] == "smoke" and results["settings"]["device"] == "cpu"
    assert results["settings"]["ks"] == [MICRO_BLOCKS, 1, 2, 3]
    assert results["settings"]["precisions"] == ["bf16", "fp32"] and results["settings"]["batch_images"] == 32
    assert results["machine"]["device"].startswith("cpu (") and results["machine"]["torch"]
    assert 0 < results["seconds"] < 240 and results["seconds"] <= results["process_seconds"]  # the process: pytest's


@pytest.mark.slow
def test_smoke_run_figures_are_positive_and_finite(smoke_run: tuple[int, dict, str, str]) -> None:
    _, results, _, _ = smoke_run

    for precision in ("bf16", "fp32"):
        section = results["precisions"][precision]
        # Assert: images/s at every k on both sides, the ratios built from them, batches the server really formed.
        assert set(section["direct_images_per_s"]) == set(section["service_images_per_s"]) == {"1", "2", "3", "4"}
        assert all(_positive(value) for value in section["direct_images_per_s"].values())
        assert all(_positive(value) for value in section["service_images_per_s"].values())
        for key in ("service_vs_direct", "batching_gain", "single_stream_images_per_s", "concurrent_images_per_s"):
            assert _positive(section[key]), key
        assert (
            set(section["early_exit_speedup_direct"]) == set(section["early_exit_speedup_service"]) == {"1", "2", "3"}
        )
        assert all(_positive(value) for value in section["early_exit_speedup_direct"].values())
        assert section["early_exit_ideal"] == {"1": 4.0, "2": 2.0, "3": 4 / 3}
        # One stream with one image in flight makes batches of one; 4 streams x 8 in flight make bigger ones.
        assert section["single_stream_mean_batch_size"]["median"] == pytest.approx(1.0)
        assert 1.0 < section["service_mean_batch_size"]["median"] <= 32
        assert section["reps"] == 2


@pytest.mark.slow
def test_smoke_run_bf16_feature_error_is_small_but_real(smoke_run: tuple[int, dict, str, str]) -> None:
    _, results, _, _ = smoke_run

    # Assert: bf16 against fp32 at every k; nonzero (autocast really ran in bf16), far below 10 %.
    assert list(results["feature_error"]) == ["bf16"]
    per_k = results["feature_error"]["bf16"]
    assert list(per_k) == ["1", "2", "3", "4"]
    for error in per_k.values():
        assert 0 < error["mean_relative_error"] <= error["max_relative_error"] < 0.1
        assert 0 < error["norm_relative_error"] < 0.1


@pytest.mark.slow
def test_smoke_run_writes_the_tables(smoke_run: tuple[int, dict, str, str]) -> None:
    _, results, text, out = smoke_run

    # Assert: GPU.md has a row per precision, per (precision, k < N), per k of the error; the decode row says why
    # it is missing on a CPU; nothing else is listed as not measured.
    assert text.startswith("# Accelerator benchmark (`make bench-gpu`)")
    assert text.count("\n| bf16 |") == 1 + 3 + 4 and text.count("\n| fp32 |") == 1 + 3
    assert "Not measured: --image-decode cuda needs a CUDA device." in text
    assert "## Not measured" not in text and "*Method.*" in text
    assert results["image_decode"] == {"status": "skipped", "reason": "--image-decode cuda needs a CUDA device"}
    assert sorted(p.name for p in Path(out).iterdir()) == [gpu.MARKDOWN_NAME, gpu.JSON_NAME]


def test_a_spent_budget_skips_every_measurement_and_still_writes(tmp_path: Path) -> None:
    # Execute: a budget too small for anything.
    code = gpu.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--budget-s", "0.001"], log=lambda t: None)

    # Assert: nothing measured, each phase saying why, both files written, and that is not a failure.
    results = json.loads((tmp_path / gpu.JSON_NAME).read_text())
    assert code == 0
    assert results["phases"] and all(phase["status"] == "skipped" for phase in results["phases"].values())
    assert all("time budget" in phase["error"] for phase in results["phases"].values())
    assert results["precisions"] == {} and results["feature_error"] == {}
    assert "## Not measured" in (tmp_path / gpu.MARKDOWN_NAME).read_text()


def test_the_hard_limit_cuts_a_measurement_short(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a budget of 0.05 s, 0.2 s of slack.
    monkeypatch.setattr(gpu, "HARD_SLACK_S", 0.2)
    phases = gpu.Phases(gpu.Budget(0.05), lambda text: None)
    started = time.perf_counter()

    # Execute: a measurement that would take 5 s, let through by an estimate of 0 s.
    result = phases.run("slow", 0.0, lambda: time.sleep(5))

    # Assert: stopped at the limit and recorded as cut short, not as a failure.
    assert result is None and time.perf_counter() - started < 2
    assert phases.status["slow"]["status"] == "skipped" and "cut short" in phases.status["slow"]["error"]


@pytest.fixture()
def started_servers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ServerProcess]]:
    """Every server bench.gpu creates, to check afterwards that none is left running."""
    servers: list[ServerProcess] = []
    make = gpu._server

    def recording(*args: object, **kwargs: object) -> ServerProcess:
        servers.append(make(*args, **kwargs))  # type: ignore[arg-type]
        return servers[-1]

    monkeypatch.setattr(gpu, "_server", recording)
    yield servers
    for server in servers:
        server.stop()  # only if the test failed before asserting


def test_a_failed_measurement_stops_its_server(
    monkeypatch: pytest.MonkeyPatch, started_servers: list[ServerProcess]
) -> None:
    # Prepare: a real server that starts, then the first stream fails.
    def failing_streams(*args: object, **kwargs: object) -> None:
        raise BenchError("stream failed on purpose")

    monkeypatch.setattr(gpu, "run_streams", failing_streams)
    settings = gpu.SETTINGS["smoke"]
    spec = settings.backbone
    backbone = load_backbone(spec.name, precision="fp32", model_kwargs=dict(spec.model_kwargs))
    pngs, _ = gpu.image_pools(4, 32)
    direct = gpu.DirectSide(backbone, pngs)

    # Execute
    with pytest.raises(BenchError, match="on purpose"):
        gpu.measure_precision(settings, direct, [MICRO_BLOCKS, 1], pngs, gpu.Budget(120))

    # Assert: it had started (it has a target) and its process has exited.
    (server,) = started_servers
    assert server.target and server._proc is not None and server._proc.poll() is not None


def test_feature_errors_are_scaled_per_token_row() -> None:
    # Prepare: two token rows of very different magnitude, each off by 1 % of its own largest value in one place.
    reference = np.array([[[100.0, -50.0], [1.0, 0.5]]], dtype=np.float32)
    other = reference + np.array([[[1.0, 0.0], [0.0, 0.01]]], dtype=np.float32)

    # Execute
    error = gpu.feature_errors(reference, other)

    # Assert: the small row's error counts as much as the large one's; the norm ratio is dominated by the large row.
    assert error["max_relative_error"] == pytest.approx(0.01, rel=1e-4)
    assert error["mean_relative_error"] == pytest.approx(0.005, rel=1e-4)
    assert error["norm_relative_error"] == pytest.approx(np.hypot(1.0, 0.01) / np.linalg.norm(reference), rel=1e-4)
