"""`mist registry ...`: the registry for people (tables) and scripts (`--json`), over RegistryClient.

    mist registry versions cats                      mist registry promote cats 7 --alias production
    mist registry export cats --alias production -o cats.safetensors

The connection flags are RegistryFlags (clients/settings.py), shared with `mist tune`. Exit codes: 0 done,
1 refused (one line `mist registry: error: CODE: message`), 2 usage. Reference: docs/reference/cli.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from services.common.clients.registry import RegistryClient
from services.common.clients.settings import JsonOutput, RegistryFlags
from services.common.config import ENV_EPILOG, ArgumentParser, add_arguments, config_from_args, parse_args
from services.common.errors import InvalidArgumentError, MistError, NotFoundError
from services.registry.records import Alias, AliasMove, Task, Version

PROG = "mist registry"
# Shown in `versions` when present, in this order; other metrics stay in --json and `task` details.
KEY_METRICS = ("val_accuracy", "test_accuracy", "val_miou", "test_miou", "loss")  # mIoU: segmentation tasks
SHA_PREFIX_CHARS = 12


class CliError(Exception):
    """A local failure (a file that cannot be written or read, a malformed variable): printed without a code."""


@dataclass(frozen=True)
class Output:
    """What a command prints: `data` as JSON with --json, else `text`."""

    data: Any
    text: str
    to_stderr: bool = False  # when stdout carries the payload itself (export -o -)


# ---- formatting ----------------------------------------------------------------------------------------


def _when(moment: datetime | None) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else ""


def _size(size_bytes: int) -> str:
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size_bytes} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _version_label(number: int) -> str:
    return str(number) if number else "-"


def format_table(columns: Sequence[tuple[str, str]], rows: Sequence[Mapping[str, Any]]) -> str:
    """Left-aligned columns (key, header) separated by two spaces; '(none)' under the header when empty."""
    cells = [[header for _, header in columns]] + [
        ["" if row[key] is None else str(row[key]) for key, _ in columns] for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in cells]
    return "\n".join(lines if rows else [*lines, "(none)"])


def task_dict(task: Task) -> dict[str, Any]:
    edge = task.edge_config()
    return {
        "name": task.name, "kind": task.kind, "description": task.description, "backbone": task.backbone_name,
        "backbone_fingerprint": task.backbone_fingerprint, "mode": task.gather_mode, "k": task.k, "codec": task.codec,
        "class_names": list(task.class_names),
        "edge": {"num_blocks": edge.num_blocks, "rank": edge.rank, "heads": edge.heads, "pooling": edge.pooling,
                 "dims": edge.dims, "tokens": edge.tokens, "num_classes": edge.num_classes},
        "segmentation": task.segmentation.to_dict() if task.segmentation else None,
        "latest_version": task.latest_version, "created_at": _when(task.created_at),
    }  # fmt: skip


def _kind_label(task: Mapping[str, Any]) -> str:
    """ "classification", or "segmentation (labels 128x128 of 512x512 px input, ignore index 255)"."""
    spec = task["segmentation"]
    if spec is None:
        return task["kind"]
    label, size = spec["label_size"], spec["input_size"]
    return f"{task['kind']} (labels {label}x{label} of {size}x{size} px input, ignore index {spec['ignore_index']})"


def version_dict(version: Version, aliases: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "task": version.task, "version": version.number, "created_at": _when(version.created_at),
        "sha256": version.sha256, "size_bytes": version.size_bytes, "metrics": dict(sorted(version.metrics.items())),
        "parent_version": version.parent_version, "pushed_by": version.pushed_by, "tuner": version.tuner,
        "dataset_fingerprint": version.dataset_fingerprint, "tags": dict(sorted(version.tags.items())),
        "aliases": list(aliases),
    }  # fmt: skip


def alias_dict(alias: Alias) -> dict[str, Any]:
    rollout = alias.rollout
    return {
        "task": alias.task,
        "alias": alias.name,
        "version": alias.version,
        "updated_at": _when(alias.updated_at),
        "updated_by": alias.updated_by,
        "rollout": {"version": rollout.version, "percent": rollout.percent, "started_at": _when(rollout.started_at)}
        if rollout
        else None,
        "revision": alias.revision,
    }


def move_dict(move: AliasMove) -> dict[str, Any]:
    return {
        "task": move.task,
        "alias": move.name,
        "from_version": move.from_version,
        "to_version": move.to_version,
        "moved_at": _when(move.moved_at),
        "moved_by": move.moved_by,
        "rollout_version": move.rollout_version,
        "rollout_percent": move.rollout_percent,
        "revision": move.revision,
    }


def _rollout_label(version: int, percent: int) -> str:
    return f"{version} at {percent}%" if version else ""


def _metric(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


# ---- commands ------------------------------------------------------------------------------------------


def cmd_tasks(client: RegistryClient, args: argparse.Namespace) -> Output:
    tasks = [task_dict(t) for t in client.list_tasks()]
    rows = [{**t, "classes": len(t["class_names"]), "latest": _version_label(t["latest_version"])} for t in tasks]
    columns = [
        ("name", "NAME"),
        ("kind", "KIND"),
        ("backbone", "BACKBONE"),
        ("mode", "MODE"),
        ("k", "K"),
        ("classes", "CLASSES"),
        ("latest", "LATEST"),
        ("created_at", "CREATED"),
    ]
    return Output(tasks, format_table(columns, rows))


def cmd_task(client: RegistryClient, args: argparse.Namespace) -> Output:
    task = task_dict(client.get_task(args.task))
    task["aliases"] = {a.name: a.version for a in client.list_aliases(args.task)}
    edge = task["edge"]
    classes = task["class_names"]
    shown = ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
    lines = {
        "name": task["name"], "kind": _kind_label(task), "description": task["description"],
        "backbone": f"{task['backbone']} ({task['backbone_fingerprint']})",
        "gather": f"{task['mode']}, k={task['k']}", "codec": task["codec"], "classes": shown,
        "edge network": f"M={edge['num_blocks']} r={edge['rank']} heads={edge['heads']} pooling={edge['pooling']} "
                        f"D={edge['dims']} T={edge['tokens']} C={edge['num_classes']}",
        "latest version": _version_label(task["latest_version"]), "created": task["created_at"],
        "aliases": ", ".join(f"{name} -> {v}" for name, v in task["aliases"].items()) or "(none)",
    }  # fmt: skip
    width = max(len(key) for key in lines)
    return Output(task, "\n".join(f"{key + ':':<{width + 1}} {value}" for key, value in lines.items()))


def cmd_versions(client: RegistryClient, args: argparse.Namespace) -> Output:
    by_version: dict[int, list[str]] = {}
    for alias in client.list_aliases(args.task):
        by_version.setdefault(alias.version, []).append(alias.name)
    versions = []
    for version in client.list_versions(args.task, page_size=min(args.limit or 1000, 1000)):
        versions.append(version_dict(version, by_version.get(version.number, [])))
        if args.limit and len(versions) == args.limit:
            break
    present = {key for v in versions for key in v["metrics"]}
    metrics = [key for key in KEY_METRICS if key in present] or sorted(present)[:3]
    rows = [
        {
            **v,
            "sha": v["sha256"][:SHA_PREFIX_CHARS],
            "size": _size(v["size_bytes"]),
            "parent": _version_label(v["parent_version"]),
            "alias_list": ",".join(v["aliases"]),
            **{f"m:{key}": _metric(v["metrics"].get(key)) for key in metrics},
        }
        for v in versions
    ]
    columns = [
        ("version", "VERSION"),
        ("created_at", "CREATED"),
        ("sha", "SHA256"),
        ("size", "SIZE"),
        *[(f"m:{key}", key.upper()) for key in metrics],
        ("parent", "PARENT"),
        ("alias_list", "ALIASES"),
    ]
    return Output(versions, format_table(columns, rows))


def cmd_aliases(client: RegistryClient, args: argparse.Namespace) -> Output:
    aliases = [alias_dict(a) for a in client.list_aliases(args.task)]
    rows = [{**a, "staged": _rollout_label(**a["rollout"]) if a["rollout"] else ""} for a in aliases]
    columns = [("alias", "ALIAS"), ("version", "VERSION"), ("staged", "ROLLOUT"), ("updated_at", "UPDATED"),
               ("updated_by", "BY")]  # fmt: skip
    return Output(aliases, format_table(columns, rows))


def cmd_history(client: RegistryClient, args: argparse.Namespace) -> Output:
    moves = [move_dict(m) for m in client.alias_history(args.task, args.alias, limit=args.limit)]
    rows = [
        {**m, "from": _version_label(m["from_version"]), "to": _version_label(m["to_version"]),
         "staged": _rollout_label(m["rollout_version"], m["rollout_percent"])}
        for m in moves
    ]  # fmt: skip
    columns = [("moved_at", "WHEN"), ("alias", "ALIAS"), ("from", "FROM"), ("to", "TO"), ("staged", "ROLLOUT"),
               ("moved_by", "BY")]  # fmt: skip
    return Output(moves, format_table(columns, rows))


def cmd_promote(client: RegistryClient, args: argparse.Namespace) -> Output:
    expected = args.expect
    before = None
    if expected is None:
        # Compare-and-set on what we just read, so the "from" printed below is the truth.
        try:
            before = client.get_alias(args.task, args.alias)
            expected = before.version
        except NotFoundError:
            expected = 0
    percent = 0 if args.percent is None else args.percent
    alias = client.set_alias(args.task, args.alias, args.version, expected_version=expected, percent=percent)
    data = {**alias_dict(alias), "from_version": expected}
    if alias.rollout is not None:
        text = (f"{args.task}: {args.alias} stays on {alias.version}; version {alias.rollout.version} rolls out to "
                f"{alias.rollout.percent}% of its devices")  # fmt: skip
    elif before is not None and before.rollout is not None and alias.version == before.version:
        text = f"{args.task}: {args.alias} rollout of {before.rollout.version} rolled back; every device on {alias.version}"
    else:
        text = f"{args.task}: {args.alias} {_version_label(expected)} -> {alias.version}"
    return Output(data, text)


def cmd_rollback(client: RegistryClient, args: argparse.Namespace) -> Output:
    before = None
    with contextlib.suppress(NotFoundError):
        before = client.get_alias(args.task, args.alias)
    alias = client.rollback_alias(args.task, args.alias)
    if before is not None and before.rollout is not None:
        data = {**alias_dict(alias), "from_version": alias.version, "rolled_back_rollout": before.rollout.version}
        return Output(
            data,
            f"{args.task}: {args.alias} rollout of {before.rollout.version} rolled back; every device on "
            f"{alias.version}",
        )
    move = client.alias_history(args.task, args.alias, limit=1)[0]
    data = {**alias_dict(alias), "from_version": move.from_version}
    return Output(
        data, f"{args.task}: {args.alias} {_version_label(move.from_version)} -> {alias.version} (rolled back)"
    )


def cmd_fleet(client: RegistryClient, args: argparse.Namespace) -> Output:
    fleet = client.fleet(args.task, stale_after_s=args.stale_after)
    devices = [
        {"device": d.device, "alias": d.alias, "version": d.version, "rejected_version": d.rejected_version,
         "rejected_reason": d.rejected_reason, "last_seen": _when(d.reported_at), "stale": stale, "agent": d.agent}
        for d, stale in fleet.devices
    ]  # fmt: skip
    versions = [{"version": v, "devices": n, "stale": stale} for v, n, stale in fleet.versions]
    data = {"task": fleet.task, "versions": versions, "devices": devices, "watchers": fleet.watchers,
            "aliases": [alias_dict(a) for a in fleet.aliases]}  # fmt: skip
    total = sum(v["devices"] + v["stale"] for v in versions)
    lines = [f"{fleet.task}: {total} device(s), {fleet.watchers} watching this replica"]
    for alias in fleet.aliases:
        staged = (
            f", rolling out {_rollout_label(alias.rollout.version, alias.rollout.percent)}" if alias.rollout else ""
        )
        lines.append(f"  alias {alias.name} -> {alias.version}{staged}")
    lines += ["", format_table([("version", "VERSION"), ("devices", "DEVICES"), ("stale", "STALE")], versions)]
    listed = [d for d in devices if args.all or d["stale"] or d["rejected_version"]]
    if listed:
        rows = [{**d, "state": "stale" if d["stale"] else "ok",
                 "refused": f"{d['rejected_version']}: {d['rejected_reason']}" if d["rejected_version"] else ""}
                for d in listed]  # fmt: skip
        columns = [("device", "DEVICE"), ("version", "VERSION"), ("state", "STATE"), ("last_seen", "LAST SEEN"),
                   ("refused", "REFUSED")]  # fmt: skip
        lines += ["", format_table(columns, rows)]
    return Output(data, "\n".join(lines))


def cmd_export(client: RegistryClient, args: argparse.Namespace) -> Output:
    pulled = client.pull(args.task, version=args.version, alias=args.alias, use_cache=False)  # sha256 verified
    try:
        if args.output == "-":
            sys.stdout.buffer.write(pulled.blob)
            sys.stdout.buffer.flush()
        else:
            _write_file(Path(args.output), pulled.blob)
    except OSError as error:
        raise CliError(f"cannot write {args.output}: {error.strerror or error}") from None
    data = {**version_dict(pulled.version), "path": args.output}
    return Output(
        data,
        f"wrote version {pulled.version.number} of {args.task} ({_size(len(pulled.blob))}, sha256 "
        f"{pulled.version.sha256}) to {args.output}",
        to_stderr=args.output == "-",
    )


def _write_file(path: Path, blob: bytes) -> None:
    # Whole or absent: a file named like the weights but holding half of them would be worse than none.
    fd, temp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(blob)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def cmd_delete_version(client: RegistryClient, args: argparse.Namespace) -> Output:
    client.delete_version(args.task, args.version)
    return Output(
        {"task": args.task, "version": args.version, "deleted": True}, f"deleted version {args.version} of {args.task}"
    )


def cmd_create_token(client: RegistryClient, args: argparse.Namespace) -> Output:
    scope = args.scope.replace("-", "_")
    token = client.create_token(args.name, task=args.task, scope=scope)
    if not args.json:
        print(f"token {args.name!r} ({args.scope} on task {args.task!r}); it is shown only this once", file=sys.stderr)
    return Output({"name": args.name, "task": args.task, "scope": scope, "token": token}, token)


def cmd_revoke_token(client: RegistryClient, args: argparse.Namespace) -> Output:
    client.revoke_token(args.name)
    return Output({"name": args.name, "revoked": True}, f"revoked token {args.name!r}")


# ---- parsing -------------------------------------------------------------------------------------------


Command = Callable[[RegistryClient, argparse.Namespace], Output]


def _settings_flags() -> argparse.ArgumentParser:
    """The connection and output settings, accepted before or after the subcommand."""
    flags = ArgumentParser(add_help=False, allow_abbrev=False)
    add_arguments(flags.add_argument_group("connection"), RegistryFlags)
    add_arguments(flags.add_argument_group("output"), JsonOutput)
    return flags


def build_parser() -> argparse.ArgumentParser:
    flags = _settings_flags()
    parser = ArgumentParser(
        prog=PROG,
        parents=[flags],
        allow_abbrev=False,
        epilog=ENV_EPILOG,
        description="Inspect and operate the weights registry: tasks, versions with metrics, aliases, exports, tokens.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=ArgumentParser)

    def add(name: str, fn: Command, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[flags], help=help_text, description=help_text, epilog=ENV_EPILOG)
        sub.set_defaults(fn=fn)
        return sub

    add("tasks", cmd_tasks, "list tasks (a table)")
    add("task", cmd_task, "show one task: backbone, gather, classes, edge network, aliases").add_argument("task")
    versions = add("versions", cmd_versions, "list a task's versions, newest first, with key metrics and aliases")
    versions.add_argument("task")
    versions.add_argument("--limit", type=int, default=50, help="show at most N versions; 0 = all [50]")
    add("aliases", cmd_aliases, "list a task's aliases").add_argument("task")
    history = add("history", cmd_history, "alias moves, newest first (every alias of the task without ALIAS)")
    history.add_argument("task")
    history.add_argument("alias", nargs="?")
    history.add_argument("--limit", type=int, default=0, help="at most N moves; 0 = the server's 100")
    promote = add("promote", cmd_promote, "point an alias at a version (compare-and-set)")
    promote.add_argument("task")
    promote.add_argument("version", type=int)
    promote.add_argument("--alias", required=True, help="e.g. production")
    promote.add_argument(
        "--expect",
        type=int,
        help="the version the alias must point at now (0: must not "
        "exist); default: whatever it points at when read just before",
    )
    promote.add_argument(
        "--percent",
        type=int,
        help="stage it: VERSION for this share (1-99) of the task's devices, by a stable hash of their names; "
        "again with another share to widen or narrow; 100 (or no --percent) finishes it; promoting the alias's own "
        "version, or rollback, rolls it back",
    )
    rollback = add(
        "rollback", cmd_rollback, "roll a staged rollout back, else move an alias back to where it pointed before"
    )
    rollback.add_argument("task")
    rollback.add_argument("--alias", required=True)
    fleet = add("fleet", cmd_fleet, "devices of a task: how many run each version, which are stale or refused one")
    fleet.add_argument("task")
    fleet.add_argument("--stale-after", type=int, default=0, metavar="SECONDS",
                       help="a device silent for longer is stale; 0 = the registry's 90 s")  # fmt: skip
    fleet.add_argument("--all", action="store_true", help="list every device, not only stale and refusing ones")
    export = add("export", cmd_export, "write a version's safetensors weights to a file (sha256 verified)")
    export.add_argument("task")
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", type=int)
    which.add_argument("--alias")
    which.add_argument("--latest", action="store_true")
    export.add_argument("-o", "--output", required=True, metavar="FILE", help="destination; '-' = stdout")
    delete = add("delete-version", cmd_delete_version, "delete a version no alias points at")
    delete.add_argument("task")
    delete.add_argument("version", type=int)
    token = add("create-token", cmd_create_token, "create a per-task token (admin); prints it once")
    token.add_argument("name", help="a label for logs and lineage, e.g. device-group-7")
    token.add_argument("--task", required=True)
    token.add_argument("--scope", required=True, choices=("read", "read-write"))
    add("revoke-token", cmd_revoke_token, "revoke a token by name (admin)").add_argument("name")
    return parser


def _fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the server said
    return code


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Runs one `mist registry` command; returns the exit code (0 ok, 1 refused or failed, 2 usage)."""
    env = os.environ if env is None else env
    try:
        args = parse_args(build_parser(), sys.argv[1:] if argv is None else argv)
        args.json = config_from_args(JsonOutput, vars(args), env).json
        client = config_from_args(RegistryFlags, vars(args), env).registry_client()
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except InvalidArgumentError as error:  # a bad flag, value, variable or token file
        return _fail(f"{error} (see {PROG} --help)", code=2)
    try:
        with client:
            output = args.fn(client, args)
    except MistError as error:  # refused by the registry, or by a check the client makes (a pulled blob's sha256)
        return _fail(f"{error.code}: {error}")
    except CliError as error:
        return _fail(str(error))
    print(
        json.dumps(output.data, indent=2) if args.json else output.text,
        file=sys.stderr if output.to_stderr else sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
