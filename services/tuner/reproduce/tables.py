"""The tables `mist reproduce` writes: the paper's Table 1 layout for VTAB-1k, shots x datasets for few-shot, one
column per target for domain generalisation. Accuracies are percent with one decimal, as the paper prints them.

VTAB means: a group's mean is over its tasks that ran; "Mean" is over every task that ran (the 19-task average the
paper reports); "Mean of groups" averages the three group means (what some code bases report instead).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from services.tuner.reproduce.layouts import GROUPS, VTAB_TASKS, mean_and_std

_DASH = "-"


def _pct(value: float | None) -> str:
    return _DASH if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _rule(count: int) -> str:
    return "|" + "---|" * count


def _about(data: Mapping[str, Any]) -> str:
    recipe = data["recipe"]
    warmup = recipe["resolved_warmup_epochs"]
    trained = (
        "pretrained" if data.get("pretrained") else "NOT pretrained (random init: scores near chance mean nothing)"
    )
    return (
        f"Backbone {data['backbone']} (weights {data['weights_fingerprint']}, {trained}); codec {data['codec']}; "
        f"AdamW lr {recipe['lr']}, weight decay {recipe['weight_decay']}, batch {recipe['batch_size']}, "
        f"{recipe['epochs']} epochs with {warmup} warm-up epochs, cosine; seed {recipe['seed']}."
    )


# ---------------------------------------------------------------------------------------------- VTAB-1k


def vtab_summary(tasks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Group means, the overall mean, the mean of group means, transfer and parameters over the tasks that ran."""
    groups = {group: _mean([t["test_accuracy"] for t in tasks if t["group"] == group]) for group in GROUPS}
    present = [value for value in groups.values() if value is not None]
    return {
        "groups": groups,
        "mean": _mean([t["test_accuracy"] for t in tasks]),
        "mean_of_groups": _mean(present) if len(present) == len(GROUPS) else None,
        "mib_per_image": _mean([t["mib_per_image"] for t in tasks]),
        "parameters": max((t["parameters"] for t in tasks), default=None),
        "tasks_run": len(tasks),
    }


def vtab_markdown(data: Mapping[str, Any]) -> str:
    by_name = {t["task"]: t for t in data.get("tasks", [])}
    ordered = sorted(VTAB_TASKS, key=lambda task: GROUPS.index(task.group))
    titles = [task.title for task in ordered]
    head = ["Method", "MiB/img", "Params (M)", *titles, "Natural", "Specialized", "Structured", "Mean"]
    params = data.get("parameters")
    mist = [
        f"MIST ({data['backbone']})",
        _DASH if data.get("mib_per_image") is None else f"{data['mib_per_image']:.3g}",
        _DASH if params is None else f"{params / 1e6:.3g}",
        *(_pct(by_name[t.name]["test_accuracy"]) if t.name in by_name else _DASH for t in ordered),
        *(_pct(data["groups"][group]) for group in GROUPS),
        _pct(data.get("mean")),
    ]
    ks = ["k chosen", "", "", *(str(by_name[t.name]["k"]) if t.name in by_name else _DASH for t in ordered),
          "", "", "", ""]  # fmt: skip
    lines = [
        "# VTAB-1k (mist reproduce vtab)",
        "",
        _about(data),
        "",
        _row(head),
        _rule(len(head)),
        _row(mist),
        _row(ks),
        "",
        f"{data.get('tasks_run', 0)} of 19 tasks ran (the others: {_DASH}). Mean: over the tasks that ran; mean of "
        f"the three group means: {_pct(data.get('mean_of_groups'))}. MiB/img: the chosen k's feature as received, "
        "compressed, averaged over the tasks.",
        "",
        _row(["Task", "Group", "k", "val200 accuracy by k", "Test", "Test images", "MiB/img", "Version", "Seconds"]),
        _rule(9),
    ]
    for task in ordered:
        if task.name not in by_name:
            continue
        result = by_name[task.name]
        by_k = ", ".join(f"k={k}: {_pct(a)}" for k, a in result["val200_accuracy_by_k"].items()) or _DASH
        lines.append(_row([task.name, task.group, result["k"], by_k, _pct(result["test_accuracy"]),
                           result["test_images"], f"{result['mib_per_image']:.3g}",
                           f"{result['registry_task']} v{result['version']}", f"{result['seconds']:.0f}"]))  # fmt: skip
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- few-shot


def fewshot_summary(runs: Sequence[Mapping[str, Any]], shots: Sequence[int]) -> dict[str, Any]:
    """Per dataset and shots: mean and sample standard deviation of test accuracy over the seeds; plus the average
    over datasets per shots."""
    datasets = sorted({run["dataset"] for run in runs})
    cells: dict[str, dict[str, dict[str, float | int]]] = {}
    for name in datasets:
        cells[name] = {}
        for n in shots:
            values = [run["test_accuracy"] for run in runs if run["dataset"] == name and run["shots"] == n]
            if values:
                mean, std = mean_and_std(values)
                cells[name][str(n)] = {"mean": mean, "std": std, "seeds": len(values)}
    average = {}
    for n in shots:
        means = [cells[name][str(n)]["mean"] for name in datasets if str(n) in cells[name]]
        if means:
            average[str(n)] = float(sum(means) / len(means))
    return {"cells": cells, "average": average}


def fewshot_markdown(data: Mapping[str, Any]) -> str:
    shots = [str(n) for n in data["shots"]]
    head = ["Dataset", *(f"{n}-shot" for n in shots)]
    lines = ["# Few-shot (mist reproduce fewshot)", "", _about(data) + f" k={data['k']}.", "", _row(head),
             _rule(len(head))]  # fmt: skip
    for name, row in data["cells"].items():
        lines.append(_row([name, *(_cell(row.get(n)) for n in shots)]))
    lines.append(_row(["Average", *(_pct(data["average"].get(n)) for n in shots)]))
    lines += ["", f"Test accuracy, mean ± sample standard deviation over the seeds {data['seeds']} (the number of "
              "seeds finished is shown when fewer)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _cell(cell: Mapping[str, float | int] | None) -> str:
    if cell is None:
        return _DASH
    return f"{_pct(cell['mean'])} ± {100 * cell['std']:.1f}" + (f" ({cell['seeds']})" if cell["seeds"] < 2 else "")


# ---------------------------------------------------------------------------------------------- DG


def dg_markdown(data: Mapping[str, Any]) -> str:
    source = data.get("source_result") or {}
    targets = data.get("targets", [])
    head = ["Version", "Source", *(t["target"] for t in targets), "Targets mean"]
    mean = _mean([t["accuracy"] for t in targets])
    row = [
        f"{source.get('registry_task', _DASH)} v{source.get('version', _DASH)} (k={source.get('k', _DASH)})",
        _pct(source.get("source_test_accuracy")),
        *(_pct(t["accuracy"]) for t in targets),
        _pct(mean),
    ]
    shots = f"{data['shots']}-shot " if data.get("shots") else ""
    lines = [
        "# Domain generalisation (mist reproduce dg)",
        "",
        _about(data),
        "",
        f"Trained on {shots}{data['source']}; each target is scored by the same version with the logits of the "
        "target's own classes only (ImageNet-A and -R style); Source: the source's test split, when it has one.",
        "",
        _row(head),
        _rule(len(head)),
        _row(row),
        "",
        _row(["Target", "Images", "Classes", "Accuracy", "Accuracy over all classes", "MiB/img"]),
        _rule(6),
    ]
    for t in targets:
        lines.append(_row([t["target"], t["images"], t["classes"], _pct(t["accuracy"]),
                           _pct(t["accuracy_all_classes"]), f"{t['mib_per_image']:.3g}"]))  # fmt: skip
    return "\n".join(lines) + "\n"
