"""The parts of `mist reproduce` that need no server: layouts and their errors, few-shot sampling, the saved features
of a run folder, results and their signatures, the ETA and the tables (the protocols end to end: tests/e2e)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.common.errors import InvalidArgumentError
from services.common.pb import feature_pb2
from services.common.wire.codec import CodecConfig, FeatureCodec
from services.tuner.feature_store import FeatureStore
from services.tuner.reproduce import tables
from services.tuner.reproduce.layouts import (
    LayoutError,
    class_names_for,
    load_split_dataset,
    load_vtab,
    read_list,
    resolve_datasets,
    resolve_vtab,
    sample_shots,
    vtab_task,
)
from services.tuner.reproduce.options import FewShotOptions, VtabOptions
from services.tuner.reproduce.runner import Eta, RunFolder, _load_features, _save_features, accuracy_of
from services.tuner.reproduce.standins import write_fewshot, write_split_dataset, write_vtab

BACKBONE = feature_pb2.BackboneId(name="vit_tiny_test", weights_fingerprint="random-0")


# ---------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    ("given", "name"),
    [("cifar", "cifar"), ("CIFAR_100", "cifar"), ("pets", "oxford_iiit_pet"), ("dsprites-loc", "dsprites_loc"),
     ("smallnorb_elevation", "smallnorb_ele"), ("flowers102", "oxford_flowers102")],
)  # fmt: skip
def test_vtab_task_names_and_the_aliases_of_other_code_bases(given, name):
    assert vtab_task(given).name == name


def test_an_unknown_vtab_task_lists_the_real_ones():
    with pytest.raises(InvalidArgumentError, match="'mnist' is not a VTAB-1k task; the tasks are cifar, caltech101"):
        vtab_task("mnist")


def test_a_task_folder_under_an_alias_is_found(tmp_path):
    write_vtab(tmp_path, ("kitti",))
    (tmp_path / "kitti").rename(tmp_path / "kitti_dist")
    [(task, folder)] = resolve_vtab(tmp_path, ["kitti"])
    assert task.name == "kitti" and folder == tmp_path / "kitti_dist"


def test_read_list_names_the_file_and_line_of_every_problem(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    listing = tmp_path / "train.txt"
    listing.write_text("a.png 0\n\nno-label\na.png zero\n/etc/passwd 1\n../a.png 1\nmissing.png 1\na.png 5\n")
    problems: list[str] = []
    entries = read_list(listing, 3, problems)
    assert [(e.path, e.label, e.line) for e in entries] == [("a.png", 0, 1)]
    assert problems == [
        f"{listing}:3: expected 'relative/path label', got 'no-label'",
        f"{listing}:4: the label 'zero' is not an integer",
        f"{listing}:5: '/etc/passwd' must be a path relative to {tmp_path}",
        f"{listing}:6: '../a.png' must be a path relative to {tmp_path}",
        f"{listing}:7: missing.png does not exist under {tmp_path}",
        f"{listing}:8: label 5 is outside the class set (0..2)",
    ]


def test_paths_with_spaces_and_an_empty_list(tmp_path):
    (tmp_path / "my image.png").write_bytes(b"x")
    (tmp_path / "train.txt").write_text("my image.png 1\n")
    (tmp_path / "empty.txt").write_text("\n")
    problems: list[str] = []
    assert read_list(tmp_path / "train.txt", 2, problems)[0].path == "my image.png"
    assert read_list(tmp_path / "empty.txt", 2, problems) == [] and problems == [
        f"{tmp_path / 'empty.txt'}: the list names no image"
    ]


def test_load_vtab_splits_and_the_union_check(tmp_path):
    write_vtab(tmp_path, ("patch_camelyon",), train=3, val=1, test=2)
    task, folder = resolve_vtab(tmp_path, ["patch_camelyon"])[0]
    dataset = load_vtab(task, folder)
    assert dataset.class_names == ("0", "1") and dataset.layout == "lists"
    assert {split: sum(n) for split, n in dataset.counts().items()} == {"train": 6, "val": 2, "test": 4}

    merged = folder / "train800val200.txt"
    merged.write_text(merged.read_text() + "images/test/000_0000.png 0\n")
    with pytest.raises(LayoutError, match=r"train800val200.txt:9: images/test/000_0000.png 0 is in neither"):
        load_vtab(task, folder)


def test_class_names_sort_like_their_numbers():
    names = class_names_for(102)
    assert names[:3] == ("000", "001", "002") and sorted(names) == list(names)


def test_dataset_folders_in_both_layouts(tmp_path):
    write_fewshot(tmp_path)
    found = dict(resolve_datasets(tmp_path))
    assert sorted(found) == ["flowers", "pets"]
    flowers, pets = load_split_dataset(found["flowers"]), load_split_dataset(found["pets"])
    assert flowers.class_names == ("rose", "tulip", "daisy") and flowers.layout == "lists"
    assert pets.class_names == ("cat", "dog", "hamster") and pets.layout == "split_folders"
    assert resolve_datasets(found["pets"]) == [("pets", found["pets"])]  # the root itself is a dataset
    with pytest.raises(InvalidArgumentError, match="has no dataset folder .* for cows"):
        resolve_datasets(tmp_path, ["cows"])


def test_a_dataset_without_a_test_split_is_refused(tmp_path):
    write_split_dataset(tmp_path / "d", ("a", "b"), layout="folders", test=0)
    with pytest.raises(LayoutError, match="no test.txt or test/"):
        load_split_dataset(tmp_path / "d")


# ---------------------------------------------------------------------------------------------- sampling


def test_few_shot_samples_are_balanced_deterministic_nested_and_seed_dependent(tmp_path):
    dataset = load_split_dataset(write_split_dataset(tmp_path / "d", ("a", "b", "c"), train=8))
    one, four = sample_shots(dataset, 1, seed=0), sample_shots(dataset, 4, seed=0)
    assert sample_shots(dataset, 4, seed=0) == four
    assert set(one) <= set(four)
    assert sorted(dataset.items[i].label for i in four) == [0] * 4 + [1] * 4 + [2] * 4
    assert all(dataset.items[i].split == "train" for i in four)
    assert {tuple(sample_shots(dataset, 4, seed=s)) for s in range(5)} != {tuple(four)}


def test_sampling_does_not_depend_on_the_order_of_the_list(tmp_path):
    folder = write_split_dataset(tmp_path / "d", ("a", "b"), train=6)
    dataset = load_split_dataset(folder)
    names = sorted(dataset.items[i].name for i in sample_shots(dataset, 3, seed=1))
    listing = folder / "train.txt"
    listing.write_text("\n".join(reversed(listing.read_text().splitlines())) + "\n")
    shuffled = load_split_dataset(folder)
    assert sorted(shuffled.items[i].name for i in sample_shots(shuffled, 3, seed=1)) == names


def test_too_few_images_for_the_shots_names_the_classes(tmp_path):
    dataset = load_split_dataset(write_split_dataset(tmp_path / "d", ("a", "b"), train=2))
    with pytest.raises(
        InvalidArgumentError, match=r"4-shot sampling needs 4 train images per class; too few in a \(2\)"
    ):
        sample_shots(dataset, 4, seed=0)


# ---------------------------------------------------------------------------------------------- run folder


def _store(count: int, ks=(1, 2)) -> tuple[FeatureStore, list]:
    codec = FeatureCodec(CodecConfig.parse("i8o-zstd"))
    store = FeatureStore([i % 2 for i in range(count)], num_classes=2)
    for index in range(count):
        for k in ks:
            values = np.random.default_rng([index, k]).normal(size=(5, 8)).astype(np.float32)
            store.add(index, k, codec.encode(values, backbone=BACKBONE, k=k))
    return store, [i % 2 for i in range(count)]


def test_saved_features_load_back_byte_for_byte_and_bad_files_are_refetched(tmp_path):
    write_split_dataset(tmp_path / "d", ("a", "b"), train=2, test=1)
    dataset = load_split_dataset(tmp_path / "d")
    store, _ = _store(len(dataset))
    header = {"schema": 1, "codec": "i8o-zstd", "ks": [1, 2], "images": len(dataset), "digest": "x"}
    path = tmp_path / "f.feat"
    _save_features(path, header, store, (1, 2))
    with _load_features(path, header, dataset) as loaded:
        for index in range(len(dataset)):
            for k in (1, 2):
                assert loaded.message_bytes(index, k) == store.message_bytes(index, k)
    assert _load_features(path, {**header, "codec": "i8-zstd"}, dataset) is None  # fetched with another codec
    path.write_bytes(path.read_bytes()[:-10])  # killed while writing (the rename makes this rare): fetch again
    assert _load_features(path, header, dataset) is None
    assert _load_features(tmp_path / "absent.feat", header, dataset) is None
    store.close()


def test_a_result_counts_only_with_the_signature_it_was_made_with(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.save_result("cifar/1", {"lr": 0.001, "ks": [3, 6]}, {"test_accuracy": 0.5})
    assert run.result("cifar/1", {"lr": 0.001, "ks": [3, 6]}) == {"test_accuracy": 0.5}
    assert run.result("cifar/1", {"lr": 0.003, "ks": [3, 6]}) is None
    assert run.result("dtd", {"lr": 0.001}) is None
    (tmp_path / "run" / "results" / "cifar_1.json").write_text("{not json")
    assert run.result("cifar/1", {"lr": 0.001, "ks": [3, 6]}) is None
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_eta_weighs_the_units_left_by_the_time_the_finished_ones_took():
    now = [0.0]
    eta = Eta({"a": 100.0, "b": 300.0}, clock=lambda: now[0])
    now[0] = 60.0
    assert eta.finished("a") == "1/2 done, 1 min 00 s elapsed, about 3 min 00 s left"
    now[0] = 240.0
    assert eta.finished("b") == "2/2 done, 4 min 00 s elapsed"


def test_accuracy_restricted_to_the_target_classes():
    logits = np.array([[5.0, 1.0, 2.0], [0.0, 1.0, 3.0]])
    labels = np.array([2, 1])
    assert accuracy_of(logits, labels) == 0.0  # argmax 0 and 2
    assert accuracy_of(logits, labels, allowed=[1, 2]) == 0.5  # argmax over classes 1 and 2: 2 and 2


# ---------------------------------------------------------------------------------------------- tables and flags


def _task(name: str, group: str, accuracy: float) -> dict:
    return {"task": name, "group": group, "test_accuracy": accuracy, "mib_per_image": 0.15, "parameters": 220_000,
            "k": 12, "val200_accuracy_by_k": {"3": 0.4, "12": 0.5}, "test_images": 100, "registry_task": f"vtab-{name}",
            "version": 1, "seconds": 3.0}  # fmt: skip


def test_vtab_summary_means_and_a_group_missing():
    summary = tables.vtab_summary([_task("cifar", "natural", 0.7), _task("dtd", "natural", 0.5),
                                   _task("kitti", "structured", 0.9)])  # fmt: skip
    assert summary["groups"] == {"natural": pytest.approx(0.6), "specialized": None, "structured": 0.9}
    assert summary["mean"] == pytest.approx(0.7) and summary["mean_of_groups"] is None


def test_vtab_markdown_has_every_column_of_table_1():
    data = {"backbone": "vit_base_patch16_224", "weights_fingerprint": "sha256-abc", "pretrained": True,
            "codec": "i8o-zstd", "recipe": {"lr": 0.001, "weight_decay": 0.0001, "batch_size": 32, "epochs": 100,
                                            "resolved_warmup_epochs": 10, "seed": 0},
            "tasks": [_task("cifar", "natural", 0.7)]}  # fmt: skip
    data.update(tables.vtab_summary(data["tasks"]))
    markdown = tables.vtab_markdown(data)
    header = next(line for line in markdown.splitlines() if line.startswith("| Method"))
    assert header.count("|") == 3 + 19 + 3 + 1 + 1  # method, MiB, params; 19 tasks; 3 groups; mean (26 columns)
    assert "| MIST (vit_base_patch16_224) | 0.15 | 0.22 | 70.0 |" in markdown
    assert "100 epochs with 10 warm-up epochs" in markdown and "1 of 19 tasks ran" in markdown


def test_fewshot_summary_is_mean_and_sample_spread_over_seeds():
    runs = [{"dataset": "pets", "shots": 1, "test_accuracy": a} for a in (0.4, 0.6)]
    summary = tables.fewshot_summary(runs, [1, 2])
    assert summary["cells"]["pets"]["1"] == {"mean": pytest.approx(0.5), "std": pytest.approx(0.1414, abs=1e-4),
                                             "seeds": 2}  # fmt: skip
    assert "2" not in summary["cells"]["pets"] and summary["average"] == {"1": pytest.approx(0.5)}


def test_reproduce_flags_default_to_the_paper_recipe_and_name_tasks():
    options = VtabOptions(root="x")
    assert options.epochs == 100 and options.train_config().resolved_warmup_epochs == 10
    assert options.out_dir == "reproduce-vtab" and options.task_name("oxford_iiit_pet") == "vtab-oxford_iiit_pet"
    assert FewShotOptions(root="x", task_prefix="FS ").task_name("Food 101") == "fs-food-101"
    with pytest.raises(InvalidArgumentError, match="--shots needs at least one value"):
        FewShotOptions(root="x", shots=())
    with pytest.raises(InvalidArgumentError, match="not a valid task name"):
        VtabOptions(root="x", task_prefix="-")


def test_cli_lists_the_protocols(capsys):
    from services.tuner.cli import main

    assert main(["reproduce", "--help"], env={}) == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in ("vtab", "fewshot", "dg"))
    assert main(["reproduce", "vtab"], env={}) == 2  # --root is required
    assert "--root" in capsys.readouterr().err


def test_json_tables_have_no_nan(tmp_path):
    run = RunFolder(tmp_path)
    run.write_tables("# t", {"mean": None})
    assert json.loads(Path(tmp_path / "table.json").read_text()) == {"mean": None}
