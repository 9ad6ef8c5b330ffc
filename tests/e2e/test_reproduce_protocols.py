"""`mist reproduce vtab|fewshot|dg` end to end on stand-in datasets written in the real layouts (reproduce/standins.py),
through a real registry and extractor (subprocesses on port 0, the tiny random ViT): tables, pushed versions, resume
after a finished run and after a SIGKILL, and bad layouts refused before any server is asked anything.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.tuner.reproduce.layouts import VTAB_TASKS
from services.tuner.reproduce.standins import write_dg, write_fewshot, write_vtab
from tests.helpers.process import ROOT, LineWatcher, child_environment
from tests.helpers.stack import run_cli, running_stack

pytestmark = pytest.mark.timeout(300)

TASKS = ("svhn", "patch_camelyon", "kitti")  # one per VTAB group
FAST = ["--epochs", "4", "--k-search-epochs", "2", "--progress", "log"]
NOWHERE = ["--extractor", "127.0.0.1:1", "--registry", "127.0.0.1:1"]  # nothing listens: any call would fail


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("standins")
    write_vtab(root / "vtab-1k", TASKS)
    write_fewshot(root / "fewshot")
    write_dg(root / "dg")
    return root


def reproduce(stack, *args: str) -> tuple[int, str, str]:
    return run_cli("reproduce", *args, *FAST, *stack.cli_flags())


def versions(stack, task: str) -> list[int]:
    with stack.endpoints(cache_dir=None).registry_client() as registry:
        return sorted(version.number for version in registry.list_versions(task))


# ---------------------------------------------------------------------------------------------- VTAB-1k


def test_vtab_writes_table_1_pushes_each_task_and_a_second_run_redoes_nothing(stack, standins, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = reproduce(stack, "vtab", "--root", str(standins / "vtab-1k"), "--tasks",
                                     ",".join(TASKS), "--out", str(out), "--json")  # fmt: skip
    assert code == 0, stderr
    table = json.loads(stdout)
    rows = {row["task"]: row for row in table["tasks"]}
    assert sorted(rows) == sorted(TASKS)
    for row in rows.values():
        assert row["k"] in (1, 2, 3, 4) and sorted(row["val200_accuracy_by_k"]) == ["1", "2", "3", "4"]
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["mib_per_image"] > 0 and row["parameters"] > 0
        assert versions(stack, row["registry_task"]) == [row["version"]]
    assert table["groups"]["natural"] == rows["svhn"]["test_accuracy"]
    assert table["mean"] == pytest.approx(sum(r["test_accuracy"] for r in rows.values()) / 3)
    assert table["mean_of_groups"] == pytest.approx(table["mean"])  # one task per group
    markdown = (out / "table.md").read_text()
    assert (
        "| Method | MiB/img | Params (M) | CIFAR-100 |" in markdown
        and "| Natural | Specialized | Structured | Mean |" in markdown
    )
    assert json.loads((out / "table.json").read_text())["tasks"] == table["tasks"]
    assert "3/3 done" in stderr and "left" in stderr  # progress with an ETA

    # A second run with the same folder finds every task done: nothing is fetched, trained or pushed.
    code, again, stderr = reproduce(stack, "vtab", "--root", str(standins / "vtab-1k"), "--tasks", ",".join(TASKS),
                                    "--out", str(out), "--json")  # fmt: skip
    assert code == 0, stderr
    assert json.loads(again)["tasks"] == table["tasks"] and "3 already done" in stderr
    assert all(versions(stack, row["registry_task"]) == [row["version"]] for row in rows.values())

    # One result lost: only that task runs again, from the features saved in the run folder.
    (out / "results" / "kitti.json").unlink()
    code, _, stderr = reproduce(stack, "vtab", "--root", str(standins / "vtab-1k"), "--tasks", ",".join(TASKS),
                                "--out", str(out), "--json")  # fmt: skip
    assert code == 0, stderr
    assert "2 already done" in stderr and "kitti: features of 36 images read from" in stderr
    assert versions(stack, rows["kitti"]["registry_task"]) == [rows["kitti"]["version"], rows["kitti"]["version"] + 1]
    assert versions(stack, rows["svhn"]["registry_task"]) == [rows["svhn"]["version"]]


def test_a_killed_vtab_run_continues_from_its_finished_tasks(stack, standins, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "services.tuner.cli", "reproduce", "vtab", "--root", str(standins / "vtab-1k"),
               "--tasks", ",".join(TASKS), "--out", str(out), "--epochs", "400", "--k-search-epochs", "2",
               "--progress", "log", "--task-prefix", "killed-", *stack.cli_flags()]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, env=child_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        LineWatcher(process.stderr, "reproduce-stderr").wait_for("vtab svhn: test accuracy", timeout_s=180)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (out / "results" / "svhn.json").exists()
    finished = json.loads((out / "results" / "svhn.json").read_text())["result"]

    code, stdout, stderr = run_cli(*command[3:], "--json")  # the same command, run again
    assert code == 0, stderr
    rows = {row["task"]: row for row in json.loads(stdout)["tasks"]}
    assert sorted(rows) == sorted(TASKS) and rows["svhn"]["version"] == finished["version"]
    assert versions(stack, "killed-svhn") == [finished["version"]]  # not trained again


def test_vtab_results_made_with_another_recipe_are_done_again(stack, standins, tmp_path):
    out = tmp_path / "recipes"
    args = ["vtab", "--root", str(standins / "vtab-1k"), "--tasks", "patch_camelyon", "--out", str(out),
            "--task-prefix", "recipe-", "--json"]  # fmt: skip
    code, first, stderr = reproduce(stack, *args)
    assert code == 0, stderr
    code, second, stderr = reproduce(stack, *args, "--lr", "3e-3")
    assert code == 0, stderr
    assert "0 already done" in stderr and "features of 24 images read from" in stderr  # same features, new recipe
    assert json.loads(second)["recipe"]["lr"] == 3e-3 and json.loads(second)["tasks"][0]["version"] == 2

    # Another run folder: the features are fetched again, and the extractor answers them from its cache.
    code, _, stderr = reproduce(stack, *args[:5], "--out", str(tmp_path / "elsewhere"), *args[7:])
    assert code == 0, stderr
    assert "patch_camelyon: 24 images fetched" in stderr and "(24 from the extractor's cache)" in stderr


# ---------------------------------------------------------------------------------------------- few-shot and DG


def test_fewshot_runs_every_shot_and_seed_of_both_layouts(stack, standins, tmp_path):
    code, stdout, stderr = reproduce(stack, "fewshot", "--root", str(standins / "fewshot"), "--shots", "1,2",
                                     "--seeds", "0,1", "--out", str(tmp_path / "fs"), "--json")  # fmt: skip
    assert code == 0, stderr
    table = json.loads(stdout)
    assert sorted(table["cells"]) == ["flowers", "pets"] and table["k"] == 4  # no val split: the last block
    for cells in table["cells"].values():
        assert sorted(cells) == ["1", "2"] and all(cell["seeds"] == 2 for cell in cells.values())
    runs = table["runs"]
    assert len(runs) == 8 and {(r["shots"], r["train_images"]) for r in runs} == {(1, 3), (2, 6)}
    assert versions(stack, "fewshot-flowers") == [1, 2, 3, 4]
    assert "| Dataset | 1-shot | 2-shot |" in (tmp_path / "fs" / "table.md").read_text()


def test_dg_scores_one_version_on_each_target_with_its_own_classes(stack, standins, tmp_path):
    targets = f"{standins / 'dg' / 'sketch'},{standins / 'dg' / 'subset'}"
    code, stdout, stderr = reproduce(stack, "dg", "--source", str(standins / "dg" / "source"), "--targets", targets,
                                     "--out", str(tmp_path / "dg"), "--json")  # fmt: skip
    assert code == 0, stderr
    table = json.loads(stdout)
    version = table["source_result"]["version"]
    columns = {row["target"]: row for row in table["targets"]}
    assert sorted(columns) == ["sketch", "subset"]
    assert columns["sketch"]["classes"] == 4 and columns["subset"]["classes"] == 2
    assert all(row["version"] == version for row in columns.values())
    # Restricting the argmax to the target's classes can only turn wrong answers right.
    assert all(row["accuracy"] >= row["accuracy_all_classes"] for row in columns.values())
    assert versions(stack, "dg-source") == [version]


# ---------------------------------------------------------------------------------------------- bad layouts


def refused(*args: str) -> str:
    """Run against addresses where nothing listens: a layout error must come before any call."""
    code, _, stderr = run_cli("reproduce", *args, *NOWHERE, "--progress", "quiet")
    assert code == 1, stderr
    assert "INVALID_ARGUMENT" in stderr and "UNAVAILABLE" not in stderr
    return stderr


def test_bad_vtab_layouts_name_the_file_and_line_before_any_call(tmp_path):
    root = write_vtab(tmp_path / "vtab-1k", ("kitti",))
    lists = root / "kitti"
    (lists / "val200.txt").unlink()
    assert f"{lists / 'val200.txt'}: the list is missing" in refused("vtab", "--root", str(root), "--tasks", "kitti")

    write_vtab(root, ("kitti",))
    lines = (lists / "test.txt").read_text().splitlines()
    lines[2] = "images/test/nothing.png 1"
    lines[4] = lines[4].rsplit(" ", 1)[0] + " 7"  # kitti has 4 classes
    (lists / "test.txt").write_text("\n".join(lines) + "\n")
    message = refused("vtab", "--root", str(root), "--tasks", "kitti")
    assert f"{lists / 'test.txt'}:3: images/test/nothing.png does not exist" in message
    assert f"{lists / 'test.txt'}:5: label 7 is outside the class set (0..3)" in message

    assert "has no folder for task(s) cifar" in refused("vtab", "--root", str(root))
    assert "'imagenet' is not a VTAB-1k task" in refused("vtab", "--root", str(root), "--tasks", "imagenet")


def test_bad_fewshot_and_dg_inputs_are_refused_before_any_call(tmp_path):
    fewshot = write_fewshot(tmp_path / "fewshot", per_class=2)
    assert "needs 4 train images per class" in refused("fewshot", "--root", str(fewshot), "--shots", "4")

    dg = write_dg(tmp_path / "dg")
    stranger = dg / "stranger"
    for name in ("n01", "n99"):
        (stranger / name).mkdir(parents=True)
        (stranger / name / "a.png").write_bytes((dg / "sketch" / "n01" / "0000.png").read_bytes())
    message = refused("dg", "--source", str(dg / "source"), "--targets", f"{dg / 'sketch'},{stranger}")
    assert f"target {stranger}: classes 'n99' are not among the source's 4 classes" in message

    listed = dg / "listed"
    listed.mkdir()
    (listed / "a.png").write_bytes((dg / "sketch" / "n01" / "0000.png").read_bytes())
    (listed / "test.txt").write_text("a.png 0\na.png 9\n")
    message = refused("dg", "--source", str(dg / "source"), "--targets", str(listed))
    assert f"{listed / 'test.txt'}:2: label 9 is outside the class set (0..3)" in message


def test_the_vtab_table_names_all_19_tasks():
    assert len(VTAB_TASKS) == 19 and len({task.name for task in VTAB_TASKS}) == 19
