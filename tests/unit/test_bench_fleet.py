"""Benchmark section 9 (a fleet of devices following an alias) in its quick profile, against real processes: the
registry, killed and restarted on its port, and two client processes of 50 devices each; plus its pieces.

Timings on a shared machine are noise, so the end-to-end tests assert the structure, that the moves before the
restart reached every device and that every target was evaluated, never whether a timing target passed.
"""

from __future__ import annotations

import math

import pytest

from bench import fleet, run
from services.common.pb import registry_pb2
from services.registry.records import in_rollout

QUICK = fleet.SETTINGS["quick"]
MOVES = ("promote", "rollback", f"rollout {fleet.ROLLOUT_PERCENT} %", "rollout rolled back",
         "move right after the restart", "promote after the restart")  # fmt: skip


@pytest.fixture(scope="module")
def section(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return fleet.run("quick", tmp_path_factory.mktemp("fleet"))


def _move(section: dict, name: str) -> dict:
    return next(move for move in section["moves"] if move["name"] == name)


@pytest.mark.slow
def test_quick_section_moves_reach_every_device(section: dict) -> None:
    # Assert: the quick fleet, every move measured; those before the restart reached every device they concern.
    assert section["devices"] == QUICK.devices == 100 and section["processes"] == 2
    assert [move["name"] for move in section["moves"]] == list(MOVES)
    for name in MOVES[:4]:
        move = _move(section, name)
        assert move["complete"] and move["swaps"] == move["expected_swaps"] and move["unexpected_swaps"] == 0, move
        assert move["events"] == QUICK.devices and move["swap_s"]["n"] == move["swaps"]
        assert 0 < move["event_s"]["p50"] <= move["event_s"]["p99"] <= move["event_s"]["max"]
        assert move["event_s"]["p50"] < move["swap_s"]["p50"] < move["report_s"]["p50"]  # event, pull, report
    assert _move(section, "promote")["expected_swaps"] == _move(section, "rollback")["expected_swaps"] == 100
    # The 10 % rollout swaps exactly the devices the stable hash picks.
    picked = sum(in_rollout(fleet.TASK, fleet.ALIAS, 2, fleet.device_name(i), 10) for i in range(100))
    assert _move(section, MOVES[2])["expected_swaps"] == picked == round(section["rollout_share"] * 100)


@pytest.mark.slow
def test_quick_section_measures_memory_restart_and_integrity(section: dict) -> None:
    memory, restart, integrity = section["memory"], section["restart"], section["integrity"]
    # Assert: RSS read from /proc, the watchers counted by the registry's own gauge and by GetFleet.
    assert memory["rss_watching_bytes"] > memory["rss_idle_bytes"] > 10 << 20
    assert memory["watchers_metric"] == memory["fleet_watchers"] == 100
    assert math.isclose(memory["bytes_per_watcher"], (memory["rss_watching_bytes"] - memory["rss_idle_bytes"]) / 100)
    # the registry really was killed: every device's stream broke and it re-attached to the new process
    assert 0 < restart["restart_s"] < 60 and restart["reattached"] == 100
    assert restart["reconnect_attempts"] >= 100 and restart["watchers_metric_after"] == 100
    assert restart["reattach_s"]["p50"] > 0 and restart["reattach_s"]["n"] == 100
    # every device's record was checked against the history of seven moves (the first, six measured)
    assert integrity["devices"] == 100 and integrity["moves_in_history"] == 7
    for key in ("events_backwards", "wrong_events", "wrong_swaps", "moves_lost"):
        assert isinstance(integrity[key], int) and integrity[key] >= 0
    assert integrity["pulls"] >= 300 and integrity["pull_bytes"] > 0
    assert integrity["not_modified"] >= 100  # the rollback: every device still had version 1
    # one row per target, each evaluated
    assert len(section["targets"]) == 8
    assert all(isinstance(t["passed"], bool) and t["measured"] for t in section["targets"])


@pytest.mark.slow
def test_quick_section_swaps_a_predicting_agent_without_a_failed_prediction(section: dict) -> None:
    # A real extractor and registry, a device Agent predicting the whole time, a promote: the numbers are counts.
    load = section["swap_under_load"]
    assert load["predictions"] > 20 and load["versions_seen"] == [1, 2] and load["final_version"] == 2
    assert load["failed"] == 0 and load["old_after_new"] == 0 and load["before_promote_all_old"]
    assert 0 < load["swap_s"] < 30
    assert section["targets"][-1]["passed"] is True


@pytest.mark.slow
def test_quick_section_markdown(section: dict) -> None:
    text = fleet.markdown(section)
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + len(MOVES)
    assert "KB per watcher" in text and "SIGKILL" in text and "*Method.*" in text


# ------------------------------------------------------------------------------------------------ pieces


def _history() -> list[registry_pb2.AliasMove]:
    """Newest first, as AliasHistory answers: created at 1, promote to 2, a 50 % rollout of 3."""
    return [
        registry_pb2.AliasMove(revision=3, from_version=2, to_version=2, rollout_version=3, rollout_percent=50),
        registry_pb2.AliasMove(revision=2, from_version=1, to_version=2),
        registry_pb2.AliasMove(revision=1, from_version=0, to_version=1),
    ]


def _record(name: str, events: list[tuple[int, int]], swaps: list[tuple[int, int]]) -> dict:
    """A device's record from (revision, version) events and (version, revision) swaps."""
    return {
        "device": name,
        "events": [(float(i), 1, revision, version, i == 0) for i, (revision, version) in enumerate(events)],
        "swaps": [(float(i), version, revision) for i, (version, revision) in enumerate(swaps)],
        "attaches": [(0.0, 1)],
    }


def test_check_records_accepts_a_faithful_device() -> None:
    name = "dev-00000"
    third = 3 if in_rollout(fleet.TASK, fleet.ALIAS, 3, name, 50) else 2
    record = _record(name, [(1, 1), (2, 2), (2, 2), (3, third)], [(1, 1), (2, 2)] + ([(3, 3)] if third == 3 else []))

    checked = fleet.check_records([record], _history())

    assert checked["events_backwards"] == checked["wrong_swaps"] == checked["moves_lost"] == 0
    assert checked["wrong_events"] == 0 and checked["duplicate_events"] == 1  # a resume repeats its revision


def test_check_records_finds_backwards_lost_and_wrong_swaps() -> None:
    backwards = _record("dev-00001", [(2, 2), (1, 1)], [])
    lost = _record("dev-00002", [(1, 1), (3, 2)], [])
    late_joiner = _record("dev-00003", [(2, 2)], [])  # first seen at 2: revision 1 is not its to get
    wrong = _record("dev-00004", [(1, 1)], [(1, 1), (2, 1)])

    checked = fleet.check_records([backwards, lost, late_joiner, wrong], _history())

    assert checked["events_backwards"] == 1
    assert checked["moves_lost"] == 1 + 1 + 1 + 2  # backwards: 3; lost: 2; late_joiner: 3; wrong: 2 and 3
    assert checked["wrong_swaps"] == 1 and any("dev-00004" in e for e in checked["examples"])


def test_expected_version_follows_the_stable_hash() -> None:
    rollout = registry_pb2.AliasMove(to_version=1, rollout_version=2, rollout_percent=10)
    names = [fleet.device_name(i) for i in range(1000)]

    versions = [fleet.expected_version(rollout, name) for name in names]

    assert set(versions) == {1, 2} and 50 < versions.count(2) < 150
    assert all((v == 2) == in_rollout(fleet.TASK, fleet.ALIAS, 2, n, 10) for v, n in zip(versions, names, strict=True))
    assert fleet.expected_version(registry_pb2.AliasMove(to_version=4), names[0]) == 4


def test_fleet_is_a_section_of_the_harness() -> None:
    spec = next(spec for spec in run.SECTIONS if spec.name == "fleet")
    assert (spec.name, spec.module, spec.rows, spec.takes_profile) == ("fleet", "bench.fleet", False, True)
