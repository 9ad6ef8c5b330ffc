"""The benchmark harness end to end in its smallest profile (a micro ViT): every key of latest.json with sane values,
REPORT.md and the plots written, failures of one section recorded without stopping the run; plus the harness's
own pieces (section loading, --merge, --only, the byte-counting proxy, the edge link's root check).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import types
from pathlib import Path

import pytest

from bench import netns, run
from bench.common import VIT_MICRO, BenchError, BenchSkipped, percentile, summarize
from bench.proxy import ByteCountingProxy
from bench.servers import ServerProcess
from services.common.wire.codec import ALL_CODECS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MICRO_TOKENS, MICRO_DIMS, MICRO_BLOCKS = 17, 32, 4  # bench.common.VIT_MICRO's geometry


def _fake_section(name: str, *, result: object = None, error: Exception | None = None) -> types.ModuleType:
    """A stand-in for another team's section module (bench.accuracy / bench.edge) following the harness protocol."""
    module = types.ModuleType(name)

    def run_section(quick: bool, out_dir: Path) -> object:
        if error is not None:
            raise error
        return result

    module.run = run_section  # type: ignore[attr-defined]
    module.markdown = lambda section: f"fake {name} table, {len(section['rows'])} rows"  # type: ignore[attr-defined]
    return module


FAKE_ACCURACY = {
    "rows": [
        {"codec": "f32-none", "mean": 0.81, "std": 0.02, "seeds": [0, 1, 2, 3, 4]},
        {"codec": "i8-zstd", "mean": 0.805, "std": 0.021, "seeds": [0, 1, 2, 3, 4]},
    ],
    "method": "paired seeds",
    "targets": [
        {"name": "default codec vs float32", "target": "within 0.5 points", "measured": "-0.5", "passed": True}
    ],
}


FAKE_SERVING = {
    "rows": [],
    "method": "free forward against an echo",
    "targets": [{"name": "server CPU per image", "target": "<= 2.0 ms", "measured": "1.5 ms", "passed": True}],
}


@pytest.fixture()
def fake_other_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    """accuracy returns rows; edge fails: the run must record the failure and carry on. serving (run for real by
    tests/unit/test_bench_serving.py) is a stand-in here, to keep this run short."""
    monkeypatch.setitem(sys.modules, "bench.accuracy", _fake_section("bench.accuracy", result=FAKE_ACCURACY))
    monkeypatch.setitem(sys.modules, "bench.serving", _fake_section("bench.serving", result=FAKE_SERVING))
    # recipe: run for real (smoke profile) by tests/unit/test_synthetic_glyphs.py; a stand-in here, to keep this short.
    monkeypatch.setitem(sys.modules, "bench.recipe", _fake_section("bench.recipe", result={"rows": []}))
    # fleet: run for real (quick profile) by tests/unit/test_bench_fleet.py; a stand-in here, to keep this short.
    monkeypatch.setitem(sys.modules, "bench.fleet", _fake_section("bench.fleet", result={"rows": []}))
    # segmentation: run for real (smoke profile) by tests/unit/test_bench_segmentation.py; a stand-in here.
    monkeypatch.setitem(sys.modules, "bench.segmentation", _fake_section("bench.segmentation", result={"rows": []}))
    monkeypatch.setitem(
        sys.modules, "bench.edge", _fake_section("bench.edge", error=RuntimeError("edge probe crashed on purpose"))
    )


@pytest.mark.slow
def test_smoke_run_writes_every_key_with_measured_values(tmp_path: Path, fake_other_sections: None) -> None:
    # Prepare
    messages: list[str] = []

    # Execute
    code = run.main(["--profile", "smoke", "--out", str(tmp_path)], log=messages.append)

    # Assert: one section failed (edge, on purpose), so the exit status says so, and everything else is there
    assert code == 1
    results = json.loads((tmp_path / "latest.json").read_text())
    for key in ("transfer", "accuracy", "extractor", "edge", "link", "scaling", "serving", "date", "machine", "commit"):
        assert key in results, key
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", results["date"])
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", results["commit"])
    assert results["machine"]["cpus_usable"] >= 1 and results["profile"] == "smoke"
    _check_transfer(results["transfer"])
    _check_extractor(results["extractor"])
    _check_scaling(results["scaling"])
    _check_link(results["link"], results["details"]["link"])
    assert results["accuracy"] == FAKE_ACCURACY["rows"]
    assert results["edge"] is None
    assert results["details"]["edge"]["status"] == "error"
    assert "edge probe crashed on purpose" in results["details"]["edge"]["error"]
    # the 0.15 MiB transfer target is about ViT-B/16: not claimed for the micro ViT
    assert results["details"]["transfer"]["meta"]["paper_comparable"] is False
    assert {t["section"] for t in results["targets"]} == {"accuracy", "extractor", "serving"}
    report = (tmp_path / "REPORT.md").read_text()
    assert "## 1. Transfer per image" in report and "## 6. Scaling" in report
    assert "**Failed:** RuntimeError: edge probe crashed on purpose" in report
    assert "fake bench.accuracy table, 2 rows" in report
    for plot in ("transfer.png", "extractor.png", "scaling.png"):
        assert (tmp_path / plot).read_bytes()[:8] == PNG_MAGIC
        assert f"]({plot})" in report
    assert any("edge: error" in message for message in messages)


def _check_transfer(rows: list[dict]) -> None:
    assert len(rows) == 5 * len(ALL_CODECS)
    assert {row["method"] for row in rows} == {"lst", "last", "partial", "cls", "mist"}
    assert [(row["method"], row["codec"]) for row in rows if row["is_default"]] == [("mist", "i8o-zstd")]
    by_cell = {(row["method"], row["codec"]): row for row in rows}
    raw_map = MICRO_TOKENS * MICRO_DIMS * 4
    # float32 without compression: the raw bytes plus a small header (shape, crc, backbone id)
    for method, maps in (("mist", 1), ("partial", 1), ("lst", MICRO_BLOCKS + 1), ("last", 3)):
        payload = by_cell[(method, "f32-none")]["bytes_per_image"]
        assert maps * raw_map < payload < maps * raw_map + 300, method
    assert by_cell[("cls", "f32-none")]["float32_bytes_per_image"] == MICRO_DIMS * 4
    for row in rows:  # the socket carries the payload plus framing, both ways
        assert row["socket_bytes_per_image"] > row["bytes_per_image"] > 0
        assert row["request_socket_bytes_per_image"] > 0
    assert by_cell[("mist", "i8-zstd")]["bytes_per_image"] < by_cell[("mist", "f32-none")]["bytes_per_image"] / 2


def _check_extractor(section: dict) -> None:
    assert section["service_vs_direct"] > 0 and section["batching_gain_8_streams"] > 0
    assert section["cache_hit_speedup"] > 0
    assert set(section["early_exit_speedup"]) == {"1", "2", "3"}  # candidate k below N = 4
    assert all(ratio > 0 for ratio in section["early_exit_speedup"].values())
    assert section["early_exit_ideal"]["2"] == 2.0
    assert section["device"].startswith(("cpu", "cuda"))
    assert section["spread"]["service_vs_direct"]["n"] == 2


def _check_scaling(section: dict) -> None:
    rows = section["extractor"]["rows"]
    assert [row["streams"] for row in rows] == [1, 4, 16]
    for row in rows:
        assert row["images_per_s"] > 0 and row["p99_latency_s"] >= row["p50_latency_s"] > 0
        assert row["requests"] >= 8
    tuner = section["tuner"]["rows"]
    assert [row["images"] for row in tuner] == [16, 32, 64]
    assert all(row["epoch_seconds"] > 0 for row in tuner)


def _check_link(rows: list[dict], detail: dict) -> None:
    if detail["status"] == "skipped":  # no root here: the reason is recorded instead
        assert rows == [] and ("root" in detail["error"] or "iproute2" in detail["error"])
        return
    assert detail["status"] == "ok"
    assert [(row["method"], row["codec"]) for row in rows] == [
        ("lst", "f32-none"),
        ("last", "f32-none"),
        ("mist", "f32-none"),
        ("mist", "i8o-zstd"),
    ]
    for row in rows:
        assert row["rate_mbit"] == 10 and row["images"] >= 2 and row["seconds"] > 0
        assert row["wire_bytes_per_image"] > row["payload_bytes_per_image"] > 0
        assert row["cache_hits"] == row["images"]  # the cache was warmed unshaped: the link alone is timed
    ours = [f"{netns.NAME_PREFIX}{os.getpid()}-{side}" for side in ("srv", "cli")]
    assert netns.namespaces_named(ours) == []  # both namespaces (and so the veth pair) were deleted


# ---------------------------------------------------------------------------------------------- harness pieces


def test_missing_section_module_is_an_error_not_a_crash(tmp_path: Path) -> None:
    # Prepare
    spec = run.SectionSpec("accuracy", "2.", "bench.no_such_section", rows=True, takes_profile=False)

    # Execute
    outcome = run.run_section(spec, "smoke", tmp_path)

    # Assert
    assert outcome.status == "error"
    assert outcome.error == "bench.no_such_section is missing: this section is not implemented yet"


def test_section_returning_the_wrong_shape_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a rows section must give rows
    monkeypatch.setitem(sys.modules, "bench.fake_rows", _fake_section("bench.fake_rows", result={"mean": 1.0}))
    spec = run.SectionSpec("accuracy", "2.", "bench.fake_rows", rows=True, takes_profile=False)

    # Execute
    outcome = run.run_section(spec, "smoke", tmp_path)

    # Assert
    assert outcome.status == "error"
    assert "must return a list of rows or a dict with a 'rows' list" in outcome.error


def test_merge_keeps_earlier_sections_marked_with_their_run(tmp_path: Path, fake_other_sections: None) -> None:
    # Prepare: an earlier run measured transfer only
    earlier = {
        "date": "2026-01-02T03:04:05+00:00",
        "commit": "a" * 40,
        "transfer": [
            {
                "method": "mist",
                "codec": "i8-zstd",
                "bytes_per_image": 1000.0,
                "socket_bytes_per_image": 1100.0,
                "is_default": True,
            }
        ],
        "details": {"transfer": {"status": "ok", "seconds": 12.0, "meta": {"images": 8}}},
    }
    (tmp_path / "latest.json").write_text(json.dumps(earlier))

    # Execute: accuracy only, merged
    code = run.main(
        ["--profile", "smoke", "--only", "accuracy", "--merge", "--out", str(tmp_path)], log=lambda text: None
    )

    # Assert
    assert code == 0
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["transfer"] == earlier["transfer"]
    assert results["details"]["transfer"]["carried_from"] == {"date": earlier["date"], "commit": "a" * 40}
    assert results["accuracy"] == FAKE_ACCURACY["rows"]
    assert results["details"]["link"]["status"] == "not-run" and results["link"] == []
    assert results["extractor"] is None
    assert "Carried over (`--merge`) from the run of 2026-01-02T03:04:05+00:00" in (tmp_path / "REPORT.md").read_text()


def test_unknown_section_name_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--only", "transfer,speed"])
    assert exit_info.value.code == 2
    assert (
        "unknown section(s) speed; choose from transfer, accuracy, link, extractor, edge, scaling, serving, recipe, "
        "fleet" in capsys.readouterr().err
    )


def test_quick_and_another_profile_contradict() -> None:
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--quick", "--profile", "full"])
    assert exit_info.value.code == 2


def test_proxy_counts_every_byte_in_each_direction() -> None:
    # Prepare: an upstream that answers each request with twice as many bytes
    upstream = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = upstream.accept()
        with connection:
            while data := connection.recv(65536):
                connection.sendall(data * 2)

    threading.Thread(target=serve, daemon=True).start()
    with ByteCountingProxy(f"127.0.0.1:{upstream.getsockname()[1]}") as proxy:
        host, port = proxy.target.split(":")

        # Execute
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"x" * 5000)
            received = 0
            while received < 10_000:
                received += len(client.recv(65536))
        idle = proxy.wait_idle(5)

    # Assert
    upstream.close()
    assert idle
    assert proxy.counts() == (10_000, 5000, 1)


def test_edge_link_without_root_is_skipped_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(netns.shutil, "which", lambda name: f"/usr/sbin/{name}")
    with pytest.raises(BenchSkipped, match="needs root"):
        netns.EdgeLink.create()


def test_edge_link_refuses_a_public_or_wrong_sized_subnet() -> None:
    with pytest.raises(BenchError, match="private /30"):
        netns.EdgeLink("8.8.8.0/30")
    with pytest.raises(BenchError, match="private /30"):
        netns.EdgeLink("10.1.0.0/24")


def test_summaries_and_percentiles() -> None:
    assert summarize([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    assert percentile([float(v) for v in range(1, 101)], 99) == pytest.approx(99.01)
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(BenchError, match="nothing measured"):
        summarize([])


def test_server_that_cannot_start_reports_its_own_error() -> None:
    # Prepare: a stand-in "server" that fails the way mist-extractor does on a bad flag (message on stderr, exit 2)
    fail = (
        "sh",
        "-c",
        "echo 'mist-extractor: --max-batch-size (env MIST_MAX_BATCH_SIZE): must be >= 1' >&2; exit 2",
        "sh",
    )
    server = ServerProcess(VIT_MICRO, prefix=fail)

    # Execute
    with pytest.raises(BenchError) as error_info:
        server.start(timeout_s=30)

    # Assert: the server's own words travel in the error, and the process was reaped
    assert "--max-batch-size (env MIST_MAX_BATCH_SIZE): must be >= 1" in str(error_info.value)
    assert "did not start" in str(error_info.value)
    assert server._proc is not None and server._proc.returncode == 2
