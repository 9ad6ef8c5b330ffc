"""The paper's three protocols through the real services: VTAB-1k, few-shot and domain generalisation.

Each reads and checks its whole layout first (layouts.py: nothing is sent before every list, path and label is
known good), then runs its units one by one, saving each result in the run folder as it finishes, pushes every
trained network as a version of a registry task, and writes table.md and table.json after every unit.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.common.wire.codec import CodecConfig
from services.common.wire.edge_spec import macs_per_image, trainable_parameters
from services.common.wire.gather_modes import candidate_ks, validate_ks
from services.tuner.data import Dataset
from services.tuner.evaluation import evaluate
from services.tuner.options import DEFAULT_CODEC_NAME, TrainingFlags
from services.tuner.predict import load_version
from services.tuner.reports import TuneObserver
from services.tuner.reproduce import tables
from services.tuner.reproduce.layouts import (
    VtabTask,
    load_split_dataset,
    load_target,
    load_vtab,
    resolve_datasets,
    resolve_vtab,
    sample_shots,
)
from services.tuner.reproduce.options import DgOptions, FewShotOptions, VtabOptions
from services.tuner.reproduce.runner import (
    Eta,
    RunFolder,
    Session,
    accuracy_of,
    choose_k,
    edge_for,
    fetch_once,
    mib,
    push,
    signature,
    subset,
    train_final,
)

Tables = dict[str, Any]


def _codec(options: TrainingFlags) -> str:
    return CodecConfig.parse(options.codec or DEFAULT_CODEC_NAME).name


def _ks(session: Session, options: TrainingFlags, *, auto: bool) -> tuple[int, ...]:
    """The candidate ks (the paper's N/4, N/2, 3N/4, N) when k is auto and there is a split to choose on, else one."""
    blocks = session.info.num_blocks
    if options.k is not None:
        return tuple(validate_ks([options.k], blocks))
    return tuple(candidate_ks(blocks)) if auto else (blocks,)


def _save_tables(run: RunFolder, data: Tables, render: Callable[[Tables], str]) -> None:
    md, js = run.write_tables(render(data), data)
    data.setdefault("files", {"markdown": str(md), "json": str(js)})


def _header(session: Session, options: TrainingFlags, codec: str, protocol: str) -> Tables:
    config = options.train_config()
    return {
        "protocol": protocol,
        "backbone": session.info.backbone.name,
        "weights_fingerprint": session.info.backbone.weights_fingerprint,
        "pretrained": session.info.pretrained,
        "codec": codec,
        "recipe": {**dataclasses.asdict(config), "resolved_warmup_epochs": config.resolved_warmup_epochs},
    }


# ---------------------------------------------------------------------------------------------- VTAB-1k


def plan_vtab(options: VtabOptions) -> list[tuple[VtabTask, Dataset]]:
    """Every task's layout read and checked, before any server is asked anything."""
    return [(task, load_vtab(task, folder)) for task, folder in resolve_vtab(options.root, options.tasks)]


def run_vtab(
    options: VtabOptions, session: Session, observer: TuneObserver, loaded: list[tuple[VtabTask, Dataset]]
) -> Tables:
    """Per task: k chosen on val200 after short runs on train800, the recipe on train800val200, scored on test."""
    codec, ks = _codec(options), _ks(session, options, auto=True)
    run = RunFolder(options.out_dir)
    edges = {task.name: edge_for(session, options.task_name(task.name), ds.class_names, options) for task, ds in loaded}
    signatures = {task.name: signature(session, options, edges[task.name], codec, ks=list(ks), protocol="vtab",
                                       task=task.name) for task, _ in loaded}  # fmt: skip
    done = {task.name: run.result(task.name, signatures[task.name]) for task, _ in loaded}
    todo = [(task, ds) for task, ds in loaded if done[task.name] is None]
    weights = {task.name: len(ds) * options.epochs * (1 + (len(ks) > 1) * 0.8) for task, ds in todo}
    eta = Eta(weights)
    observer.message(
        f"vtab: {len(loaded)} task(s) from {options.root}, {len(loaded) - len(todo)} already done in {run.path}; "
        f"k among {', '.join(map(str, ks))}, {options.epochs} epochs, codec {codec}"
    )
    data = _header(session, options, codec, "vtab")
    for task, dataset in loaded:
        if done[task.name] is None:
            observer.message(f"vtab {task.name}: {_counts(dataset)}")
            started = time.perf_counter()
            done[task.name] = _vtab_task(options, session, run, observer, task, dataset, codec, ks,
                                         edges[task.name], started)  # fmt: skip
            run.save_result(task.name, signatures[task.name], done[task.name])
            observer.message(
                f"vtab {task.name}: test accuracy {done[task.name]['test_accuracy']:.1%} (k={done[task.name]['k']}); "
                f"{eta.finished(task.name)}"
            )
        data["tasks"] = [
            dict(done[t.name], task=t.name, title=t.title, group=t.group) for t, _ in loaded if done[t.name]
        ]
        data.update(tables.vtab_summary(data["tasks"]))
        _save_tables(run, data, tables.vtab_markdown)
    return data


def _vtab_task(options, session, run, observer, task, dataset, codec, ks, edge, started) -> dict[str, Any]:  # noqa: ANN001
    train, val, test = dataset.indices("train"), dataset.indices("val"), dataset.indices("test")
    store, per_image = fetch_once(session, run, task.name, dataset, ks=ks, codec=codec, options=options,
                                  observer=observer)  # fmt: skip
    config = options.train_config()
    with store:
        k, selection = choose_k(store, ks, edge, config, options, train=train, val=val, observer=observer)
        model = train_final(store, k, edge, config, train=train + val, observer=observer)
        report = evaluate(model, store, k, test, dataset.class_names)
    name = options.task_name(task.name)
    metrics = {"k": k, "epochs": options.epochs, "test_accuracy": report.accuracy, "test_loss": report.loss,
               "test_balanced_accuracy": report.balanced_accuracy, "train_images": len(train) + len(val),
               "test_images": len(test), "seed": options.seed, "lr": options.lr, "weight_decay": options.weight_decay,
               "batch_size": options.batch_size, "parameters": trainable_parameters(edge),
               "macs_per_image": macs_per_image(edge), "bytes_per_image": per_image[k]}  # fmt: skip
    details = {"protocol": "vtab", "task": task.name, "k": k, "codec": codec,
               "k_selection": selection.to_dict() if selection else None, "test": report.to_dict(),
               "train_config": dataclasses.asdict(config), "edge_network": edge.to_dict()}  # fmt: skip
    version = push(session, name, subset(dataset, train + val), edge, model, k=k, codec=codec, metrics=metrics, details=details,
                   tags={"protocol": "vtab"}, description=f"VTAB-1k {task.title} (mist reproduce vtab)")  # fmt: skip
    return {
        "k": k,
        "val200_accuracy_by_k": {str(c): a for c, a in selection.val_accuracy_by_k.items()} if selection else {},
        "test_accuracy": report.accuracy,
        "test_images": len(test),
        "bytes_per_image": per_image[k],
        "mib_per_image": mib(per_image[k]),
        "parameters": trainable_parameters(edge),
        "registry_task": name,
        "version": version.number,
        "seconds": time.perf_counter() - started,
    }


def _counts(dataset: Dataset) -> str:
    counts = {split: sum(per_class) for split, per_class in dataset.counts().items()}
    return ", ".join(f"{split} {n}" for split, n in counts.items() if n) + f"; {len(dataset.class_names)} classes"


# ---------------------------------------------------------------------------------------------- few-shot


FewShotPlan = list[tuple[str, Dataset, dict[tuple[int, int], list[int]]]]


def plan_fewshot(options: FewShotOptions) -> FewShotPlan:
    """Every dataset read and every (shots, seed) sample drawn, before any server is asked anything."""
    prepared = []
    for name, folder in resolve_datasets(options.root, options.tasks):
        dataset = load_split_dataset(folder)
        samples = {(n, s): sample_shots(dataset, n, s) for n in options.shots for s in options.seeds}
        prepared.append((name, dataset, samples))
    return prepared


def run_fewshot(options: FewShotOptions, session: Session, observer: TuneObserver, prepared: FewShotPlan) -> Tables:
    """Per dataset, shots and seed: a class-balanced sample of the train split, the recipe, scored on test."""
    codec, ks = _codec(options), _ks(session, options, auto=False)
    k = ks[0]
    run = RunFolder(options.out_dir)
    data = _header(session, options, codec, "fewshot")
    data.update(k=k, shots=list(options.shots), seeds=list(options.seeds), runs=[])
    weights = {f"{name}/{n}shot-seed{s}": len(idx) * options.epochs
               for name, _, samples in prepared for (n, s), idx in samples.items()}  # fmt: skip
    eta = Eta(weights)
    observer.message(f"fewshot: {len(prepared)} dataset(s), shots {list(options.shots)}, seeds "
                     f"{list(options.seeds)}, k={k}, {options.epochs} epochs, codec {codec}")  # fmt: skip
    for name, dataset, samples in prepared:
        task_name = options.task_name(name)
        edge = edge_for(session, task_name, dataset.class_names, options)
        test = dataset.indices("test")
        needed = sorted({i for idx in samples.values() for i in idx} | set(test))
        position = {index: p for p, index in enumerate(needed)}
        needed_set = subset(dataset, needed)
        units = {key: f"{name}/{key[0]}shot-seed{key[1]}" for key in samples}
        sigs = {key: signature(session, options, edge, codec, protocol="fewshot", dataset=name, shots=key[0],
                               sample_seed=key[1], k_used=k) for key in samples}  # fmt: skip
        results = {key: run.result(units[key], sigs[key]) for key in samples}
        if any(result is None for result in results.values()):
            store, per_image = fetch_once(session, run, f"fewshot-{name}", needed_set, ks=(k,), codec=codec,
                                          options=options, observer=observer)  # fmt: skip
            with store:
                for (shots, seed), indices in samples.items():
                    if results[(shots, seed)] is not None:
                        continue
                    started = time.perf_counter()
                    config = dataclasses.replace(options.train_config(), seed=options.seed + seed)
                    train = [position[i] for i in indices]
                    model = train_final(store, k, edge, config, train=train, observer=observer)
                    report = evaluate(model, store, k, [position[i] for i in test], dataset.class_names)
                    metrics = {"k": k, "epochs": options.epochs, "shots": shots, "sample_seed": seed,
                               "test_accuracy": report.accuracy, "train_images": len(train),
                               "test_images": len(test), "seed": config.seed,
                               "parameters": trainable_parameters(edge), "bytes_per_image": per_image[k]}  # fmt: skip
                    version = push(session, task_name, subset(dataset, indices), edge, model, k=k,
                                   codec=codec, metrics=metrics,
                                   details={"protocol": "fewshot", "dataset": name, "shots": shots,
                                            "sample_seed": seed, "test": report.to_dict(),
                                            "train_config": dataclasses.asdict(config)},
                                   tags={"protocol": "fewshot", "shots": str(shots), "sample_seed": str(seed)},
                                   description=f"{name} few-shot (mist reproduce fewshot)")  # fmt: skip
                    results[(shots, seed)] = {"test_accuracy": report.accuracy, "train_images": len(train),
                                              "test_images": len(test), "mib_per_image": mib(per_image[k]),
                                              "registry_task": task_name, "version": version.number,
                                              "seconds": time.perf_counter() - started}  # fmt: skip
                    run.save_result(units[(shots, seed)], sigs[(shots, seed)], results[(shots, seed)])
                    observer.message(f"fewshot {units[(shots, seed)]}: test accuracy {report.accuracy:.1%}; "
                                     f"{eta.finished(units[(shots, seed)])}")  # fmt: skip
                    _fewshot_tables(run, data, name, results, dataset)
        _fewshot_tables(run, data, name, results, dataset)
    return data


def _fewshot_tables(run: RunFolder, data: Tables, name: str, results: dict, dataset: Dataset) -> None:
    data["runs"] = [r for r in data["runs"] if r["dataset"] != name] + [
        dict(result, dataset=name, shots=shots, sample_seed=seed, classes=len(dataset.class_names))
        for (shots, seed), result in sorted(results.items())
        if result is not None
    ]
    data.update(tables.fewshot_summary(data["runs"], data["shots"]))
    _save_tables(run, data, tables.fewshot_markdown)


# ---------------------------------------------------------------------------------------------- domain generalisation


@dataclass(frozen=True)
class DgPlan:
    source_dir: Path
    source: Dataset
    train: list[int]  # the source images trained on (all of its train split, or an n-shot sample)
    targets: list[tuple[str, Dataset, list[int]]]  # (column name, dataset in the source's labels, indices scored)


def plan_dg(options: DgOptions) -> DgPlan:
    """The source and every target read, each target's classes checked against the source's, before any server is
    asked anything."""
    source_dir = Path(options.source).expanduser()
    source = load_split_dataset(source_dir, need=("train",))
    targets = []
    seen: dict[str, int] = {}
    for path in options.targets:
        folder = Path(path).expanduser()
        dataset, scored = load_target(folder, source.class_names)
        label = folder.name if folder.name not in seen else f"{folder.name}-{len(seen)}"
        seen[label] = len(seen)
        targets.append((label, dataset, scored))
    train = sample_shots(source, options.shots, options.seed) if options.shots else source.indices("train")
    return DgPlan(source_dir, source, train, targets)


def run_dg(options: DgOptions, session: Session, observer: TuneObserver, plan: DgPlan) -> Tables:
    """Train once on the source (optionally n-shot), push, then score that version on every target, each with the
    logits of its own classes only."""
    source_dir, source, train, targets = plan.source_dir, plan.source, plan.train, plan.targets
    val, test = source.indices("val"), source.indices("test")
    codec, ks = _codec(options), _ks(session, options, auto=bool(val))
    task_name = options.task_name(source_dir.name)
    edge = edge_for(session, task_name, source.class_names, options)
    run = RunFolder(options.out_dir)
    sig = signature(
        session, options, edge, codec, protocol="dg", source=str(source_dir), shots=options.shots, ks=list(ks)
    )
    data = _header(session, options, codec, "dg")
    data.update(source=source_dir.name, shots=options.shots, targets=[])
    eta = Eta({"source": len(train) * options.epochs, **{f"target-{label}": 0.0 for label, _, _ in targets}})
    trained = run.result("source", sig)
    if trained is None:
        observer.message(f"dg: training on {source_dir.name} ({len(train)} train images, "
                         f"{len(source.class_names)} classes), then {len(targets)} target(s)")  # fmt: skip
        trained = _dg_source(options, session, run, observer, source, train, val, test, ks, codec, edge, task_name)
        run.save_result("source", sig, trained)
        observer.message(
            f"dg: version {trained['version']} of {task_name} (k={trained['k']}); {eta.finished('source')}"
        )
    data["source_result"] = trained
    loaded = load_version(session.registry, task_name, version=trained["version"])
    for label, dataset, scored in targets:
        unit = f"target-{label}"
        target_sig = dict(sig, target=str(dataset.root), version=trained["version"])
        result = run.result(unit, target_sig)
        if result is None:
            result = _dg_target(session, run, observer, options, loaded, label, dataset, scored)
            run.save_result(unit, target_sig, result)
            observer.message(f"dg {label}: accuracy {result['accuracy']:.1%} over {result['classes']} classes; "
                             f"{eta.finished(unit)}")  # fmt: skip
        data["targets"] = [t for t in data["targets"] if t["target"] != label] + [dict(result, target=label)]
        _save_tables(run, data, tables.dg_markdown)
    _save_tables(run, data, tables.dg_markdown)
    return data


def _dg_source(options, session, run, observer, source, train, val, test, ks, codec, edge, task_name) -> dict:  # noqa: ANN001
    started = time.perf_counter()
    keep = sorted(set(train) | set(val) | set(test))
    position = {index: p for p, index in enumerate(keep)}
    needed = subset(source, keep)
    store, per_image = fetch_once(session, run, "dg-source", needed, ks=ks, codec=codec, options=options,
                                  observer=observer)  # fmt: skip
    config = options.train_config()
    train_p, val_p, test_p = ([position[i] for i in part] for part in (train, val, test))
    with store:
        k, selection = choose_k(store, ks, edge, config, options, train=train_p, val=val_p, observer=observer)
        model = train_final(store, k, edge, config, train=train_p, observer=observer)
        report = evaluate(model, store, k, test_p, source.class_names) if test_p else None
    metrics = {"k": k, "epochs": options.epochs, "train_images": len(train), "seed": options.seed,
               "parameters": trainable_parameters(edge), "bytes_per_image": per_image[k],
               **({"test_accuracy": report.accuracy} if report else {})}  # fmt: skip
    details = {"protocol": "dg", "shots": options.shots, "k_selection": selection.to_dict() if selection else None,
               "train_config": dataclasses.asdict(config), **({"test": report.to_dict()} if report else {})}  # fmt: skip
    version = push(session, task_name, subset(source, train), edge, model, k=k, codec=codec, metrics=metrics, details=details,
                   tags={"protocol": "dg", **({"shots": str(options.shots)} if options.shots else {})},
                   description=f"domain generalisation source {source.root.name} (mist reproduce dg)")  # fmt: skip
    return {"registry_task": task_name, "version": version.number, "k": k, "train_images": len(train),
            "source_test_accuracy": report.accuracy if report else None, "mib_per_image": mib(per_image[k]),
            "parameters": trainable_parameters(edge), "seconds": time.perf_counter() - started}  # fmt: skip


def _dg_target(session, run, observer, options, loaded, label, dataset, scored) -> dict:  # noqa: ANN001
    started = time.perf_counter()
    needed = subset(dataset, scored)
    store, per_image = fetch_once(session, run, f"dg-target-{label}", needed, ks=(loaded.k,), codec=loaded.codec,
                                  options=options, observer=observer)  # fmt: skip
    allowed = sorted({item.label for item in needed.items})
    logits, labels = [], []
    with store:
        for start in range(0, len(needed), 64):
            batch = list(range(start, min(len(needed), start + 64)))
            features, batch_labels = store.batch(batch, loaded.k)
            logits.append(loaded.model.logits(features.numpy()))
            labels.append(batch_labels.numpy())
    all_logits, all_labels = np.concatenate(logits), np.concatenate(labels)
    return {"accuracy": accuracy_of(all_logits, all_labels, allowed),
            "accuracy_all_classes": accuracy_of(all_logits, all_labels), "images": len(needed),
            "classes": len(allowed), "mib_per_image": mib(per_image[loaded.k]), "version": loaded.version.number,
            "seconds": time.perf_counter() - started}  # fmt: skip
