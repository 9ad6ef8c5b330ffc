"""Writes docs/reference/cli.md from the `--help` of every command, so the reference cannot drift from the code.

    .venv/bin/python scripts/gen_cli_docs.py            # regenerate docs/reference/cli.md
    .venv/bin/python scripts/gen_cli_docs.py --check    # exit 1, saying so, when the file is stale

Each command runs in a subprocess exactly as its console script would (entry points read from pyproject.toml's
[project.scripts]), with COLUMNS=100 and no MIST_* variables, so the output does not depend on the terminal or
the environment. Subcommands of `mist`, `mist registry` and `mist reproduce` are read from their own `--help`, so
a new subcommand gets its section without editing this file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import difflib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "reference" / "cli.md"
PYPROJECT = ROOT / "pyproject.toml"
COLUMNS = 100
TIMEOUT_S = 180  # `mist-extractor --help` imports torch: seconds on a busy 2-core machine
REGENERATE = ".venv/bin/python scripts/gen_cli_docs.py"
# Used when a `--help` lists no subcommands we can read (its layout changed): the commands the docs promise.
FALLBACK_MIST_COMMANDS = ("tune", "predict", "evaluate", "demo", "registry", "reproduce")
# `mist` subcommands that have subcommands of their own, with the ones the docs promise.
GROUPS: dict[str, tuple[str, ...]] = {
    "registry": (
        "tasks", "task", "versions", "aliases", "history", "promote", "rollback", "fleet", "export",
        "delete-version", "create-token", "revoke-token",
    ),
    "reproduce": ("vtab", "fewshot", "dg"),
}  # fmt: skip
SERVERS = ("mist-extractor", "mist-registry", "mist-tuner")
# A subcommand line under "positional arguments:" in argparse's help: 4 spaces, the name, then its help.
_SUBCOMMAND_LINE = re.compile(r"^    ([a-z][a-z0-9-]*)(?:\s{2,}.*)?$")
_RUNNER = "import sys; from {module} import {function} as main; sys.argv = [{prog!r}, *sys.argv[1:]]; sys.exit(main())"


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]  # e.g. ("mist", "registry", "export")

    @property
    def name(self) -> str:
        return " ".join(self.argv)


class GenerationError(Exception):
    """A command's --help failed or printed nothing."""


def console_scripts() -> dict[str, str]:
    """[project.scripts] of pyproject.toml: {"mist": "services.tuner.cli:main", ...}."""
    scripts: dict[str, str] = {}
    in_section = False
    for line in PYPROJECT.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            in_section = stripped == "[project.scripts]"
            continue
        match = re.match(r'^([A-Za-z0-9_.-]+)\s*=\s*"([\w.]+):(\w+)"', stripped) if in_section else None
        if match:
            scripts[match.group(1)] = f"{match.group(2)}:{match.group(3)}"
    if not scripts:
        raise GenerationError(f"no [project.scripts] entries found in {PYPROJECT}")
    return scripts


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MIST_")}
    env.update(
        COLUMNS=str(COLUMNS),
        LINES="50",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        PYTHON_COLORS="0",  # Python 3.14's argparse colours help on terminals
        NO_COLOR="1",
        TERM="dumb",
        LC_ALL="C.UTF-8",
    )
    return env


def help_text(command: Command, scripts: dict[str, str]) -> str:
    """The command's `--help` output, normalised (no trailing spaces, no absolute repository path)."""
    program, *args = command.argv
    if program not in scripts:
        raise GenerationError(f"{program} is not a console script in pyproject.toml")
    module, function = scripts[program].split(":")
    code = _RUNNER.format(module=module, function=function, prog=program)
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *args, "--help"],
            cwd=ROOT,
            env=_environment(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise GenerationError(f"`{command.name} --help` took more than {TIMEOUT_S} s") from None
    if done.returncode != 0 or not done.stdout.strip():
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise GenerationError(f"`{command.name} --help` exited {done.returncode}: {detail[0]}")
    text = done.stdout.replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".")
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def subcommands(text: str, fallback: tuple[str, ...]) -> list[str]:
    """Subcommand names listed under "positional arguments:" (argparse's layout), else `fallback`."""
    names: list[str] = []
    in_positionals = False
    for line in text.splitlines():
        if line and not line.startswith(" "):
            in_positionals = line.rstrip(":") in ("positional arguments", "commands")
            continue
        match = _SUBCOMMAND_LINE.match(line) if in_positionals else None
        if match and match.group(1) not in names:
            names.append(match.group(1))
    return names or list(fallback)


def collect(scripts: dict[str, str], jobs: int) -> list[tuple[Command, str]]:
    """(command, help) for mist, its subcommands (each group followed by its own subcommands) and the servers."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        top = Command(("mist",))
        groups = {name: Command(("mist", name)) for name in GROUPS}
        first = {c: pool.submit(help_text, c, scripts) for c in (top, *groups.values())}
        servers = {Command((name,)): pool.submit(help_text, Command((name,)), scripts) for name in SERVERS}
        top_text = first[top].result()
        mist_commands = [Command(("mist", name)) for name in subcommands(top_text, FALLBACK_MIST_COMMANDS)]
        members = {
            name: [Command(("mist", name, sub)) for sub in subcommands(first[group].result(), GROUPS[name])]
            for name, group in groups.items()
        }
        rest = {
            c: pool.submit(help_text, c, scripts)
            for c in mist_commands + [m for listed in members.values() for m in listed]
            if c not in groups.values()
        }
        ordered: list[tuple[Command, str]] = [(top, top_text)]
        for command in mist_commands + [g for g in groups.values() if g not in mist_commands]:
            # A group `mist --help` stopped listing is still documented, at the end.
            if command in groups.values():
                ordered.append((command, first[command].result()))
                ordered.extend((c, rest[c].result()) for c in members[command.argv[1]])
            else:
                ordered.append((command, rest[command].result()))
        ordered.extend((c, future.result()) for c, future in servers.items())
    return ordered


def _anchor(name: str) -> str:
    """GitHub's heading anchor for "`mist registry create-token`"."""
    return re.sub(r"[^a-z0-9 -]", "", name.lower()).replace(" ", "-")


def render(sections: list[tuple[Command, str]]) -> str:
    lines = [
        "# Command-line reference",
        "",
        f"<!-- Generated by scripts/gen_cli_docs.py from each command's --help; do not edit. Regenerate: {REGENERATE} -->",
        "",
        f"Generated from every command's `--help` (at {COLUMNS} columns) by `scripts/gen_cli_docs.py`; do not edit.",
        f"Regenerate: `{REGENERATE}` (`--check` exits 1 while this file is stale).",
        "",
        "The names these commands promise (ports, `MIST_*` variables, exit codes) are in",
        "[configuration.md](configuration.md); the status codes behind `error: CODE` lines are in [errors.md](errors.md).",
        "",
    ]
    seen: dict[str, int] = {}
    for command, _ in sections:  # GitHub suffixes repeated anchors: `mist registry` and `mist-registry` collide
        anchor = _anchor(command.name)
        seen[anchor] = seen.get(anchor, -1) + 1
        lines.append(f"- [`{command.name}`](#{anchor}{f'-{seen[anchor]}' if seen[anchor] else ''})")
    for command, text in sections:
        lines += ["", f"## `{command.name}`", "", "```text", text, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/reference/cli.md from every command's --help.")
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from what would be written")
    parser.add_argument(
        "--output", type=Path, default=OUTPUT, help=f"file to write or check (default: {OUTPUT.relative_to(ROOT)})"
    )
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="commands run at once")
    args = parser.parse_args(argv)
    try:
        text = render(collect(console_scripts(), max(1, args.jobs)))
    except GenerationError as error:
        print(f"gen_cli_docs: error: {error}", file=sys.stderr)
        return 2
    target: Path = args.output
    shown = target.relative_to(ROOT) if target.is_absolute() and target.is_relative_to(ROOT) else target
    if args.check:
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current == text:
            return 0
        diff = list(difflib.unified_diff(current.splitlines(), text.splitlines(), str(shown), "--help", lineterm=""))
        print("\n".join(diff[:60]) + ("\n..." if len(diff) > 60 else ""), file=sys.stderr)
        print(f"gen_cli_docs: {shown} is stale: regenerate it with `{REGENERATE}`", file=sys.stderr)
        return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    print(f"wrote {shown} ({len(sections_of(text))} commands)")
    return 0


def sections_of(text: str) -> list[str]:
    return re.findall(r"^## `([^`]+)`$", text, flags=re.MULTILINE)


if __name__ == "__main__":
    sys.exit(main())
