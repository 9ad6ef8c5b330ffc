"""The device agent: a Predictor that follows an alias of the registry, so a promote reaches every device in seconds
without a restart, a broken version never replaces a working one, and a registry outage never stops predictions.

    with Agent(endpoints, "shapes", "production", device="cam-07") as agent:     # start(): weights loaded
        prediction = agent.predict_file("frame-0001.jpg")                      # .version: the version that answered
        agent.status()      # AgentStatus: version in use, last revision seen, connected, the last refusal

What runs in the background (two daemon threads, stopped by stop() / the `with`):

- the follower: watch_alias(since_revision=the last revision handled, device=...); on an event naming a version
  other than the one in use (0: the alias was deleted, keep what runs) it validates that version (pull, sha256 checked
  by the client; strict load against the task's edge network; a smoke prediction: predict.validate_version) and
  swaps it in. A refused version stays in use nowhere, is reported, and is not tried again until the alias names
  another version first. When the stream ends (the registry died, drained, or a transient error hit a pull) it
  reconnects with the last revision handled, after a capped exponential backoff with full jitter (Backoff), reset
  once a stream was healthy (it delivered an event, or stayed open for healthy_after_s).
- the heartbeat: report_device every heartbeat_s (default: what the registry answers, 30 s), at once after a swap,
  a refusal or a reconnect: the version in use, the last refusal and its reason, and the agent's identity.

Start-up: the watch's first event says which version this device should run (the registry decides rollouts), and
that version is validated as above. When the registry cannot be reached, or that version is refused, the agent
starts from its state file (AgentState: `agent-<task>@<alias>.json` in the cache dir, written atomically after
every swap) and the blob cache, which keeps weights by sha256, and keeps reconnecting. With neither, start() raises.

No torch, no metrics: what a predict-only device installs.
"""

from __future__ import annotations

import json
import logging
import platform
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from google.protobuf import json_format

from services.common.clients.registry import AliasWatch, BlobCache, PulledVersion, RegistryClient
from services.common.errors import InvalidArgumentError, MistError, UnavailableError
from services.common.files import write_atomically
from services.common.pb import registry_pb2
from services.registry.records import AliasEvent
from services.registry.serde import task_from_proto, task_to_proto, version_from_proto, version_to_proto
from services.tuner.config import Endpoints
from services.tuner.options import Runtime
from services.tuner.predict import (
    DEFAULT_TOP_K,
    LoadedVersion,
    Prediction,
    Predictor,
    VersionRejected,
    loaded_from,
    smoke_check,
    validate_version,
)

log = logging.getLogger(__name__)

STATE_FORMAT = 1
# A stream that stayed open this long was healthy even without an event: the next failure starts the backoff anew.
HEALTHY_AFTER_S = 5.0
# How long stop() waits for each background thread; a pull in flight ends at the registry client's deadline.
_JOIN_TIMEOUT_S = 5.0


def agent_identity() -> str:
    """What the fleet view shows as the agent: 'mist-agent/0.1.0 host-a'."""
    try:
        version = metadata.version("mist-suite")
    except metadata.PackageNotFoundError:
        version = "0.1.0+source"
    return f"mist-agent/{version} {platform.node() or 'unknown-host'}"


# ---------------------------------------------------------------------------------------------- backoff


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter: attempt n waits uniform(0, min(max_s, initial_s * multiplier**n)).

    Full jitter rather than equal jitter: after a registry restart every device of a fleet reconnects at once, and
    spreading the retries over the whole window keeps them from arriving in waves. Defaults: 0.5 s doubling to 30 s,
    so a device finds a registry back within about twice the outage plus 30 s at worst.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not (0 < self.initial_s <= self.max_s) or self.multiplier < 1:
            raise InvalidArgumentError(f"backoff needs 0 < initial_s <= max_s and multiplier >= 1, got {self}")

    def ceiling(self, attempt: int) -> float:
        """The longest wait of attempt `attempt` (0 is the first retry)."""
        return min(self.max_s, self.initial_s * self.multiplier ** min(attempt, 64))

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, self.ceiling(attempt))


# ---------------------------------------------------------------------------------------------- state file


@dataclass(frozen=True)
class AgentState:
    """The state file: which version this device last ran for (task, alias), with the records needed to load it
    again from the blob cache without the registry (the task's edge network, classes and backbone; the version's
    k and codec). Written after every swap; read at start-up when the registry cannot be reached."""

    task: str
    alias: str
    version: int
    sha256: str
    task_record: dict[str, Any]  # registry_pb2.Task as JSON (json_format), so the file stays readable
    version_record: dict[str, Any]  # registry_pb2.Version as JSON
    saved_at: str = ""  # ISO 8601, UTC

    @classmethod
    def of(cls, loaded: LoadedVersion, alias: str) -> AgentState:
        return cls(
            task=loaded.task.name,
            alias=alias,
            version=loaded.version.number,
            sha256=loaded.version.sha256,
            task_record=json_format.MessageToDict(task_to_proto(loaded.task)),
            version_record=json_format.MessageToDict(version_to_proto(loaded.version)),
            saved_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )

    def to_json(self) -> str:
        return json.dumps({"format": STATE_FORMAT, **self.__dict__}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AgentState:
        """The state in `text`; InvalidArgumentError for anything but a whole state of this format."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.pop("format", None) != STATE_FORMAT:
                raise ValueError(f"not a format-{STATE_FORMAT} agent state")
            state = cls(**data)
            if not (isinstance(state.version, int) and state.version > 0 and isinstance(state.sha256, str)):
                raise ValueError("no version in it")
        except (ValueError, TypeError) as error:
            raise InvalidArgumentError(f"agent state file: {error}") from None
        return state

    def pulled(self, blob: bytes) -> PulledVersion:
        """The version as a pull would have returned it, with `blob` (the caller checked its sha256)."""
        task = task_from_proto(json_format.ParseDict(self.task_record, registry_pb2.Task()))
        version = version_from_proto(json_format.ParseDict(self.version_record, registry_pb2.Version()))
        if (task.name, version.number, version.sha256) != (self.task, self.version, self.sha256):
            raise InvalidArgumentError("agent state file: its records do not match its version")
        return PulledVersion(version=version, task=task, blob=blob, from_cache=True)


def state_path(directory: str | Path, task: str, alias: str) -> Path:
    return Path(directory).expanduser() / f"agent-{task}@{alias}.json"


def save_state(path: Path, state: AgentState) -> None:
    """Write the state file whole or not at all (a temp file renamed into place: a device may lose power)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, state.to_json())


def read_state(path: Path, task: str, alias: str) -> AgentState | None:
    """The state saved for (task, alias), or None when there is none, it is damaged, or it is another's."""
    try:
        state = AgentState.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, InvalidArgumentError) as error:
        log.warning("ignoring agent state %s: %s", path, error)
        return None
    if (state.task, state.alias) != (task, alias):
        log.warning("ignoring agent state %s: it is for %s@%s", path, state.task, state.alias)
        return None
    return state


def load_saved(state: AgentState, cache: BlobCache, runtime: Runtime = "numpy") -> LoadedVersion:
    """The saved version loaded from the blob cache (sha256 re-checked by the cache), strictly, smoke-tested."""
    blob = cache.get(state.sha256)
    if blob is None:
        raise InvalidArgumentError(f"the blob cache no longer holds version {state.version} ({state.sha256[:12]})")
    loaded = loaded_from(state.pulled(blob), runtime)
    smoke_check(loaded)
    return loaded


# ---------------------------------------------------------------------------------------------- the agent


@dataclass(frozen=True)
class AgentChange:
    """One thing the agent did to the weights: a swap, or a refusal of a version."""

    kind: Literal["start", "swap", "reject"]
    version: int  # the version swapped in, started with, or refused
    previous: int  # the version in use before (0 at start)
    revision: int  # of the alias move that asked for it (0: none, e.g. a start from the state file)
    seconds: float  # from the event to the swap (or refusal): pull, load, smoke prediction
    at: float  # the agent's clock when it happened
    reason: str = ""  # why it was refused, or where a start came from ("registry" or "state file")


@dataclass(frozen=True)
class AgentStatus:
    """A snapshot of the agent."""

    version: int  # in use
    revision: int  # of the last alias move handled (0: none yet)
    connected: bool  # a watch stream is open and delivered its first event
    rejected_version: int  # the last version refused (0: none)
    rejected_reason: str
    heartbeats: int  # reports the registry accepted
    changes: tuple[AgentChange, ...] = field(default=(), repr=False)


class Agent:
    """Follows `alias` of `task` for a Predictor (see the module docstring); start() it, or use it in a `with`.

    device: the name the registry knows this device by (rollouts and the fleet view); None: the token's name when
    the endpoints carry a registry token (the registry takes it from the token), else this host's name.
    heartbeat_s: None follows the registry's answer. state_dir: where the state file goes (None: the endpoints'
    cache_dir; without either the agent keeps no state and cannot start during an outage). backoff, clock and rng
    are injectable for tests.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        task: str,
        alias: str,
        *,
        device: str | None = None,
        runtime: Runtime = "numpy",
        top_k: int = DEFAULT_TOP_K,
        heartbeat_s: float | None = None,
        state_dir: str | Path | None = None,
        identity: str | None = None,
        backoff: Backoff = Backoff(),
        healthy_after_s: float = HEALTHY_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not task or not alias:
            raise InvalidArgumentError("an agent needs a task and an alias to follow")
        if heartbeat_s is not None and not heartbeat_s > 0:
            raise InvalidArgumentError(f"heartbeat_s must be positive, got {heartbeat_s!r}")
        self.task, self.alias, self.runtime = task, alias, runtime
        self.device = device if device is not None else ("" if endpoints.registry_token else platform.node())
        self.identity = identity or agent_identity()
        self._endpoints, self._top_k = endpoints, top_k
        self._heartbeat_s = heartbeat_s
        directory = state_dir if state_dir is not None else endpoints.cache_dir
        self.state_file = state_path(directory, task, alias) if directory else None
        self._blobs = BlobCache(Path(endpoints.cache_dir).expanduser()) if endpoints.cache_dir else None
        self._backoff, self._healthy_after_s, self._clock = backoff, healthy_after_s, clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()  # guards the fields below that the threads and status() share
        self._revision = 0
        self._connected = False
        self._skip = 0  # a refused version, not tried again until an event names another version
        self._rejected: tuple[int, str] = (0, "")  # the last refusal, reported until a swap succeeds
        self._heartbeats = 0
        self._changes: list[AgentChange] = []
        self._watch: AliasWatch | None = None
        self._stopping = threading.Event()
        self._report_now = threading.Event()
        self._threads: list[threading.Thread] = []
        self._registry: RegistryClient | None = None
        self._predictor: Predictor | None = None

    # ---- life cycle

    def start(self) -> Agent:
        """Load the weights to start with (the registry's choice, else the state file) and start following."""
        if self._registry is not None:
            raise InvalidArgumentError("this agent was started already")
        self._registry = self._endpoints.registry_client()
        try:
            stream, loaded = self._first_weights()
            self._predictor = Predictor(self._endpoints, self.task, alias=self.alias, runtime=self.runtime,
                                        top_k=self._top_k, loaded=loaded)  # fmt: skip
        except BaseException:
            self._registry.close()
            raise
        self._threads = [
            threading.Thread(target=self._follow, args=(stream,), name=f"agent-watch-{self.task}", daemon=True),
            threading.Thread(target=self._beat, name=f"agent-heartbeat-{self.task}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop following (the weights stay loaded until close)."""
        self._stopping.set()
        self._report_now.set()
        with self._lock:
            watch = self._watch
        if watch is not None:
            watch.cancel()
        for thread in self._threads:
            thread.join(_JOIN_TIMEOUT_S)

    def close(self) -> None:
        self.stop()
        if self._predictor is not None:
            self._predictor.close()
        if self._registry is not None:
            self._registry.close()

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- predictions

    @property
    def predictor(self) -> Predictor:
        if self._predictor is None:
            raise InvalidArgumentError("start() the agent first")
        return self._predictor

    def predict(self, image: bytes, item_id: str = "") -> Prediction:
        return self.predictor.predict(image, item_id)

    def predict_file(self, path: str | Path) -> Prediction:
        return self.predictor.predict_file(path)

    @property
    def version(self) -> int:
        """The version in use."""
        return self.predictor.loaded.version.number

    def status(self) -> AgentStatus:
        with self._lock:
            return AgentStatus(self.version if self._predictor else 0, self._revision, self._connected,
                               *self._rejected, self._heartbeats, tuple(self._changes))  # fmt: skip

    def wait_for(self, condition: Callable[[AgentStatus], bool], timeout_s: float) -> AgentStatus:
        """Poll status() until `condition` holds (TimeoutError after timeout_s): for scripts and tests."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if condition(status):
                return status
            if time.monotonic() >= deadline:
                raise TimeoutError(f"agent of {self.task}@{self.alias} did not get there in {timeout_s:g} s: {status}")
            time.sleep(0.02)

    # ---- start-up

    def _first_weights(self) -> tuple[Iterator[AliasEvent] | None, LoadedVersion]:
        """(the open watch stream, or None, and the weights to start with)."""
        assert self._registry is not None
        saved = read_state(self.state_file, self.task, self.alias) if self.state_file else None
        started = self._clock()
        stream: Iterator[AliasEvent] | None = None
        try:
            watch = self._registry.watch_alias(self.task, self.alias, device=self.device)
            with self._lock:
                self._watch = watch
            stream = iter(watch)
            first = next(stream)
        except MistError as error:
            if not _retry_later(error) or saved is None:
                raise
            log.warning("registry unreachable (%s): starting from the saved version %d", error, saved.version)
            return None, self._from_state(saved, started)
        except StopIteration:
            raise UnavailableError("the registry ended the watch stream before its first event") from None
        with self._lock:
            self._connected = True
        if first.version == 0:
            raise InvalidArgumentError(f"alias {self.alias!r} of task {self.task!r} points at no version")
        try:
            loaded = validate_version(self._registry, self.task, first.version, self.runtime)
        except MistError as error:
            if saved is None or saved.version == first.version:
                raise
            if isinstance(error, VersionRejected):
                self._refuse(error, first.revision, started)
            else:
                log.warning("could not fetch version %d (%s): starting from the saved one", first.version, error)
            return stream, self._from_state(saved, started)
        with self._lock:
            self._revision = first.revision
        self._record(AgentChange("start", loaded.version.number, 0, first.revision, self._clock() - started,
                                 self._clock(), "registry"))  # fmt: skip
        self._save(loaded)
        log.info("following %s@%s as device %r: version %d", self.task, self.alias, self.device, first.version)
        return stream, loaded

    def _from_state(self, saved: AgentState, started: float) -> LoadedVersion:
        if self._blobs is None:
            raise UnavailableError("the registry is unreachable and the weights cache is in memory only")
        try:
            loaded = load_saved(saved, self._blobs, self.runtime)
        except MistError as error:
            raise UnavailableError(
                f"the registry is unreachable and the saved version {saved.version} cannot be loaded: {error}"
            ) from error
        self._record(AgentChange("start", saved.version, 0, 0, self._clock() - started, self._clock(), "state file"))
        return loaded

    # ---- following the alias

    def _follow(self, stream: Iterator[AliasEvent] | None) -> None:
        attempt = 0
        while not self._stopping.is_set():
            opened, healthy = self._clock(), False
            try:
                if stream is None:
                    assert self._registry is not None
                    watch = self._registry.watch_alias(self.task, self.alias, since_revision=self._revision,
                                                       device=self.device)  # fmt: skip
                    with self._lock:
                        self._watch = watch
                    if self._stopping.is_set():
                        break
                    stream = iter(watch)
                for event in stream:
                    if not healthy:
                        healthy = True
                        with self._lock:
                            reconnected = not self._connected
                            self._connected = True
                        if reconnected:
                            log.info("watching %s@%s again (revision %d)", self.task, self.alias, event.revision)
                            self._report_now.set()
                    self._handle(event)
                    if self._stopping.is_set():
                        break
            except MistError as error:
                if self._stopping.is_set():
                    break
                level = logging.WARNING if attempt == 0 else logging.DEBUG
                log.log(level, "watch of %s@%s ended: %s; reconnecting", self.task, self.alias, error)
            except Exception:  # a bug here must not end the following: log it and reconnect
                log.exception("agent of %s@%s failed; reconnecting", self.task, self.alias)
            finally:
                with self._lock:
                    watch, self._watch, self._connected = self._watch, None, False
                if watch is not None:
                    watch.cancel()
                stream = None
            if healthy or self._clock() - opened >= self._healthy_after_s:
                attempt = 0
            self._stopping.wait(self._backoff.delay(attempt, self._rng))
            attempt += 1

    def _handle(self, event: AliasEvent) -> None:
        """One event: swap, refuse or ignore; transient errors propagate (the stream is reopened at this event)."""
        current = self.version
        with self._lock:
            skipped = self._skip
        if event.replay_pending:  # a reconnect replays what it missed: only the last of those moves is run
            log.debug("revision %d (version %d) superseded by %d more replayed move(s)", event.revision,
                      event.version, event.replay_pending)  # fmt: skip
        elif event.version == 0:
            log.warning("alias %s of %s was deleted: keeping version %d", self.alias, self.task, current)
        elif event.version == skipped:
            log.debug("version %d was refused already; waiting for the alias to move", skipped)
        elif event.version != current:
            self._switch(event, current)
        else:  # the alias is back on the version in use: a refused one may be tried again when named next
            with self._lock:
                self._skip = 0
        with self._lock:
            self._revision = max(self._revision, event.revision)

    def _switch(self, event: AliasEvent, current: int) -> None:
        assert self._registry is not None and self._predictor is not None
        started = self._clock()
        try:
            candidate = validate_version(self._registry, self.task, event.version, self.runtime)
        except VersionRejected as refused:
            self._refuse(refused, event.revision, started)
            self._keep_cached(self._predictor.loaded)
            return
        self._predictor.swap(candidate)
        done = self._clock()
        with self._lock:
            self._skip, self._rejected = 0, (0, "")
        self._record(AgentChange("swap", event.version, current, event.revision, done - started, done))
        log.info("%s@%s: version %d -> %d (revision %d) in %.0f ms", self.task, self.alias, current,
                 event.version, event.revision, (done - started) * 1000)  # fmt: skip
        self._save(candidate)
        self._report_now.set()

    def _refuse(self, refused: VersionRejected, revision: int, started: float) -> None:
        with self._lock:
            self._skip, self._rejected = refused.version, (refused.version, refused.reason)
        in_use = self._predictor.loaded.version.number if self._predictor else 0
        self._record(AgentChange("reject", refused.version, in_use, revision, self._clock() - started,
                                 self._clock(), refused.reason))  # fmt: skip
        log.warning("%s@%s: refused version %d (%s)%s", self.task, self.alias, refused.version, refused.reason,
                    f"; keeping version {in_use}" if in_use else "")  # fmt: skip
        self._report_now.set()

    def _record(self, change: AgentChange) -> None:
        with self._lock:
            self._changes.append(change)

    def _save(self, loaded: LoadedVersion) -> None:
        if self.state_file is None:
            return
        try:
            save_state(self.state_file, AgentState.of(loaded, self.alias))
        except OSError as error:  # a full or read-only disk costs the restart-in-an-outage, not the predictions
            log.warning("could not save the agent state %s: %s", self.state_file, error)

    def _keep_cached(self, loaded: LoadedVersion) -> None:
        """Mark the weights in use as the most recently used blob, so that pulls of refused versions (each put in
        the cache) never evict them: the cache keeps 4 blobs, least recently used first out."""
        if self._blobs is not None:
            self._blobs.get(loaded.version.sha256)

    # ---- heartbeats

    def _beat(self) -> None:
        assert self._registry is not None
        interval: float = self._heartbeat_s or 30.0
        while not self._stopping.is_set():
            self._report_now.clear()
            with self._lock:
                rejected_version, rejected_reason = self._rejected
            try:
                told = self._registry.report_device(
                    self.task, device=self.device, alias=self.alias, version=self.version,
                    rejected_version=rejected_version, rejected_reason=rejected_reason, agent=self.identity,
                )  # fmt: skip
            except MistError as error:
                log.debug("heartbeat of %s@%s failed: %s", self.task, self.alias, error)
            else:
                interval = self._heartbeat_s or told or interval
                with self._lock:
                    self._heartbeats += 1
            self._report_now.wait(interval)


def _retry_later(error: MistError) -> bool:
    """Whether a failure to reach the registry at start-up lets the agent start from its state file: the registry
    or the link is away (not: an unknown task or alias, a token refused)."""
    return error.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNKNOWN", "INTERNAL")
