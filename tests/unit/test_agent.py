"""The device agent (services/tuner/agent.py) and the Predictor's validated swap, against a real registry in this
process (InProcessRegistry on port 0, SQLite): backoff bounds, the state file, refusals that keep the old weights,
and a start from the state file while the registry is down. No extractor runs: nothing here classifies an image."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from services.common.clients.registry import BlobCache, RegistryClient
from services.common.errors import InvalidArgumentError, UnavailableError
from services.common.wire.edge_spec import CONFIG_METADATA_KEY
from services.registry.config import RegistryConfig
from services.tuner.agent import Agent, AgentState, Backoff, load_saved, read_state, save_state, state_path
from services.tuner.config import Endpoints
from services.tuner.predict import Predictor, VersionRejected, loaded_from, smoke_features
from tests.helpers.registry import CONFIG, InProcessRegistry, make_blob, task_proto

FAST = Backoff(initial_s=0.05, max_s=0.2)
NO_EXTRACTOR = "127.0.0.1:1"  # channels connect lazily: nothing here predicts an image


def weights(seed: int, *, overflow: bool = False) -> bytes:
    """Edge-network weights the registry accepts. overflow: the head scaled to +-3e38, every value finite float32
    (the registry's checks pass) but the logits of any real input overflow to inf."""
    arrays = safetensors.numpy.load(make_blob(seed))
    if overflow:
        head = arrays["head.weight"]
        arrays["head.weight"] = (head / np.abs(head).max() * 3e38).astype(np.float32)
        assert np.isfinite(arrays["head.weight"]).all()
    return safetensors.numpy.save(arrays, metadata={CONFIG_METADATA_KEY: CONFIG.to_json()})


@pytest.fixture
def registry(tmp_path: Path):
    server = InProcessRegistry(RegistryConfig(db=f"sqlite:///{tmp_path}/registry.db", metrics_listen="off")).start()
    try:
        with RegistryClient(server.target, timeout_s=20) as client:
            client.create_task(task_proto("cats"))
            client.push("cats", weights(0), parent_version=0)  # 1: good
            client.push("cats", weights(1, overflow=True), parent_version=1)  # 2: non-finite logits
            client.push("cats", weights(2), parent_version=2)  # 3: good
            client.set_alias("cats", "production", 1)
        yield server
    finally:
        server.stop()


def endpoints(server: InProcessRegistry, cache: Path) -> Endpoints:
    return Endpoints(extractor=NO_EXTRACTOR, registry=server.target, cache_dir=str(cache), timeout_s=10)


# ---------------------------------------------------------------------------------------------- backoff


def test_backoff_doubles_to_its_cap_with_full_jitter():
    backoff = Backoff(initial_s=0.5, max_s=30.0)
    assert [backoff.ceiling(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.ceiling(10_000) == 30.0  # no overflow however long the outage
    rng = random.Random(7)
    for attempt in range(10):
        delays = [backoff.delay(attempt, rng) for _ in range(400)]
        ceiling = backoff.ceiling(attempt)
        assert all(0.0 <= d <= ceiling for d in delays)
        # full jitter: spread over the whole window, not bunched near its top (mean ceiling / 2)
        assert min(delays) < 0.1 * ceiling and max(delays) > 0.9 * ceiling
        assert abs(np.mean(delays) / ceiling - 0.5) < 0.08
    with pytest.raises(InvalidArgumentError):
        Backoff(initial_s=2.0, max_s=1.0)


# ---------------------------------------------------------------------------------------------- state file


def test_the_state_file_round_trips_and_loads_from_the_blob_cache_alone(registry, tmp_path):
    # Prepare: version 3 pulled into a cache folder, as a running agent leaves it
    cache = tmp_path / "cache"
    with RegistryClient(registry.target, cache_dir=cache) as client:
        loaded = loaded_from(client.pull("cats", version=3))
    path = state_path(cache, "cats", "production")

    # Execute
    save_state(path, AgentState.of(loaded, "production"))
    state = read_state(path, "cats", "production")
    again = load_saved(state, BlobCache(cache))  # no registry involved

    # Assert: same version, same records, same answers; nothing left behind by the atomic write
    assert (state.task, state.alias, state.version, state.sha256) == ("cats", "production", 3, loaded.version.sha256)
    assert again.version == loaded.version and again.task == loaded.task and (again.k, again.codec) == (2, loaded.codec)
    features = smoke_features(CONFIG)
    np.testing.assert_array_equal(again.model.logits(features), loaded.model.logits(features))
    assert sorted(p.name for p in cache.rglob("*.tmp")) == []
    assert json.loads(path.read_text())["format"] == 1


def test_a_damaged_or_foreign_state_file_is_ignored(tmp_path, caplog):
    path = tmp_path / "agent-cats@production.json"
    assert read_state(path, "cats", "production") is None  # none yet: silent
    path.write_text('{"format": 1, "task": "cats"')  # cut short
    assert read_state(path, "cats", "production") is None
    path.write_text(json.dumps({"format": 1, "task": "dogs", "alias": "production", "version": 1, "sha256": "ab",
                                "task_record": {}, "version_record": {}}))  # fmt: skip
    assert read_state(path, "cats", "production") is None
    assert "ignoring agent state" in caplog.text and "dogs@production" in caplog.text


def test_a_saved_version_whose_blob_was_evicted_is_an_error_not_a_crash(registry, tmp_path):
    cache = tmp_path / "cache"
    with RegistryClient(registry.target, cache_dir=cache) as client:
        state = AgentState.of(loaded_from(client.pull("cats", version=1)), "production")
    for blob in cache.glob("*.safetensors"):
        blob.unlink()
    with pytest.raises(InvalidArgumentError, match="no longer holds version 1"):
        load_saved(state, BlobCache(cache))


# ---------------------------------------------------------------------------------------------- validated swaps


def test_a_version_that_fails_validation_keeps_the_old_one(registry, tmp_path):
    with Predictor(endpoints(registry, tmp_path / "cache"), "cats", version=1) as predictor:
        # Execute + Assert: non-finite logits are refused at the smoke step, an unknown version at the pull
        with pytest.raises(VersionRejected) as smoke:
            predictor.switch_to(2)
        assert (smoke.value.version, smoke.value.step) == (2, "smoke") and "non-finite logits" in smoke.value.reason
        assert predictor.loaded.version.number == 1
        with pytest.raises(VersionRejected) as missing:
            predictor.switch_to(9)
        assert missing.value.step == "pull" and "NOT_FOUND" in missing.value.reason
        # ... a good one is swapped in, and the one in use is returned when asked again
        assert predictor.switch_to(3).version.number == 3 == predictor.loaded.version.number
        assert predictor.switch_to(3) is predictor.loaded


def test_a_predictor_refuses_weights_of_another_task(registry, tmp_path):
    with RegistryClient(registry.target) as client:
        client.create_task(task_proto("dogs"))
        client.push("dogs", weights(0), parent_version=0)
    with Predictor(endpoints(registry, tmp_path / "cache"), "dogs", version=1) as predictor:
        candidate = loaded_from(predictor._registry.pull("dogs", version=1))
        with pytest.raises(InvalidArgumentError, match="task 'cats' offered to a predictor of 'dogs'"):
            predictor.swap(loaded_from(predictor._registry.pull("cats", version=1)))
        assert predictor.swap(candidate).version.number == 1


# ---------------------------------------------------------------------------------------------- the agent


def test_the_agent_swaps_refuses_remembers_the_refusal_and_reports_it(registry, tmp_path):
    with RegistryClient(registry.target, timeout_s=20) as admin:
        with Agent(endpoints(registry, tmp_path / "cache"), "cats", "production", device="cam-01",
                   backoff=FAST) as agent:  # fmt: skip
            assert agent.version == 1 and agent.status().connected

            admin.set_alias("cats", "production", 2)  # non-finite logits: refused, 1 stays
            status = agent.wait_for(lambda s: s.rejected_version == 2, 10)
            assert status.version == 1 and "non-finite" in status.rejected_reason

            # a reconnect replays the alias (still on 2): the refusal is remembered, not retried
            revision = status.revision
            agent._watch.cancel()
            agent.wait_for(lambda s: s.connected and s.revision >= revision, 10)
            admin.set_alias("cats", "production", 3)  # the alias moves on: swapped
            agent.wait_for(lambda s: s.version == 3, 10)
            admin.set_alias("cats", "production", 2)  # ... and back to 2: tried again, refused again
            agent.wait_for(lambda s: sum(c.kind == "reject" for c in s.changes) == 2, 10)
            status = agent.status()

            fleet = admin.fleet("cats")
            [(device, stale)] = fleet.devices

    assert [(c.kind, c.version, c.previous) for c in status.changes] == [
        ("start", 1, 0), ("reject", 2, 1), ("swap", 3, 1), ("reject", 2, 3),
    ]  # fmt: skip
    assert status.version == 3 and agent.state_file and read_state(agent.state_file, "cats", "production").version == 3
    assert (device.device, device.alias, device.version, device.rejected_version) == ("cam-01", "production", 3, 2)
    assert "smoke" in device.rejected_reason and device.agent.startswith("mist-agent/") and not stale


def test_an_agent_started_while_the_registry_is_down_runs_the_saved_version(registry, tmp_path):
    # Prepare: an agent ran version 3 and saved it; then the registry goes away
    cache = tmp_path / "cache"
    with RegistryClient(registry.target) as admin:
        admin.set_alias("cats", "production", 3)
    with Agent(endpoints(registry, cache), "cats", "production", device="cam-02", backoff=FAST) as agent:
        assert agent.version == 3
    registry.stop()

    # Execute
    with Agent(endpoints(registry, cache), "cats", "production", device="cam-02", backoff=FAST) as restarted:
        status = restarted.status()

    # Assert: started from the state file, still trying to connect
    assert status.version == 3 and not status.connected
    assert [(c.kind, c.reason) for c in status.changes] == [("start", "state file")]
    # ... and without a state file there is nothing to start from
    with pytest.raises(UnavailableError):
        Agent(endpoints(registry, tmp_path / "empty"), "cats", "production", device="cam-03").start()


def test_a_replay_after_a_reconnect_runs_only_its_last_move(registry, tmp_path):
    # The registry replays every move a reconnecting device missed (replay_pending counts down to 0): pulling and
    # validating each superseded version would waste the link and run stale weights for a moment.
    from datetime import datetime, timezone

    from services.registry.records import AliasEvent

    def event(version: int, revision: int, pending: int) -> AliasEvent:
        return AliasEvent("cats", "production", revision, version, version, None, False, False,
                          datetime.now(timezone.utc), "test", pending)  # fmt: skip

    with Agent(endpoints(registry, tmp_path / "cache"), "cats", "production", device="cam-03", backoff=FAST) as agent:
        agent.stop()  # follow by hand: the events below are what a replay looks like
        agent._handle(event(2, 10, 1))  # superseded by the next one: not even pulled
        assert agent.version == 1 and agent.status().revision == 10 and agent.status().rejected_version == 0
        agent._handle(event(3, 11, 0))
        assert agent.version == 3 and agent.status().revision == 11
    assert [(c.kind, c.version) for c in agent.status().changes] == [("start", 1), ("swap", 3)]
