"""Every conversion between the registry's records (services/registry/records.py) and its protobuf messages.

The servicer and RegistryClient call these, and nothing else touches both worlds; `*_from_proto` only reshapes,
the store validates (so a bad field is INVALID_ARGUMENT with the store's message, whichever way it arrived).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import InvalidArgumentError
from services.common.pb import feature_pb2, registry_pb2
from services.common.wire.codec import CodecConfig
from services.common.wire.edge_spec import EdgeNetworkConfig
from services.common.wire.gather_modes import mode_from_proto, mode_to_proto
from services.registry.records import (
    DEFAULT_IGNORE_INDEX,
    Alias,
    AliasEvent,
    AliasMove,
    DeviceRecord,
    FleetView,
    Rollout,
    ScopeName,
    SegmentationSpec,
    Task,
    Version,
)

log = logging.getLogger(__name__)

_SCOPE_FROM_PROTO: Mapping[int, ScopeName] = {
    registry_pb2.TOKEN_SCOPE_READ: "read",
    registry_pb2.TOKEN_SCOPE_READ_WRITE: "read_write",
}


def timestamp_to_proto(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def timestamp_from_proto(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=timezone.utc)


# ---- tasks ---------------------------------------------------------------------------------------------


def _codec_to_proto(name: str) -> feature_pb2.CodecSpec:
    try:
        return CodecConfig.parse(name).to_proto()
    except InvalidArgumentError:
        # Tasks written straight into the store may carry a free-form codec label; an unset spec (the
        # server default) keeps them listable instead of failing every ListTasks page.
        log.warning("task codec %r is not a codec name; sent as an unset CodecSpec", name[:80])
        return feature_pb2.CodecSpec()


def task_to_proto(task: Task) -> registry_pb2.Task:
    return registry_pb2.Task(
        name=task.name,
        backbone=feature_pb2.BackboneId(name=task.backbone_name, weights_fingerprint=task.backbone_fingerprint),
        mode=mode_to_proto(task.gather_mode),
        k=task.k,
        codec=_codec_to_proto(task.codec),
        class_names=list(task.class_names),
        edge=task.edge_config().to_proto(),
        description=task.description,
        created_at=timestamp_to_proto(task.created_at),
        latest_version=task.latest_version,
        kind=task.kind,
        segmentation=_segmentation_to_proto(task.segmentation),
    )


def _segmentation_to_proto(spec: SegmentationSpec | None) -> registry_pb2.SegmentationSpec | None:
    if spec is None:
        return None
    return registry_pb2.SegmentationSpec(
        ignore_index=spec.ignore_index, input_size=spec.input_size, label_size=spec.label_size
    )


def _segmentation_from_proto(message: registry_pb2.Task) -> SegmentationSpec | None:
    """The spec when the Task carries one; a zero ignore_index (unset in proto3) is the default 255, since 0 is
    always a class id and never a valid ignore index."""
    if not message.HasField("segmentation"):
        return None
    spec = message.segmentation
    return SegmentationSpec(
        ignore_index=spec.ignore_index or DEFAULT_IGNORE_INDEX, input_size=spec.input_size, label_size=spec.label_size
    )


def task_from_proto(message: registry_pb2.Task) -> Task:
    """The record of a Task message: a CreateTask definition (the store sets created_at and latest_version) or a
    server's answer (the client keeps them). Zero edge-network settings take their defaults, a zero num_classes
    is the class count, an empty kind is "classification".
    """
    classes = tuple(message.class_names)
    edge = EdgeNetworkConfig.from_proto(message.edge, num_classes=len(classes) or None)
    return Task(
        name=message.name,
        backbone_name=message.backbone.name,
        backbone_fingerprint=message.backbone.weights_fingerprint,
        gather_mode=mode_from_proto(message.mode),
        k=message.k,
        codec=CodecConfig.from_proto(message.codec).name,
        class_names=classes,
        edge=edge.to_dict(),
        description=message.description,
        created_at=timestamp_from_proto(message.created_at) if message.HasField("created_at") else None,
        latest_version=message.latest_version,
        kind=message.kind or "classification",  # type: ignore[arg-type]  # any other string: the store refuses it
        segmentation=_segmentation_from_proto(message),
    )


# ---- versions ------------------------------------------------------------------------------------------


def version_to_proto(version: Version) -> registry_pb2.Version:
    return registry_pb2.Version(
        task=version.task,
        number=version.number,
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        metrics=version.metrics,
        details_json=version.details_json,
        lineage=registry_pb2.Lineage(
            parent_version=version.parent_version,
            dataset_fingerprint=version.dataset_fingerprint,
            pushed_by=version.pushed_by,
            tuner=version.tuner,
            created_at=timestamp_to_proto(version.created_at),
        ),
        tags=version.tags,
    )


def version_from_proto(message: registry_pb2.Version) -> Version:
    """The record of a Version message (parameter_count does not travel: it is 0 here)."""
    return Version(
        task=message.task,
        number=message.number,
        sha256=message.sha256,
        size_bytes=message.size_bytes,
        metrics=dict(message.metrics),
        details_json=message.details_json,
        parent_version=message.lineage.parent_version,
        dataset_fingerprint=message.lineage.dataset_fingerprint,
        pushed_by=message.lineage.pushed_by,
        tuner=message.lineage.tuner,
        created_at=timestamp_from_proto(message.lineage.created_at),
        tags=dict(message.tags),
    )


def version_ref_from_proto(ref: registry_pb2.VersionRef) -> tuple[int | None, str | None]:
    """(number, alias) for store.get_version: (None, None) means the latest, as does an unset ref.

    number 0 is passed on (not read as "latest"), so the store refuses it with INVALID_ARGUMENT.
    """
    which = ref.WhichOneof("ref")
    if which == "number":
        return ref.number, None
    if which == "alias":
        return None, ref.alias
    if which == "latest" and not ref.latest:
        raise InvalidArgumentError("VersionRef.latest must be true when set (leave ref unset for the latest)")
    return None, None


def push_arguments(header: registry_pb2.PushHeader) -> dict[str, Any]:
    """Keyword arguments of store.push_version from a push header (blob and pushed_by come separately)."""
    return {
        "parent_version": header.parent_version,
        "force": header.force,
        "declared_sha256": header.sha256,
        "declared_size": header.size_bytes or None,  # 0: not declared (no valid blob is empty)
        "metrics": dict(header.metrics),
        "details_json": header.details_json,
        "dataset_fingerprint": header.dataset_fingerprint,
        "tuner": header.tuner,
        "tags": dict(header.tags),
    }


# ---- aliases -------------------------------------------------------------------------------------------


def rollout_to_proto(rollout: Rollout | None) -> registry_pb2.Rollout | None:
    if rollout is None:
        return None
    return registry_pb2.Rollout(
        version=rollout.version, percent=rollout.percent, started_at=timestamp_to_proto(rollout.started_at)
    )


def rollout_from_proto(message: registry_pb2.Rollout, present: bool) -> Rollout | None:
    if not present or not message.version:
        return None
    return Rollout(message.version, message.percent, timestamp_from_proto(message.started_at))


def alias_to_proto(alias: Alias) -> registry_pb2.Alias:
    return registry_pb2.Alias(
        task=alias.task,
        name=alias.name,
        version=alias.version,
        updated_at=timestamp_to_proto(alias.updated_at),
        updated_by=alias.updated_by,
        rollout=rollout_to_proto(alias.rollout),
        revision=alias.revision,
    )


def alias_from_proto(message: registry_pb2.Alias) -> Alias:
    return Alias(
        task=message.task,
        name=message.name,
        version=message.version,
        updated_at=timestamp_from_proto(message.updated_at),
        updated_by=message.updated_by,
        rollout=rollout_from_proto(message.rollout, message.HasField("rollout")),
        revision=message.revision,
    )


def alias_move_to_proto(move: AliasMove) -> registry_pb2.AliasMove:
    return registry_pb2.AliasMove(
        task=move.task,
        name=move.name,
        from_version=move.from_version,
        to_version=move.to_version,
        moved_at=timestamp_to_proto(move.moved_at),
        moved_by=move.moved_by,
        rollout_version=move.rollout_version,
        rollout_percent=move.rollout_percent,
        revision=move.revision,
    )


def alias_move_from_proto(message: registry_pb2.AliasMove) -> AliasMove:
    return AliasMove(
        task=message.task,
        name=message.name,
        from_version=message.from_version,
        to_version=message.to_version,
        moved_at=timestamp_from_proto(message.moved_at),
        moved_by=message.moved_by,
        rollout_version=message.rollout_version,
        rollout_percent=message.rollout_percent,
        revision=message.revision,
    )


def alias_event(alias: Alias, device: str, *, current: bool, pending: int = 0) -> registry_pb2.AliasEvent:
    """What a watching `device` is told about the alias in this state (after a move, or as it stands)."""
    in_share = alias.rollout is not None and alias.version_for(device) == alias.rollout.version
    return registry_pb2.AliasEvent(
        revision=alias.revision,
        version=alias.version_for(device) if alias.version else 0,
        stable_version=alias.version,
        rollout=rollout_to_proto(alias.rollout),
        in_rollout=in_share,
        current=current,
        moved_at=timestamp_to_proto(alias.updated_at),
        moved_by=alias.updated_by,
        replay_pending=pending,
    )


def alias_event_from_proto(task: str, alias: str, message: registry_pb2.AliasEvent) -> AliasEvent:
    return AliasEvent(
        task=task,
        alias=alias,
        revision=message.revision,
        version=message.version,
        stable_version=message.stable_version,
        rollout=rollout_from_proto(message.rollout, message.HasField("rollout")),
        in_rollout=message.in_rollout,
        current=message.current,
        moved_at=timestamp_from_proto(message.moved_at),
        moved_by=message.moved_by,
        replay_pending=message.replay_pending,
    )


def fleet_from_proto(message: registry_pb2.Fleet) -> FleetView:
    devices = tuple(
        (
            DeviceRecord(message.task, d.device, d.alias, d.version, d.rejected_version, d.rejected_reason, d.agent,
                         timestamp_from_proto(d.last_seen)),
            d.stale,
        )
        for d in message.devices
    )  # fmt: skip
    return FleetView(
        task=message.task,
        versions=tuple((v.version, v.devices, v.stale) for v in message.versions),
        devices=devices,
        aliases=tuple(alias_from_proto(a) for a in message.aliases),
        watchers=message.watchers,
    )


def device_to_proto(device: DeviceRecord, *, stale: bool) -> registry_pb2.FleetDevice:
    return registry_pb2.FleetDevice(
        device=device.device,
        alias=device.alias,
        version=device.version,
        rejected_version=device.rejected_version,
        rejected_reason=device.rejected_reason,
        last_seen=timestamp_to_proto(device.reported_at),
        stale=stale,
        agent=device.agent,
    )


def expected_version(has_expected: bool, expected: int) -> int | None:
    """The compare-and-set argument of SetAlias / DeleteAlias: None unless has_expected_version is set."""
    return expected if has_expected else None


# ---- tokens --------------------------------------------------------------------------------------------


def scope_from_proto(value: int) -> ScopeName:
    """read or read_write; TOKEN_SCOPE_UNSPECIFIED and unknown values are INVALID_ARGUMENT."""
    scope = _SCOPE_FROM_PROTO.get(value)
    if scope is None:
        raise InvalidArgumentError("token scope must be TOKEN_SCOPE_READ or TOKEN_SCOPE_READ_WRITE")
    return scope
