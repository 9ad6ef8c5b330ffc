"""REPORT.md from one run's results: a headline table (what the README quotes), the targets, then each section's
own tables, method of measurement and plots, and what failed or was skipped, saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench.common import MIB

REPORT_NAME = "REPORT.md"
DEFAULT_CODEC_NAME = "i8o-zstd"  # services.common.wire.codec.DEFAULT_CODEC.name, without importing numpy here


def write_report(
    out_dir: Path, results: Mapping[str, Any], texts: Mapping[str, str], titles: Mapping[str, str]
) -> Path:
    """Write REPORT.md next to latest.json; returns its path."""
    machine = results["machine"]
    dirty = " (with uncommitted changes)" if results.get("commit_dirty") else ""
    lines = [
        "# mist-suite benchmarks",
        "",
        f"Run {results['date']} (UTC), profile **{results['profile']}**, commit `{results['commit'][:12]}`{dirty}, "
        f"{results['seconds'] / 60:.1f} min. Machine: {machine.get('cpu')}, {machine.get('cpus_usable')} usable "
        f"cores, {_gib(machine.get('memory_bytes'))}, GPU: {machine.get('gpu') or 'none'}; {machine.get('os')}; "
        f"Python {machine.get('python')}, torch {machine.get('torch')}, timm {machine.get('timm')}, grpcio "
        f"{machine.get('grpcio')}. Load average (1, 5, 15 min) at start {_load(machine, 'start')}, at end "
        f"{_load(machine, 'end')}: the machine may be shared, which is why timings are medians of alternated "
        "repetitions and every ratio is taken within this run.",
        "",
        "Every figure below was measured in this run by `python -m bench.run` (machine-readable: `latest.json`, "
        "documented in `bench/README.md`). Backbones are randomly initialised (nothing is downloaded): sizes and "
        "timings are those of the real architectures, accuracies are on synthetic data.",
        "",
    ]
    headline = headline_rows(results)
    if headline:
        lines += ["## Headline", "", "| figure | measured | for comparison |", "|---|---:|---|"]
        lines += [f"| {name} | {value} | {context} |" for name, value, context in headline] + [""]
    targets = results.get("targets") or []
    if targets:
        lines += ["## Targets", "", "| section | target | measured | result |", "|---|---|---:|---|"]
        lines += [
            f"| {t['section']} | {t.get('name', '')} {t.get('target', '')} | {t.get('measured', '')} | "
            f"{_verdict(t.get('passed'))} |"
            for t in targets
        ] + [""]
    details = results["details"]
    for name, title in titles.items():
        lines += [f"## {title}", "", *_section_body(details[name], texts.get(name, "")), ""]
    lines += [
        "## Reproduce",
        "",
        "    make bench         # python -m bench.run: this report",
        "    make bench-quick   # python -m bench.run --quick: a two-minute smoke run",
        "",
    ]
    path = out_dir / REPORT_NAME
    path.write_text("\n".join(lines))
    return path


def _verdict(passed: bool | None) -> str:
    """None: the section could not measure the target here (its `measured` says why)."""
    if passed is None:
        return "not measured"
    return "PASS" if passed else "**FAIL**"


def _section_body(detail: Mapping[str, Any], text: str) -> list[str]:
    status = detail["status"]
    if status == "not-run":
        return ["*Not run in this invocation (`--only`).*"]
    if status == "skipped":
        return [f"*Skipped: {detail['error']}*"]
    if status == "error":
        return [f"**Failed:** {detail['error']}"]
    body = []
    if detail.get("carried_from"):
        origin = detail["carried_from"]
        body.append(f"*Carried over (`--merge`) from the run of {origin['date']}, commit `{origin['commit'][:12]}`.*\n")
    body.append(text or "*(no report text)*")
    if detail.get("report_error"):
        body.append(f"\n**Report step failed:** {detail['report_error']}")
    body += [f"\n![{plot}]({plot})" for plot in detail.get("plots") or []]
    body.append(f"\n<sub>section time: {detail['seconds']:.0f} s</sub>")
    return body


def headline_rows(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, value, context) for the numbers the README quotes; a figure whose section is absent is left out."""
    rows: list[tuple[str, str, str]] = []
    for builder in (_transfer_headline, _accuracy_headline, _link_headline, _extractor_headline, _edge_headline):
        try:
            rows += builder(results)
        except (KeyError, TypeError, ValueError, StopIteration, ZeroDivisionError, AttributeError):
            continue  # a section without the expected keys simply has no headline
    return rows


def _cell(rows: list[dict[str, Any]], **match: object) -> dict[str, Any]:
    return next(row for row in rows if all(row.get(k) == v for k, v in match.items()))


def _transfer_headline(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    rows = results["transfer"]
    meta = results["details"]["transfer"]["meta"]
    comparable = bool(meta.get("paper_comparable"))
    default = _cell(rows, is_default=True)
    socket = f"on the socket {default['socket_bytes_per_image'] / MIB:.4f} MiB"
    out = [
        (
            "MIST payload per image, default codec",
            f"{default['bytes_per_image'] / MIB:.4f} MiB",
            f"paper's MIST (float32): 0.577 MiB; {socket}"
            if comparable
            else f"{meta['backbone']['label']}: not the paper's geometry; {socket}",
        )
    ]
    for method, paper in (("lst", "7.503"), ("last", "4.040"), ("mist", "0.577")):
        row = _cell(rows, method=method, codec="f32-none")
        out.append(
            (
                f"{method.upper()} payload per image, float32",
                f"{row['bytes_per_image'] / MIB:.3f} MiB",
                f"paper: {paper} MiB" if comparable else meta["backbone"]["label"],
            )
        )
    return out


def _accuracy_headline(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    for row in results["accuracy"]:
        family = f", {row['family']} features" if row.get("family") else ""
        if row.get("codec") == DEFAULT_CODEC_NAME and "paired_delta_mean" in row:
            out.append(
                (
                    f"accuracy, default codec vs float32 (paired){family}",
                    f"{row['paired_delta_mean'] * 100:+.2f} points",
                    f"std {row.get('paired_delta_std', 0.0) * 100:.2f} over {_count(row.get('seeds'))} seeds; "
                    "target: at most 0.5 points lower",
                )
            )
        elif row.get("codec") in (DEFAULT_CODEC_NAME, "f32-none", "f32"):
            out.append(
                (
                    f"accuracy section, codec {row['codec']}{family}",
                    f"{row['mean']:.4g} ± {row['std']:.2g}",
                    f"{_count(row.get('seeds'))} seeds; see section 2 for what is averaged",
                )
            )
    return out


def _count(seeds: object) -> str:
    return str(len(seeds)) if isinstance(seeds, (list, tuple)) else str(seeds)


def _link_headline(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    rows = results["link"]
    for rate in dict.fromkeys(row["rate_mbit"] for row in rows):
        lst = _cell(rows, rate_mbit=rate, method="lst")
        mist = _cell(rows, rate_mbit=rate, method="mist", codec=DEFAULT_CODEC_NAME)
        out.append(
            (
                f"1000 images' features over {rate:g} Mbit/s, MIST default codec",
                _duration(mist["seconds_1000_images"]),
                f"LST float32: {_duration(lst['seconds_1000_images'])}",
            )
        )
    return out


def _extractor_headline(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    section = results["extractor"]
    ks = sorted(section["early_exit_speedup"], key=int)
    return [
        (
            "extractor service vs direct forward",
            f"{section['service_vs_direct']:.2f}",
            f"target >= 0.9; {section['device']}",
        ),
        ("dynamic batching, 8 streams vs 1", f"{section['batching_gain_8_streams']:.2f}x", section["backbone"]),
        ("cache hit vs miss", f"{section['cache_hit_speedup']:.0f}x", "second pass over the same images"),
        (
            f"early exit at k = {ks[0]} vs N",
            f"{section['early_exit_speedup'][ks[0]]:.2f}x",
            f"ideal {section['early_exit_ideal'][ks[0]]:.1f}x",
        ),
    ]


def _edge_headline(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    section = results["edge"]
    fields: list[tuple[str, str, Callable[[Any], str], str]] = [
        ("finetune_peak_rss_bytes", "edge fine-tuning peak RSS", _mb, "paper: 663 MB"),
        ("predict_peak_rss_bytes", "edge prediction peak RSS", _mb, "paper: 255 MB"),
        ("trainable_params", "trainable parameters", lambda v: f"{v / 1e6:.2f} M", "paper: 0.38 M"),
        ("macs_per_image", "edge MACs per image", lambda v: f"{v / 1e9:.3f} G", "paper: 0.09 G"),
    ]
    return [(label, render(section[key]), context) for key, label, render, context in fields if key in section]


def _mb(value: float) -> str:
    return f"{value / 1e6:.0f} MB"


def _gib(value: object) -> str:
    return f"{value / 2**30:.0f} GiB RAM" if isinstance(value, (int, float)) else "RAM unknown"


def _load(machine: Mapping[str, Any], when: str) -> str:
    values = machine.get(f"load_average_at_{when}")
    return ", ".join(f"{v:.1f}" for v in values) if values else "?"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"
