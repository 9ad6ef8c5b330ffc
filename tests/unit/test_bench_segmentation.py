"""Bench section 10 (segmentation) in its smoke profile: a shrunk pvt_v2 served in-process, every figure produced and
the report rendered. Its numbers mean nothing; `make bench` measures them."""

from __future__ import annotations

import pytest

from bench import run as bench_run
from bench import segmentation

pytestmark = pytest.mark.timeout(300)


def test_the_smoke_profile_measures_bytes_miou_and_rss(tmp_path) -> None:
    section = segmentation.run("smoke", tmp_path)
    wire = {(row["mode"], row["codec"]): row["bytes_per_image"] for row in section["wire"]}
    # float32 as received is the float32 size Describe states, plus the message's header
    describe = section["describe_float32_bytes"]
    assert 0 < wire[("mist", "f32-none")] - describe["mist_f32"] < 512
    assert 0 < wire[("stages", "f32-none")] - describe["stages"] < 4 * 512
    assert wire[("mist", "i8o-zstd")] < wire[("mist", "f32-none")] < wire[("stages", "f32-none")]
    runs = section["miou"]["runs"]
    assert [r["seed"] for r in runs["mist"]] == [r["seed"] for r in runs["last_stage"]] == [0, 1]
    assert all(0.0 <= r["miou"] <= 1.0 for mode in runs.values() for r in mode)
    delta = section["miou"]["delta"]["mean"]
    assert delta == pytest.approx(section["miou"]["mist"]["mean"] - section["miou"]["last_stage"]["mean"])
    rss = section["edge_rss"]
    assert rss["mode"] == "finetune-dense" and rss["images"] == 8 and rss["peak_rss_bytes"] > 0
    assert [t["passed"] for t in section["targets"]][0] is True and len(section["targets"]) == 3
    text = segmentation.markdown(section)
    assert "| stages | i8o-zstd |" in text and "MIST aggregate" in text
    assert any(spec.name == "segmentation" for spec in bench_run.SECTIONS)
