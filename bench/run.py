"""The benchmark harness: runs every section in one process on one machine, then writes
bench/results/latest.json (machine-readable), bench/results/REPORT.md (tables, methods, plots) and PNG plots.

    python -m bench.run                         # full run, ~20-25 min on 2 CPU cores
    python -m bench.run --quick                 # smoke run, ~2 min
    python -m bench.run --only transfer,link    # some sections (the others are left out, or kept with --merge)

A section that fails or cannot run here (no root for the edge link) is recorded as such in both files and the
run goes on; the exit status is 1 when any section failed, 130 when interrupted. Ctrl-C and SIGTERM stop the
run cleanly: servers are stopped and network namespaces deleted by the sections' own `finally` blocks.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench.common import PROFILES, ROOT, BenchSkipped, Profile, available_cpus, raise_interrupt
from bench.report import write_report

DEFAULT_OUT = ROOT / "bench" / "results"
RESULTS_NAME = "latest.json"
Status = Literal["ok", "skipped", "error", "not-run"]


@dataclass(frozen=True)
class SectionSpec:
    """One section of the report: where its code lives and how its JSON is laid out."""

    name: str  # top-level key in latest.json
    title: str  # heading in REPORT.md
    module: str  # imported lazily: a missing or broken module fails this section only
    rows: bool  # True: latest.json[name] is a list of rows; False: an object
    takes_profile: bool  # True: run(profile, out_dir); False: run(quick=..., out_dir=...) (another team's module)


SECTIONS: tuple[SectionSpec, ...] = (
    SectionSpec("transfer", "1. Transfer per image, on real gRPC traffic", "bench.transfer", True, True),
    SectionSpec("accuracy", "2. Codec cost in accuracy", "bench.accuracy", True, False),
    SectionSpec("link", "3. An edge link, for real", "bench.link", True, True),
    SectionSpec(
        "extractor", "4. Extractor: service vs direct, early exit, batching, cache", "bench.extractor", False, True
    ),
    SectionSpec("edge", "5. Edge: memory, time, parameters, MACs", "bench.edge", False, False),
    SectionSpec("scaling", "6. Scaling", "bench.scaling", False, True),
    SectionSpec(
        "serving", "7. Serving path: own cost per image against a bare gRPC echo", "bench.serving", False, True
    ),
    SectionSpec(
        "recipe", "8. Training recipe: the defaults against a pixel logistic regression", "bench.recipe", True, True
    ),
    SectionSpec(
        "fleet",
        "9. Fleet: an alias move reaching 1,000 watching devices, and a registry restart",
        "bench.fleet",
        False,
        True,
    ),
    SectionSpec(
        "segmentation",
        "10. Segmentation: MIST on pvt_v2, bytes and mIoU against every stage and the last stage",
        "bench.segmentation",
        False,
        True,
    ),
)
SECTION_NAMES = tuple(spec.name for spec in SECTIONS)
_DETAIL_KEYS = ("method", "targets")  # moved from a section's object into details, never left in the numbers


@dataclass
class SectionOutcome:
    """What one section produced, or why it produced nothing."""

    spec: SectionSpec
    status: Status
    seconds: float = 0.0
    result: Any = None  # exactly what the module's run() returned
    error: str = ""  # one line for the report; the traceback goes to stderr
    plots: list[str] = dataclasses.field(default_factory=list)  # PNG file names, relative to the output directory
    report_error: str = ""  # markdown() or plots() failed (the numbers are still kept)
    carried_from: dict[str, str] | None = None  # --merge: date and commit of the run that measured it


# ---------------------------------------------------------------------------------------------- running


def run_section(spec: SectionSpec, profile: Profile, out_dir: Path) -> SectionOutcome:
    """Import, run and time one section; every failure becomes the outcome's status (never raised)."""
    started = time.perf_counter()
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as error:
        if error.name != spec.module:
            return SectionOutcome(spec, "error", error=f"{spec.module} cannot be imported: {error}")
        return SectionOutcome(spec, "error", error=f"{spec.module} is missing: this section is not implemented yet")
    except Exception as error:  # a broken module fails its own section only
        traceback.print_exc()
        return SectionOutcome(spec, "error", error=f"{spec.module} cannot be imported: {error!r}")
    try:
        if spec.takes_profile:
            result = module.run(profile, out_dir)
        else:
            result = module.run(quick=profile != "full", out_dir=out_dir)
        _check_shape(spec, result)
    except BenchSkipped as reason:
        return SectionOutcome(spec, "skipped", time.perf_counter() - started, error=str(reason))
    except Exception as error:
        traceback.print_exc()
        return SectionOutcome(spec, "error", time.perf_counter() - started, error=f"{type(error).__name__}: {error}")
    return SectionOutcome(spec, "ok", time.perf_counter() - started, result=result)


def _check_shape(spec: SectionSpec, result: object) -> None:
    """Rows sections return a list of rows or {"rows": [...], ...}; the others a dict."""
    if spec.rows and isinstance(result, list):
        return
    if not isinstance(result, dict):
        raise TypeError(f"{spec.module}.run() returned {type(result).__name__}, expected a dict")
    if spec.rows and not isinstance(result.get("rows"), list):
        raise TypeError(f"{spec.module}.run() must return a list of rows or a dict with a 'rows' list")


def add_report_parts(outcome: SectionOutcome, out_dir: Path) -> str:
    """The section's Markdown (from its module, if it has markdown()) and plots; failures are noted, not raised."""
    if outcome.status != "ok":
        return ""
    try:
        module = importlib.import_module(outcome.spec.module)
        section = outcome.result if isinstance(outcome.result, dict) else {"rows": outcome.result}
        text = module.markdown(section) if hasattr(module, "markdown") else _fallback_markdown(section)
        if hasattr(module, "plots"):
            outcome.plots = [Path(p).name for p in module.plots(section, out_dir)]
        return text
    except Exception as error:
        traceback.print_exc()
        outcome.report_error = f"{type(error).__name__}: {error}"
        return ""


def _fallback_markdown(section: dict[str, object]) -> str:
    return "```json\n" + json.dumps(section, indent=2, default=str)[:20_000] + "\n```"


# ---------------------------------------------------------------------------------------------- results file


def split_section(spec: SectionSpec, result: Any) -> tuple[Any, dict[str, object]]:
    """(the numbers for latest.json[name], the rest for details[name]["meta"])."""
    if isinstance(result, list):
        return result, {}
    meta = {key: result[key] for key in _DETAIL_KEYS if key in result}
    if spec.rows:
        return result["rows"], {k: v for k, v in result.items() if k != "rows"}
    return {k: v for k, v in result.items() if k not in _DETAIL_KEYS}, meta


def join_section(spec: SectionSpec, data: Any, meta: dict[str, object]) -> Any:
    """Inverse of split_section: the dict a module's markdown() and plots() take."""
    return {"rows": data, **meta} if spec.rows else {**data, **meta}


def machine_info() -> dict[str, object]:
    """What the numbers were measured on."""
    import grpc
    import numpy
    import timm
    import torch

    cpu = "unknown"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "cpus_usable": available_cpus(),
        "memory_bytes": memory,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "grpcio": grpc.__version__,
        "numpy": numpy.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }


def git_commit() -> tuple[str, bool]:
    """(HEAD's sha or "unknown", whether the tree differs from it: modified or new files, our own results aside)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--", ".", ":!bench/results"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def build_results(
    outcomes: Sequence[SectionOutcome],
    *,
    profile: Profile,
    date: str,
    commit: str,
    dirty: bool,
    machine: dict[str, object],
    seconds: float,
) -> dict[str, object]:
    results: dict[str, object] = {
        "date": date,
        "machine": machine,
        "commit": commit,
        "commit_dirty": dirty,
        "profile": profile,
        "seconds": seconds,
    }
    details: dict[str, object] = {}
    targets: list[dict[str, object]] = []
    for outcome in outcomes:
        spec = outcome.spec
        data, meta = split_section(spec, outcome.result) if outcome.status == "ok" else ([] if spec.rows else None, {})
        results[spec.name] = data
        details[spec.name] = {
            "status": outcome.status,
            "seconds": round(outcome.seconds, 2),
            "error": outcome.error,
            "report_error": outcome.report_error,
            "plots": outcome.plots,
            "meta": meta,
            "carried_from": outcome.carried_from,
        }
        for target in meta.get("targets", []) or []:  # type: ignore[union-attr]
            targets.append({"section": spec.name, **target})
    results["targets"] = targets
    results["details"] = details
    return results


def carried_outcomes(previous: dict[str, Any], names: Sequence[str]) -> dict[str, SectionOutcome]:
    """--merge: sections of an earlier latest.json, marked with the date and commit that measured them."""
    carried = {}
    for spec in SECTIONS:
        detail = (previous.get("details") or {}).get(spec.name) or {}
        if spec.name in names or detail.get("status") != "ok":
            continue
        origin = detail.get("carried_from") or {
            "date": previous.get("date", "?"),
            "commit": previous.get("commit", "?"),
        }
        result = join_section(spec, previous[spec.name], detail.get("meta") or {})
        carried[spec.name] = SectionOutcome(
            spec, "ok", float(detail.get("seconds") or 0.0), result=result, carried_from=origin
        )
    return carried


def write_json(path: Path, results: dict[str, object]) -> None:
    """Write through a temporary file, so a reader never sees half a file."""
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=2, default=str) + "\n")
    temporary.replace(path)


# ---------------------------------------------------------------------------------------------- main


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the quick profile (~2 min): fewer images, a small ViT "
        "where the full run uses ViT-B/16 for timings; same as --profile quick",
    )
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        help="full (default), quick, or smoke (a micro ViT: proves the plumbing in seconds; used by the tests)",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="SECTION,...",
        help=f"comma-separated sections to run, of: {', '.join(SECTION_NAMES)} (default: all)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the sections not run now from the existing "
        "latest.json (marked with their own date and commit) instead of leaving them out",
    )
    args = parser.parse_args(argv)
    if args.quick and args.profile not in (None, "quick"):
        parser.error("--quick contradicts --profile " + args.profile)
    args.profile = args.profile or ("quick" if args.quick else "full")
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in only if name not in SECTION_NAMES]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTION_NAMES)}")
    args.only = only or list(SECTION_NAMES)
    return args


def main(argv: Sequence[str] | None = None, *, log: Callable[[str], None] | None = None) -> int:
    args = _parse_args(argv)
    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    previous_handler = signal.signal(signal.SIGTERM, raise_interrupt)  # finally blocks run on SIGTERM too
    try:
        return _run(args, out_dir, say)
    except KeyboardInterrupt:
        say("interrupted: servers stopped and namespaces removed; no results written")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _run(args: argparse.Namespace, out_dir: Path, say: Callable[[str], None]) -> int:
    date = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    commit, dirty = git_commit()
    machine = machine_info()
    previous_path = out_dir / RESULTS_NAME
    carried = {}
    if args.merge and previous_path.exists():
        carried = carried_outcomes(json.loads(previous_path.read_text()), args.only)
    started = time.perf_counter()
    outcomes, texts = [], {}
    for number, spec in enumerate(SECTIONS, start=1):
        if spec.name not in args.only:
            outcome = carried.get(spec.name) or SectionOutcome(spec, "not-run", error="not selected (--only)")
        else:
            say(f"[{number}/{len(SECTIONS)}] {spec.name} ({args.profile}) ...")
            outcome = run_section(spec, args.profile, out_dir)
            say(
                f"[{number}/{len(SECTIONS)}] {spec.name}: {outcome.status} in {outcome.seconds:.0f} s"
                + (f": {outcome.error}" if outcome.error else "")
            )
        texts[spec.name] = add_report_parts(outcome, out_dir)
        outcomes.append(outcome)
    machine["load_average_at_end"] = list(os.getloadavg())
    results = build_results(
        outcomes,
        profile=args.profile,
        date=date,
        commit=commit,
        dirty=dirty,
        machine=machine,
        seconds=round(time.perf_counter() - started, 1),
    )
    write_json(previous_path, results)
    report = write_report(out_dir, results, texts, {spec.name: spec.title for spec in SECTIONS})
    say(f"wrote {previous_path} and {report}")
    return 1 if any(outcome.status == "error" for outcome in outcomes if outcome.spec.name in args.only) else 0


if __name__ == "__main__":
    sys.exit(main())
