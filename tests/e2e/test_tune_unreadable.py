"""End to end through real servers (issue 13): `mist tune` on the synthetic data with an empty file and a garbage
one among its images names both in one error line and pushes nothing; with --skip-unreadable it tunes on the rest
and lists both in its output and in the pushed version's details.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.tuner.tune import find_task
from tests.helpers.stack import run_cli, running_stack, write_e2e_dataset

pytestmark = pytest.mark.timeout(300)

FAST = ["--k", "2", "--epochs", "2"]
EMPTY, GARBAGE = "train/red_cross/empty.png", "train/blue_cross/garbage.png"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The e2e synthetic dataset (140 PNGs) plus an empty file and one of garbage bytes."""
    root = write_e2e_dataset(tmp_path_factory.mktemp("data") / "shapes")
    (root / EMPTY).write_bytes(b"")
    (root / GARBAGE).write_bytes(b"these bytes are no image at all")
    return root


def test_without_the_flag_one_line_names_both_files_and_nothing_is_pushed(stack, data):
    # Execute
    code, out, err = run_cli("tune", "--task", "unreadable-fail", "--data", str(data), *FAST, *stack.cli_flags())

    # Assert: exit 1, one error line naming both files with their reasons, no task created
    errors = [line for line in err.splitlines() if line.startswith("mist tune: error:")]
    assert code == 1 and out == ""
    assert len(errors) == 1, err
    line = errors[0]
    assert line.startswith(f"mist tune: error: INVALID_ARGUMENT: could not use 2 image(s) of {data}: ")
    assert f"{GARBAGE}: not a JPEG, PNG or WebP image" in line and "(undecodable_image)" in line
    assert f"{EMPTY}: the file is empty (empty_file)" in line
    assert "--skip-unreadable" in line and "nothing was pushed" in line
    with stack.endpoints(cache_dir=None).registry_client() as registry:
        assert find_task(registry, "unreadable-fail") is None


def test_skip_unreadable_tunes_on_the_rest_and_lists_what_it_skipped(stack, data):
    # Execute: the text output, then --json of another task
    code, out, err = run_cli(
        "tune", "--task", "unreadable-skip", "--data", str(data), "--skip-unreadable", *FAST, *stack.cli_flags()
    )
    json_code, json_out, json_err = run_cli(
        "tune", "--task", "unreadable-json", "--data", str(data), "--skip-unreadable", "--json", *FAST,
        *stack.cli_flags(),
    )  # fmt: skip

    # Assert: the printed result lists both, a warning on stderr names both
    assert code == 0, err
    assert "  skipped 2 unusable image(s):" in out
    assert f"    {GARBAGE}: not a JPEG, PNG or WebP image" in out
    assert f"    {EMPTY}: the file is empty (empty_file)" in out
    warnings = [line for line in err.splitlines() if "warning: skipping 2 unusable image(s)" in line]
    assert len(warnings) == 1 and GARBAGE in warnings[0] and EMPTY in warnings[0]
    # ... --json too
    assert json_code == 0, json_err
    result = json.loads(json_out)
    assert {(s["name"], s["reason"]) for s in result["skipped"]} == {
        (EMPTY, "empty_file"),
        (GARBAGE, "undecodable_image"),
    }
    # ... and the pushed version's details; it was trained on the 138 readable images
    with stack.endpoints(cache_dir=None).registry_client() as registry:
        version = registry.get_version("unreadable-skip", version=1)
    details = json.loads(version.details_json)
    assert [s["name"] for s in details["skipped"]] == sorted([EMPTY, GARBAGE])
    assert {s["reason"] for s in details["skipped"]} == {"empty_file", "undecodable_image"}
    assert sum(sum(per_class) for per_class in details["dataset"]["counts"].values()) == 140
    assert version.metrics["train_images"] == 80 and details["extraction"]["images"] == 140
