"""The registry's domain records (frozen dataclasses), the checks on what users may put in them, page tokens.

    task = normalize_task(Task(name="cats", ...))   # every user-set field checked, edge defaults filled in
    normalize_task(Task(..., kind="segmentation", segmentation=SegmentationSpec(input_size=512, label_size=128)))
    check_name("alias", "production")               # InvalidArgumentError unless [a-z0-9][a-z0-9._-]{0,62}

The store returns these records and the servicer converts them with serde; nothing here touches a database.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar, get_args

from services.common.errors import InvalidArgumentError
from services.common.wire.edge_spec import EdgeNetworkConfig
from services.common.wire.gather_modes import BackboneId, GatherModeName, check_mode

ScopeName = Literal["admin", "read", "read_write"]
SCOPES: tuple[ScopeName, ...] = get_args(ScopeName)
# What a task's edge network predicts: one label per image, or one per pixel (its edge pooling is "dense").
TaskKind = Literal["classification", "segmentation"]
TASK_KINDS: tuple[TaskKind, ...] = get_args(TaskKind)

# Lowercase so names survive case-insensitive file systems and URLs; 63 chars like a DNS label.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# "latest" would shadow the VersionRef.latest choice, so no alias may take it.
RESERVED_ALIASES = frozenset({"latest"})
# Limits on free-form fields: generous for real use, small enough that one row stays cheap to read.
MAX_TEXT_CHARS = 1024  # description, fingerprints, tuner identity, pushed_by, codec, backbone fields
MAX_CLASSES = 100_000  # same bound as edge_spec.MAX_NUM_CLASSES
MAX_DETAILS_JSON_BYTES = 1 << 20  # per-class accuracy and a confusion matrix of a few hundred classes fit
MAX_MAP_ENTRIES = 256  # metrics and tags per version
MAX_KEY_CHARS = 128  # metric and tag keys
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_PAGE_TOKEN_CHARS = 512
# Segmentation masks are uint8 class-id images, so the ignore index and every class id fit in 0..255.
DEFAULT_IGNORE_INDEX = 255
MAX_MASK_VALUE = 255
MIN_INPUT_SIZE = 32  # pixels: a 2 x 2 token grid at patch 16; a smaller image leaves nothing to segment
MAX_INPUT_SIZE = 8192  # pixels: edge_spec.MAX_TOKENS bounds the tokens anyway; this bounds label grids

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class SegmentationSpec:
    """What a segmentation task's labels are; class ids are the indices of the task's class_names (0 .. C-1)."""

    ignore_index: int = DEFAULT_IGNORE_INDEX  # mask value neither trained on nor scored: in [C, 255]
    input_size: int  # side in pixels of the square the extractor squashes every image to
    label_size: int  # side of the square label grid that training and evaluation score (<= input_size)

    def to_dict(self) -> dict[str, int]:
        """JSON-friendly form, as stored in the registry database."""
        return {"ignore_index": self.ignore_index, "input_size": self.input_size, "label_size": self.label_size}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SegmentationSpec:
        """Strict inverse of to_dict: unknown or missing keys (but ignore_index, default 255) are errors."""
        if not isinstance(data, Mapping):
            raise InvalidArgumentError(f"segmentation spec must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"ignore_index", "input_size", "label_size"})
        missing = sorted({"input_size", "label_size"} - set(data))
        if unknown or missing:
            raise InvalidArgumentError(f"segmentation spec has unknown keys {unknown} or lacks keys {missing}")
        return cls(**data)


@dataclass(frozen=True)
class Task:
    """One tuning task: which backbone features it trains on and the edge network it trains."""

    name: str  # unique, NAME_PATTERN
    backbone_name: str  # timm model name, e.g. "vit_base_patch16_224"
    backbone_fingerprint: str  # sha256 hex of the backbone weights, or "random-<seed>"
    gather_mode: GatherModeName  # "mist", "lst", "last", "partial" or "cls"
    k: int  # blocks summed by the MIST gather (>= 1); 0 for the other modes
    codec: str  # name of the feature codec the task was tuned on, e.g. "i8+zstd"
    class_names: tuple[str, ...]  # index -> label, as the classifier head orders its outputs
    edge: dict[str, Any]  # EdgeNetworkConfig.to_dict(): defaults filled in by normalize_task
    description: str = ""  # free text for people
    created_at: datetime | None = None  # set by the store (UTC)
    latest_version: int = 0  # highest live version; 0 before the first push; set by the store
    kind: TaskKind = "classification"  # "segmentation": per-pixel labels, dense edge pooling
    segmentation: SegmentationSpec | None = None  # set exactly when kind is "segmentation"

    def edge_config(self) -> EdgeNetworkConfig:
        return EdgeNetworkConfig.from_dict(self.edge)

    @property
    def backbone(self) -> BackboneId:
        return BackboneId(self.backbone_name, self.backbone_fingerprint)

    def same_definition(self, other: Task) -> bool:
        """Equal in everything a user chose (not in created_at and latest_version, which the store sets)."""
        mine = replace(self, created_at=None, latest_version=0)
        return mine == replace(other, created_at=None, latest_version=0)


@dataclass(frozen=True)
class Version:
    """One immutable, numbered set of edge-network weights of a task, with its metrics and lineage."""

    task: str  # task name
    number: int  # 1, 2, 3 ... per task; never reused, even after a delete
    sha256: str  # lowercase hex of the safetensors blob
    size_bytes: int  # length of the blob
    metrics: dict[str, float]  # e.g. val_accuracy, loss, epochs, samples (finite floats)
    details_json: str  # structured results as JSON text; "" when none
    parent_version: int  # the version this one was tuned from; 0 = from scratch
    dataset_fingerprint: str  # sha256 over the training images and labels; "" when unknown
    pushed_by: str  # token name, or "anonymous" when auth is off
    tuner: str  # tuner identity, e.g. "mist-tuner/0.1.0 host-a"
    created_at: datetime  # when the push was committed (UTC)
    tags: dict[str, str] = field(default_factory=dict)  # free-form labels
    parameter_count: int = 0  # elements over all tensors of the blob


@dataclass(frozen=True)
class Rollout:
    """A staged rollout in progress: `version` for `percent` % of the task's devices (in_rollout decides which)."""

    version: int
    percent: int  # 1..99
    started_at: datetime  # UTC


@dataclass(frozen=True)
class Alias:
    """A mutable name (e.g. "production") pointing at one live version of a task."""

    task: str
    name: str  # NAME_PATTERN, not "latest"
    version: int  # the version it points at
    updated_at: datetime  # last move (UTC)
    updated_by: str  # who made the last move
    rollout: Rollout | None = None  # a staged rollout of another version, when one is in progress
    revision: int = 0  # of its last move (AliasMove.revision); 0 when unknown

    def version_for(self, device: str) -> int:
        """The version `device` should run: the rollout's when the device is in its share, else the alias's."""
        if self.rollout is not None and in_rollout(self.task, self.name, self.rollout.version, device,
                                                   self.rollout.percent):  # fmt: skip
            return self.rollout.version
        return self.version


def in_rollout(task: str, alias: str, version: int, device: str, percent: int) -> bool:
    """Whether `device` is in a rollout of `version` at `percent` %: a stable hash of (task, alias, version, device)
    in 10,000 buckets, so widening a rollout keeps every device already in it, and each rollout samples anew.
    A device without a name is in no partial rollout."""
    if percent >= 100:
        return True
    if percent <= 0 or not device:
        return False
    digest = hashlib.sha256(f"{task}\0{alias}\0{version}\0{device}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < percent * 100


@dataclass(frozen=True)
class AliasUpdate:
    """What a set_alias did: the alias as it now stands, and whether it moved (False: it already pointed there)."""

    alias: Alias
    moved: bool  # True: a move was recorded in the alias history


@dataclass(frozen=True)
class AliasMove:
    """One entry of an alias's history; a rollback is set_alias(..., move.from_version)."""

    task: str
    name: str
    from_version: int  # 0: the alias was created by this move
    to_version: int  # 0: the alias was deleted by this move
    moved_at: datetime  # UTC
    moved_by: str
    rollout_version: int = 0  # the staged rollout after this move (0: none)
    rollout_percent: int = 0
    revision: int = 0  # the move's id: increases with every move of the task's aliases, in commit order

    @property
    def alias(self) -> Alias:
        """The alias as this move left it (for a watcher); version 0 when the move deleted it."""
        rollout = Rollout(self.rollout_version, self.rollout_percent, self.moved_at) if self.rollout_version else None
        return Alias(self.task, self.name, self.to_version, self.moved_at, self.moved_by, rollout, self.revision)


@dataclass(frozen=True)
class AliasEvent:
    """One step of an alias as a watching device sees it (RegistryClient.watch_alias)."""

    task: str
    alias: str
    revision: int  # of the move this follows; a reconnecting watcher passes the last one it got
    version: int  # what this device should run now; 0: the alias was deleted (keep what you have)
    stable_version: int  # the alias's own version
    rollout: Rollout | None  # a staged rollout in progress
    in_rollout: bool  # this device is in the rollout's share
    current: bool  # the state when the stream started, not a move
    moved_at: datetime
    moved_by: str
    replay_pending: int = 0  # replayed moves still to come right after this one (act on the last: 0)


@dataclass(frozen=True)
class FleetView:
    """`mist registry fleet TASK`: who runs what."""

    task: str
    versions: tuple[tuple[int, int, int], ...]  # (version, fresh devices, stale devices), by version
    devices: tuple[tuple[DeviceRecord, bool], ...]  # (last report, stale), by name
    aliases: tuple[Alias, ...]
    watchers: int  # open watch streams on the replica that answered


@dataclass(frozen=True)
class DeviceRecord:
    """The last report of one device of a task (its name is its token's name when auth is on)."""

    task: str
    device: str
    alias: str  # what it follows ("" for a fixed version)
    version: int  # in use (0: none yet)
    rejected_version: int  # the last version that failed its checks (0: none)
    rejected_reason: str
    agent: str
    reported_at: datetime  # UTC


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to and what it may do."""

    name: str  # token name ("admin" for the configured admin token)
    task: str | None  # the only task the token reaches; None for admin
    scope: ScopeName  # "admin" (everything), "read" (get, list, pull), "read_write" (and push, alias, delete)

    def allows(self, task: str, *, write: bool) -> bool:
        if self.scope == "admin":
            return True
        return self.task == task and (self.scope == "read_write" or not write)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; pass next_page_token back for the next one ("" = no more)."""

    items: list[T]
    next_page_token: str


@dataclass(frozen=True)
class RegistryStats:
    """Gauges for /metrics."""

    tasks: int  # number of tasks
    versions_by_task: dict[str, int]  # live versions per task (tasks without versions included, as 0)
    bytes_stored: int  # total size of the live blobs
    aliases: int  # number of aliases over all tasks
    # (task, version, "fresh" | "stale") -> devices whose last report names that version
    devices: dict[tuple[str, int, str], int] = field(default_factory=dict)
    rollouts: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)  # (task, alias) -> (version, %)


def check_name(kind: str, value: object) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise InvalidArgumentError(
            f"{kind} name must match [a-z0-9][a-z0-9._-]{{0,62}} (lowercase, at most 63 chars), got {value!r:.80}"
        )
    return value


def _check_text(label: str, value: object, *, required: bool = False) -> None:
    if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS or (required and not value):
        need = "a non-empty string" if required else "a string"
        raise InvalidArgumentError(f"{label} must be {need} of at most {MAX_TEXT_CHARS} chars, got {value!r:.80}")


def normalize_task(task: Task) -> Task:
    """Checks every field a user set; returns the task with edge defaults filled and class_names a tuple."""
    check_name("task", task.name)
    _check_text("backbone name", task.backbone_name, required=True)
    _check_text("backbone weights fingerprint", task.backbone_fingerprint, required=True)
    mode = check_mode(task.gather_mode)
    if not isinstance(task.k, int) or isinstance(task.k, bool) or task.k < (1 if mode == "mist" else 0):
        raise InvalidArgumentError(f"k must be an integer >= 1 for the mist gather (>= 0 otherwise), got {task.k!r}")
    _check_text("codec", task.codec)
    _check_text("description", task.description)
    classes = tuple(task.class_names)
    if not all(isinstance(c, str) and c and len(c) <= MAX_TEXT_CHARS for c in classes):
        raise InvalidArgumentError("class names must be non-empty strings")
    if len(set(classes)) != len(classes) or not 2 <= len(classes) <= MAX_CLASSES:
        raise InvalidArgumentError(f"a task needs 2 to {MAX_CLASSES} distinct class names, got {len(classes)}")
    config = EdgeNetworkConfig.from_dict(task.edge)
    if config.num_classes != len(classes):
        raise InvalidArgumentError(
            f"edge network num_classes is {config.num_classes} but the task has {len(classes)} class names"
        )
    _check_kind(task, mode, config)
    return replace(task, gather_mode=mode, class_names=classes, edge=config.to_dict())


def _check_kind(task: Task, mode: GatherModeName, config: EdgeNetworkConfig) -> None:
    """The task kind agrees with its segmentation spec, its edge pooling and its gather."""
    if task.kind not in TASK_KINDS:
        raise InvalidArgumentError(f"task kind must be one of {TASK_KINDS}, got {task.kind!r:.80}")
    if task.kind == "classification":
        if task.segmentation is not None:
            raise InvalidArgumentError("a classification task takes no segmentation spec (set kind 'segmentation')")
        if config.dense:
            raise InvalidArgumentError(
                "edge network pooling 'dense' classifies every token: it is for segmentation tasks only"
            )
        return
    if not isinstance(task.segmentation, SegmentationSpec):
        raise InvalidArgumentError("a segmentation task needs a segmentation spec (ignore index, input and label size)")
    if not config.dense:
        raise InvalidArgumentError(
            f"a segmentation task's edge network needs pooling 'dense' (one prediction per token), got {config.pooling!r}"
        )
    if mode != "mist":
        raise InvalidArgumentError(f"a segmentation task needs the mist gather (every token kept), got {mode!r}")
    _check_segmentation_spec(task.segmentation, len(task.class_names))


def _check_segmentation_spec(spec: SegmentationSpec, num_classes: int) -> None:
    for label, value in (("ignore_index", spec.ignore_index), ("input_size", spec.input_size),
                         ("label_size", spec.label_size)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidArgumentError(f"segmentation {label} must be an integer, got {value!r:.40}")
    if num_classes > MAX_MASK_VALUE:
        raise InvalidArgumentError(
            f"a segmentation task has at most {MAX_MASK_VALUE} classes (masks are uint8 and one value is the ignore "
            f"index), got {num_classes}"
        )
    if not num_classes <= spec.ignore_index <= MAX_MASK_VALUE:
        raise InvalidArgumentError(
            f"segmentation ignore_index must be in [{num_classes}, {MAX_MASK_VALUE}] (class ids are 0..{num_classes - 1}"
            f" and masks are uint8), got {spec.ignore_index}"
        )
    if not MIN_INPUT_SIZE <= spec.input_size <= MAX_INPUT_SIZE:
        raise InvalidArgumentError(
            f"segmentation input_size must be in [{MIN_INPUT_SIZE}, {MAX_INPUT_SIZE}] pixels, got {spec.input_size}"
        )
    if not 1 <= spec.label_size <= spec.input_size:
        raise InvalidArgumentError(
            f"segmentation label_size must be in [1, input_size = {spec.input_size}], got {spec.label_size}"
        )


def _check_map(label: str, values: Mapping[str, Any], value_ok: Any) -> None:
    if not isinstance(values, Mapping) or len(values) > MAX_MAP_ENTRIES:
        raise InvalidArgumentError(f"{label} must be a mapping of at most {MAX_MAP_ENTRIES} entries")
    for key, value in values.items():
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS or not value_ok(value):
            raise InvalidArgumentError(f"{label} entry {key!r:.80}: {value!r:.80} is not allowed")


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_push_fields(
    metrics: Mapping[str, float],
    details_json: str,
    tags: Mapping[str, str],
    dataset_fingerprint: str,
    tuner: str,
    pushed_by: str,
) -> None:
    """Checks a push's metadata: finite metrics, string tags, details_json empty or a JSON document."""
    _check_map("metrics", metrics, _finite_number)
    _check_map("tags", tags, lambda v: isinstance(v, str) and len(v) <= MAX_TEXT_CHARS)
    for label, value in (("dataset fingerprint", dataset_fingerprint), ("tuner", tuner), ("pushed_by", pushed_by)):
        _check_text(label, value)
    if not isinstance(details_json, str) or len(details_json.encode()) > MAX_DETAILS_JSON_BYTES:
        raise InvalidArgumentError(f"details_json must be a string of at most {MAX_DETAILS_JSON_BYTES} bytes")
    if details_json:
        try:
            json.loads(details_json)
        except (ValueError, RecursionError) as error:
            raise InvalidArgumentError(f"details_json is not valid JSON: {str(error)[:200]}") from error


def check_count(label: str, value: object, *, minimum: int = 1) -> int:
    """An int in [minimum, 2**31) (version numbers, page sizes, limits), else InvalidArgumentError."""
    if not isinstance(value, int) or isinstance(value, bool) or not minimum <= value < 2**31:
        raise InvalidArgumentError(f"{label} must be an integer in [{minimum}, 2**31), got {value!r:.40}")
    return value


def page_size_or_default(page_size: int) -> int:
    """0 means the default; larger than MAX_PAGE_SIZE is clipped, not refused."""
    check_count("page_size", page_size, minimum=0)
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_page_token(kind: str, scope: str, after: str | int) -> str:
    """An opaque token for the page after `after` of listing `kind` within `scope` (e.g. a task name)."""
    raw = json.dumps([kind, scope, after], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, kind: str, scope: str, after_type: type) -> Any:
    """The position a page token carries; None for "" (first page); InvalidArgumentError if not ours."""
    if token == "":
        return None
    try:
        if not isinstance(token, str) or len(token) > MAX_PAGE_TOKEN_CHARS:
            raise ValueError("too long")
        decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        token_kind, token_scope, after = decoded
    except (ValueError, TypeError, binascii.Error) as error:
        raise InvalidArgumentError(
            f"page token {token!r:.60} is malformed; pass back next_page_token as given"
        ) from error
    if token_kind != kind or token_scope != scope or type(after) is not after_type:
        raise InvalidArgumentError(f"page token {token!r:.60} belongs to another listing")
    return after
