"""End to end through real servers (subprocesses on port 0): `mist tune`, `mist predict` and `mist evaluate` on the
synthetic data, an extractor killed and restarted in the middle of a tune, and bad data refused before any push.

One registry + extractor stack serves the module; the tiny random ViT (4 blocks, 17 x 32 features) keeps it fast.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from services.common.clients.extractor import ImageItem
from services.common.wire.codec import decode_feature
from services.tuner.data import load_dataset
from services.tuner.edge_network import from_safetensors_bytes
from services.tuner.reports import TuneObserver
from services.tuner.tune import TuneOptions, find_task, tune_path
from tests.helpers.process import ROOT, LineWatcher, child_environment
from tests.helpers.stack import E2E_CLASSES, run_cli, running_stack, write_e2e_dataset

pytestmark = pytest.mark.timeout(300)

TASK = "e2e-shapes"
CHANCE = 1 / len(E2E_CLASSES)
# 15 epochs at lr 3e-3 reach 0.675 held-out accuracy on this data; 0.45 leaves three standard errors of room.
ABOVE_CHANCE = 0.45
TRAIN_FLAGS = ["--epochs", "15", "--lr", "3e-3", "--k-search-epochs", "3"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_e2e_dataset(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="module")
def tuned(stack, data) -> dict:
    """Version 1 of TASK: `mist tune --k auto --alias production --json`."""
    code, out, err = run_cli(
        "tune", "--task", TASK, "--data", str(data), "--alias", "production", "--json", *TRAIN_FLAGS, *stack.cli_flags()
    )
    assert code == 0, err
    return json.loads(out)


def registry_client(stack):
    return stack.endpoints(cache_dir=None).registry_client()


# ---------------------------------------------------------------------------------------------- tune


def test_tune_with_auto_k_beats_chance_and_pushes_metrics_lineage_and_alias(tuned, stack, data):
    # Prepare: what the registry holds after the module's first tune
    with registry_client(stack) as registry:
        version = registry.get_version(TASK, alias="production")
        pulled = registry.pull(TASK, version=1, use_cache=False)
    details = json.loads(version.details_json)

    # Assert: the tune's own report
    assert tuned["version"] == 1 and tuned["task_created"] is True and tuned["parent_version"] == 0
    assert tuned["k"] in (1, 2, 3, 4) and sorted(tuned["k_selection"]["val_accuracy_by_k"]) == ["1", "2", "3", "4"]
    assert tuned["test"]["count"] == 40 and tuned["test"]["accuracy"] >= ABOVE_CHANCE > CHANCE
    assert tuned["alias"] == {"name": "production", "from_version": 0, "to_version": 1}
    # ... what the registry stored: metrics, lineage, details, alias
    assert version.number == 1
    assert version.metrics["k"] == tuned["k"] and version.metrics["test_accuracy"] == tuned["test"]["accuracy"]
    assert version.metrics["lst_bytes_per_image"] == 5 * 17 * 32 * 4  # x_0 + 4 blocks of [17, 32] float32
    assert version.metrics["bytes_per_image"] < version.metrics["mist_f32_bytes_per_image"] == 17 * 32 * 4
    assert version.parent_version == 0 and version.tuner.startswith("mist/")
    assert version.dataset_fingerprint == load_dataset(data).fingerprint()
    assert version.tags["k"] == str(tuned["k"]) and version.tags["codec"] == "i8o-zstd"
    assert np.array(details["test"]["confusion_matrix"]).sum(axis=1).tolist() == [10, 10, 10, 10]
    assert set(details["test"]["per_class_accuracy"]) == set(E2E_CLASSES)
    assert details["k_selection"]["chosen_k"] == tuned["k"]
    # ... and the weights carry their k and codec for predict
    assert pulled.task.k == tuned["k"] and list(pulled.task.class_names) == sorted(E2E_CLASSES)
    _, metadata = from_safetensors_bytes(pulled.blob)
    assert metadata["mist.k"] == str(tuned["k"]) and metadata["mist.codec"] == "i8o-zstd"


def test_second_tune_with_fixed_k_names_its_parent_and_moves_the_alias(tuned, stack, data):
    # Execute: version 2 from another seed at k = 2
    code, out, err = run_cli(
        "tune",
        "--task",
        TASK,
        "--data",
        str(data),
        "--k",
        "2",
        "--seed",
        "1",
        "--alias",
        "production",
        "--json",
        *TRAIN_FLAGS,
        *stack.cli_flags(),
    )

    # Assert
    assert code == 0, err
    result = json.loads(out)
    assert (result["version"], result["parent_version"], result["k"], result["task_created"]) == (2, 1, 2, False)
    assert result["k_selection"] is None
    assert result["alias"] == {"name": "production", "from_version": 1, "to_version": 2}
    with registry_client(stack) as registry:
        assert registry.get_alias(TASK, "production").version == 2
        assert registry.get_version(TASK, version=2).metrics["k"] == 2
        assert registry.get_task(TASK).k == tuned["k"]  # the task keeps the k its first version chose


def test_the_same_seed_gives_bitwise_the_same_weights(stack, data):
    # Execute: two tasks tuned from the same data with the same seed
    for task in ("e2e-repro-a", "e2e-repro-b"):
        code, _, err = run_cli(
            "tune", "--task", task, "--data", str(data), "--k", "2", "--epochs", "4", "--seed", "7", *stack.cli_flags()
        )
        assert code == 0, err

    # Assert: every tensor equal to the bit (the blobs' sha256 may differ: see the report on metadata order)
    with registry_client(stack) as registry:
        first, second = (
            load_safetensors(registry.pull(task, use_cache=False).blob) for task in ("e2e-repro-a", "e2e-repro-b")
        )
    assert first.keys() == second.keys() and len(first) == 4 * 6 + 4 + 4  # blocks, norm and head, token readout
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_existing_task_refuses_another_edge_network(tuned, stack, data):
    # Prepare
    with registry_client(stack) as registry:
        before = [v.number for v in registry.list_versions(TASK)]

    # Execute
    code, out, err = run_cli(
        "tune", "--task", TASK, "--data", str(data), "--num-blocks", "2", *stack.cli_flags(), "--progress", "quiet"
    )

    # Assert: one line naming the difference, nothing pushed
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("mist tune: error: FAILED_PRECONDITION:")
    assert "num_blocks 2 (the task has 4)" in err
    with registry_client(stack) as registry:
        assert [v.number for v in registry.list_versions(TASK)] == before


def test_unreachable_extractor_is_one_unavailable_line_naming_it(stack, data):
    # Prepare: the registry answers, nothing listens where the extractor should be
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{sock.getsockname()[1]}"

    # Execute
    code, out, err = run_cli(
        "tune",
        "--task",
        "e2e-no-extractor",
        "--data",
        str(data),
        *stack.cli_flags(),
        "--extractor",
        nowhere,
        "--progress",
        "quiet",
    )

    # Assert
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"mist tune: error: UNAVAILABLE: extractor {nowhere}: ")


# ---------------------------------------------------------------------------------------------- predict, evaluate


def in_process_probabilities(stack, paths: list[Path], version: int) -> tuple[list[str], np.ndarray]:
    """Labels and probabilities computed here from the pulled weights and features decoded from the extractor."""
    with registry_client(stack) as registry:
        pulled = registry.pull(TASK, version=version, use_cache=False)
    model, metadata = from_safetensors_bytes(pulled.blob)
    k, codec = int(metadata["mist.k"]), metadata["mist.codec"]
    with stack.endpoints().extractor_client() as extractor:
        results = list(extractor.extract([ImageItem(str(p), p.read_bytes()) for p in paths], ks=(k,), codec=codec))
    features = torch.from_numpy(np.stack([decode_feature(r.features[0]) for r in results]))
    with torch.inference_mode():
        probabilities = torch.softmax(model.eval()(features), dim=1).numpy()
    names = list(pulled.task.class_names)
    return [names[i] for i in probabilities.argmax(axis=1)], probabilities


def test_predict_matches_in_process_inference(tuned, stack, data):
    # Prepare
    paths = sorted((data / "test").rglob("*.png"))
    labels, probabilities = in_process_probabilities(stack, paths, version=1)

    # Execute
    code, out, err = run_cli(
        "predict", "--task", TASK, "--version", "1", "--top-k", "4", str(data / "test"), *stack.cli_flags()
    )

    # Assert: one JSON line per image, in order, equal to the in-process answer
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["file"] for line in lines] == [str(p) for p in paths]
    assert [line["label"] for line in lines] == labels
    names = sorted(E2E_CLASSES)
    for line, row in zip(lines, probabilities, strict=True):
        assert line["version"] == 1 and len(line["top"]) == 4
        assert line["probability"] == pytest.approx(float(row.max()), abs=1e-5)
        for entry in line["top"]:
            assert entry["probability"] == pytest.approx(float(row[names.index(entry["label"])]), abs=1e-5)
    accuracy = np.mean([line["label"] == Path(line["file"]).parent.name for line in lines])
    assert accuracy == pytest.approx(tuned["test"]["accuracy"])


def test_predict_by_alias_answers_per_image_and_flags_a_bad_one(tuned, stack, data, tmp_path):
    # Prepare: a good image, an undecodable one, another good one
    good = sorted((data / "test" / "red_cross").glob("*.png"))[:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    with registry_client(stack) as registry:
        production = registry.get_alias(TASK, "production").version

    # Execute
    code, out, err = run_cli(
        "predict", "--task", TASK, "--alias", "production", str(good[0]), str(broken), str(good[1]), *stack.cli_flags()
    )

    # Assert: three lines in order, the middle one an error; exit 1 with one line on stderr
    assert code == 1 and err.strip().startswith("mist predict: error: 1 of 3 image(s) could not be classified")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["file"] for line in lines] == [str(good[0]), str(broken), str(good[1])]
    assert {line["version"] for line in lines} == {production}
    assert lines[1]["error"]["code"] == "INVALID_ARGUMENT" and lines[1]["error"]["reason"] == "undecodable_image"
    assert lines[0]["label"] in E2E_CLASSES and lines[2]["label"] in E2E_CLASSES


def test_evaluate_scores_the_test_split_as_the_tune_did(tuned, stack, data):
    # Execute
    code, out, err = run_cli(
        "evaluate", "--task", TASK, "--version", "1", "--data", str(data), "--json", *stack.cli_flags()
    )

    # Assert: the same 40 test images, the same accuracy and confusion matrix as the tune reported
    assert code == 0, err
    report = json.loads(out)
    assert (report["version"], report["split"], report["count"]) == (1, "test", 40)
    assert report["accuracy"] == pytest.approx(tuned["test"]["accuracy"])
    assert report["confusion_matrix"] == tuned["test"]["confusion_matrix"]


def test_the_numpy_and_torch_runtimes_answer_alike_on_every_image(tuned, stack, data):
    # Execute: the default runtime (numpy) and the training code's (torch), on every test image and in evaluate
    runs = {
        runtime: run_cli("predict", "--task", TASK, "--version", "1", "--top-k", "4", "--runtime", runtime,
                         str(data / "test"), *stack.cli_flags())
        for runtime in ("numpy", "torch")
    }  # fmt: skip
    reports = {
        runtime: run_cli("evaluate", "--task", TASK, "--version", "1", "--data", str(data), "--json",
                         "--runtime", runtime, *stack.cli_flags())
        for runtime in ("numpy", "torch")
    }  # fmt: skip

    # Assert: same label on every image, every listed probability within 1e-4, the same evaluation
    assert all(code == 0 for code, _, _ in [*runs.values(), *reports.values()]), runs
    numpy_lines, torch_lines = ([json.loads(line) for line in runs[r][1].splitlines()] for r in ("numpy", "torch"))
    assert len(numpy_lines) == len(torch_lines) == 40
    for ours, theirs in zip(numpy_lines, torch_lines, strict=True):
        assert (ours["file"], ours["label"]) == (theirs["file"], theirs["label"])
        assert [e["label"] for e in ours["top"]] == [e["label"] for e in theirs["top"]]
        assert all(
            abs(a["probability"] - b["probability"]) < 1e-4 for a, b in zip(ours["top"], theirs["top"], strict=True)
        )
    numpy_report, torch_report = (json.loads(reports[r][1]) for r in ("numpy", "torch"))
    assert numpy_report["confusion_matrix"] == torch_report["confusion_matrix"] == tuned["test"]["confusion_matrix"]
    assert numpy_report["loss"] == pytest.approx(torch_report["loss"], abs=1e-4)


_WITHOUT_TORCH = """
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "torchvision", "safetensors"):
            raise ImportError(f"{name} is not installed on this device")

sys.meta_path.insert(0, Refuse())
from services.tuner import cli
code = cli.main(sys.argv[1:], env={})
print(json.dumps({"exit": code, "loaded": sorted(n for n in sys.modules if n.split(".")[0] in ("torch", "timm"))}))
"""


@pytest.mark.parametrize("command", ["help", "predict", "evaluate"])
def test_a_device_without_torch_predicts_and_evaluates(tuned, stack, data, command):
    # Prepare: an interpreter in which importing torch, timm or safetensors fails, as on a `.[device]` install
    args = {
        "help": ["predict", "--help"],
        "predict": ["predict", "--task", TASK, "--alias", "production", str(data / "test" / "red_cross")],
        "evaluate": ["evaluate", "--task", TASK, "--version", "1", "--data", str(data), "--json"],
    }[command]
    flags = [] if command == "help" else stack.cli_flags()

    # Execute
    done = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, *args, *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=child_environment())  # fmt: skip

    # Assert: it ran to the end with nothing of torch loaded, and answered
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"exit": 0, "loaded": []}
    if command == "predict":
        answers = [json.loads(line) for line in lines[:-1]]
        assert len(answers) == len(list((data / "test" / "red_cross").glob("*.png"))) > 0
        assert all(answer["label"] in E2E_CLASSES for answer in answers)
    if command == "evaluate":
        report = json.loads("\n".join(lines[:-1]))
        assert report["count"] == 40 and report["confusion_matrix"] == tuned["test"]["confusion_matrix"]


def test_a_predictor_keeps_its_channel_and_weights_across_images(tuned, stack, data, tmp_path):
    # Prepare: the batch answers for the same images, a missing file and an undecodable one
    from services.tuner.predict import Predictor

    paths = sorted((data / "test").rglob("*.png"))[:6]
    batch_code, batch_out, _ = run_cli(
        "predict", "--task", TASK, "--version", "1", *map(str, paths), *stack.cli_flags()
    )
    expected = [json.loads(line) for line in batch_out.splitlines()]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")

    # Execute: one image at a time through one Predictor
    with Predictor(stack.endpoints(cache_dir=None), TASK, version=1) as predictor:
        answers = [predictor.predict_file(path).to_dict(id_key="file") for path in paths]
        missing = predictor.predict_file(tmp_path / "missing.png")
        undecodable = predictor.predict_file(broken)
        in_memory = predictor.predict(paths[0].read_bytes(), "frame-1")
        loaded = predictor.loaded

    # Assert: the same answers as the batch command, per-image errors instead of exceptions
    assert batch_code == 0 and answers == expected
    assert (missing.error_code, missing.error_reason) == ("INVALID_ARGUMENT", "unreadable_file")
    assert (undecodable.error_code, undecodable.error_reason) == ("INVALID_ARGUMENT", "undecodable_image")
    assert (in_memory.item_id, in_memory.label) == ("frame-1", expected[0]["label"])
    assert loaded.runtime == "numpy" and loaded.version.number == 1


def test_predict_reads_paths_from_stdin_and_answers_each_line_as_it_comes(tuned, stack, data, tmp_path):
    # Prepare
    first, second = sorted((data / "test" / "red_cross").glob("*.png"))[:2]
    command = [sys.executable, "-m", "services.tuner.cli", "predict", "--task", TASK, "--alias", "production", "-"]
    process = subprocess.Popen([*command, *stack.cli_flags()], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=child_environment())  # fmt: skip
    try:
        # Execute: a path, then its answer before the next path is even written (a camera waiting per frame)
        process.stdin.write(f"{first}\n")
        process.stdin.flush()
        answer = json.loads(process.stdout.readline())
        process.stdin.write(f"{tmp_path / 'missing.png'}\n\n{second}\n")
        process.stdin.close()
        rest = [json.loads(line) for line in process.stdout.read().splitlines()]
        code = process.wait(timeout=60)
        err = process.stderr.read()
    finally:
        process.kill()
        process.wait()

    # Assert: one line per path in order (the blank line skipped), the missing file an error line, exit 1
    assert answer["file"] == str(first) and answer["label"] in E2E_CLASSES
    assert [line["file"] for line in rest] == [str(tmp_path / "missing.png"), str(second)]
    assert rest[0]["error"]["reason"] == "unreadable_file" and rest[1]["label"] in E2E_CLASSES
    assert code == 1 and err.strip().splitlines()[-1] == (
        "mist predict: error: 1 of 3 image(s) could not be classified (see their lines)"
    )


# ---------------------------------------------------------------------------------------------- resilience


class RestartExtractorOnce(TuneObserver):
    """Kills the extractor (SIGKILL) and starts a new one on the same port once a third of the images are in."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.restarted_at: int | None = None

    def on_extraction(self, done: int, total: int, feature_bytes: int) -> None:
        if self.restarted_at is None and done >= total // 3:
            self.restarted_at = done
            self.stack.restart_extractor()


def served_images(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mist_extractor_images_served_total{")
    )


def test_extractor_restart_during_a_tune_loses_no_image_and_duplicates_none(stack, data):
    # Prepare
    observer = RestartExtractorOnce(stack)
    options = TuneOptions(task="e2e-restart", epochs=3, k_search_epochs=1)
    total = len(load_dataset(data))

    # Execute
    with stack.endpoints().extractor_client() as extractor, stack.endpoints().registry_client() as registry:
        result = tune_path(data, options, extractor, registry, observer)
        _, metrics_port = stack.extractor.wait_listening()

    # Assert: the restart happened mid-extraction, the new server answered the rest, each image got one result
    assert observer.restarted_at is not None and observer.restarted_at < total
    assert 0 < served_images(metrics_port) <= total - observer.restarted_at
    assert result.extraction.results == result.extraction.images == total
    assert result.version.number == 1 and result.version.metrics["train_images"] == 80


# ---------------------------------------------------------------------------------------------- bad data


def copy_class(data: Path, name: str, into: Path, count: int = 4) -> None:
    (into / name).mkdir(parents=True)
    for image in sorted((data / "train" / name).glob("*.png"))[:count]:
        shutil.copy(image, into / name / image.name)


def make_empty_class(data: Path, root: Path) -> None:
    copy_class(data, "red_cross", root)
    copy_class(data, "blue_cross", root)
    (root / "vertical_stripes").mkdir()


def make_unreadable_image(data: Path, root: Path) -> None:
    copy_class(data, "red_cross", root)
    copy_class(data, "blue_cross", root)
    (root / "blue_cross" / "broken.png").write_bytes(b"\x89PNG but not really")


def make_one_class(data: Path, root: Path) -> None:
    copy_class(data, "red_cross", root)


def make_foreign_class(data: Path, root: Path) -> None:
    for name in E2E_CLASSES:
        copy_class(data, name, root)
    (root / "zebra").mkdir()
    shutil.copy(sorted((data / "train" / "red_cross").glob("*.png"))[0], root / "zebra" / "z.png")


@pytest.mark.parametrize(
    ("make", "task", "expected"),
    [
        (make_empty_class, "bad-empty", "holds no images"),
        (make_unreadable_image, "bad-image", "could not use 1 image(s)"),
        (make_one_class, "bad-one-class", "found only one class ('red_cross')"),
        (make_foreign_class, TASK, "['zebra'] that are not among the task's classes"),
    ],
    ids=["empty-class-folder", "unreadable-image", "one-class", "labels-not-in-task"],
)
def test_bad_data_gets_one_clear_line_and_pushes_nothing(tuned, stack, data, tmp_path, make, task, expected):
    # Prepare
    root = tmp_path / "bad"
    root.mkdir()
    make(data, root)
    with registry_client(stack) as registry:
        before = find_task(registry, task)

    # Execute
    code, out, err = run_cli("tune", "--task", task, "--data", str(root), "--epochs", "2", *stack.cli_flags())

    # Assert: exit 1, one line on stderr (progress aside), the registry unchanged
    errors = [line for line in err.splitlines() if line.startswith("mist tune: error:")]
    assert code == 1 and out == ""
    assert len(errors) == 1 and errors[0].startswith("mist tune: error: INVALID_ARGUMENT:")
    assert expected in errors[0]
    with registry_client(stack) as registry:
        after = find_task(registry, task)
    if before is None:
        assert after is None  # no task was created
    else:
        assert after.latest_version == before.latest_version


# ---------------------------------------------------------------------------------------------- `mist tune` as a process


class MistProcess:
    """`python -m services.tuner.cli ARGS` as a child process (the entry point a shell runs), its stderr watched line
    by line so a test can act at a given point of the run (signal it, stop it)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.tuner.cli", *args],
            cwd=ROOT, env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.stdout = LineWatcher(self.proc.stdout, "mist-stdout")
        self.stderr = LineWatcher(self.proc.stderr, "mist-stderr")

    def finish(self, timeout_s: float = 120.0) -> tuple[int, str, list[str]]:
        """(exit code, stdout, stderr lines) once it exits; SIGKILL and AssertionError after `timeout_s`."""
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("mist did not exit:\n" + self.stderr.text()) from None
        return self.proc.returncode, "\n".join(self.stdout.join()), self.stderr.join()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def error_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("mist tune: error:")]


@pytest.mark.parametrize("force", [False, True], ids=["without-force", "with-force"])
def test_a_version_pushed_during_a_tune_aborts_it_unless_forced(stack, data, force):
    # Prepare: version 1 of the task, aliased production; a second tune is based on it
    task = f"e2e-race-{'forced' if force else 'plain'}"
    code, _, err = run_cli(
        "tune", "--task", task, "--data", str(data), "--k", "2", "--epochs", "2", "--alias", "production",
        *stack.cli_flags(),
    )  # fmt: skip
    assert code == 0, err
    tune = MistProcess(
        "tune", "--task", task, "--data", str(data), "--k", "2", "--epochs", "2", "--alias", "production", "--json",
        *(["--force"] if force else []), *stack.cli_flags(),
    )  # fmt: skip
    try:
        # Execute: once it has read the task (it prints the plan before fetching features), hold it while another
        # device pushes version 2, then let it finish
        tune.stderr.wait_for(f"{task}: 140 images")
        tune.proc.send_signal(signal.SIGSTOP)
        try:
            with registry_client(stack) as registry:
                meanwhile = registry.push(task, registry.pull(task, version=1, use_cache=False).blob, parent_version=1)
        finally:
            tune.proc.send_signal(signal.SIGCONT)
        code, out, lines = tune.finish()
    finally:
        tune.kill()
    with registry_client(stack) as registry:
        versions = {v.number: v.parent_version for v in registry.list_versions(task)}
        production = registry.get_alias(task, "production").version

    # Assert
    assert meanwhile.number == 2
    if not force:  # refused: one line naming both versions, nothing pushed, the alias where it was
        assert code == 1 and out == ""
        [error] = error_lines(lines)
        assert error.startswith("mist tune: error: ABORTED: ") and lines[-1] == error
        assert f"task '{task}' is at version 2 but the push is based on 1" in error
        assert versions == {1: 0, 2: 1} and production == 1
    else:  # pushed as version 3, still naming version 1 (what it was tuned from) as its parent; the alias moved
        assert code == 0 and error_lines(lines) == []
        result = json.loads(out)
        assert (result["version"], result["parent_version"]) == (3, 1)
        assert result["alias"] == {"name": "production", "from_version": 1, "to_version": 3}
        assert versions == {1: 0, 2: 1, 3: 1} and production == 3


def test_ctrl_c_during_a_tune_exits_130_with_one_line_and_pushes_nothing(stack, data):
    # Prepare: a long tune of a new task
    task = "e2e-interrupted"
    tune = MistProcess("tune", "--task", task, "--data", str(data), "--k", "2", "--epochs", "500", *stack.cli_flags())
    try:
        # Execute: Ctrl-C (SIGINT) once training is under way
        tune.stderr.wait_for("epoch 1/500")
        tune.proc.send_signal(signal.SIGINT)
        code, out, lines = tune.finish(timeout_s=60)
    finally:
        tune.kill()
    with registry_client(stack) as registry:
        left = find_task(registry, task)

    # Assert: exit 130, one error line and it is the last; no task was created, so no version either
    assert code == 130 and out == ""
    assert error_lines(lines) == ["mist tune: error: interrupted"] and lines[-1] == "mist tune: error: interrupted"
    assert not any("pushed version" in line for line in lines)
    assert left is None
