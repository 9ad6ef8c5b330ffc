"""`mist` command line: help for every subcommand and flag, one-line usage errors (exit 2), MIST_* variables with
the flag winning, and one-line UNAVAILABLE errors (exit 1) when a server cannot be reached. No server runs here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import socket

import pytest

from services.common.config import env_name, flag_name
from services.common.errors import InvalidArgumentError
from services.tuner import cli


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args), env=env or {})
    return code, out.getvalue(), err.getvalue()


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_help_documents_every_flag_and_its_variable(command):
    # Prepare: every setting field of every config class the command is built from
    names = [f.name for cls in cli.COMMANDS[command].classes for f in dataclasses.fields(cls) if f.metadata]

    # Execute
    code, out, err = run(command, "--help")

    # Assert: exit 0, every flag with its MIST_* variable (argparse may wrap a name at its underscores)
    assert code == 0 and err == "" and len(names) >= 4
    text = " ".join(out.split()).replace("_ ", "_")
    for name in names:
        assert flag_name(name) in text and f"env {env_name(name)}" in text


def test_top_level_help_lists_the_subcommands_and_registry_delegates():
    # Execute
    top = run("--help")
    registry = run("registry", "--help")

    # Assert
    assert top[0] == 0 and all(name in top[1] for name in ("tune", "predict", "evaluate", "registry", "demo"))
    assert registry[0] == 0 and registry[1].startswith("usage: mist registry")


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["tune", "--task", "t", "--data", "d", "--bogus"], {}, "mist tune: error: unrecognized arguments: --bogus"),
        (
            ["tune", "--task", "t", "--data", "d", "--epochs", "many"],
            {},
            "expected an integer, got 'many' (from --epochs)",
        ),
        (["tune", "--task", "t", "--data", "d", "--epochs", "0"], {}, "epochs must be an integer >= 1, got 0"),
        (["tune", "--task", "t", "--data", "d", "--k", "deep"], {}, "expected 'auto' or an integer, got 'deep'"),
        (["tune", "--data", "d"], {}, "--task (env MIST_TASK): required"),
        (
            ["tune", "--task", "t", "--data", "d"],
            {"MIST_EPOCHS": "many"},
            "expected an integer, got 'many' (from MIST_EPOCHS)",
        ),
        (
            ["tune", "--task", "t", "--data", "d", "--registry", "nowhere"],
            {},
            "--registry (env MIST_REGISTRY): expected HOST:PORT",
        ),
        (
            ["tune", "--task", "t", "--data", "d", "--pooling", "max"],
            {},
            "expected one of cls, mean, cls+tokens, mean+tokens, dense, got 'max'",
        ),
        (["predict", "--task", "t", "--version", "1", "--alias", "p", "x.png"], {}, "give --version or --alias"),
        (["predict", "--task", "t"], {}, "the following arguments are required: IMAGE"),
        ([], {}, "the following arguments are required: COMMAND"),
    ],
    ids=[
        "unknown-flag",
        "not-a-number",
        "zero-epochs",
        "bad-k",
        "no-task",
        "bad-variable",
        "bad-address",
        "bad-choice",
        "version-and-alias",
        "no-images",
        "no-command",
    ],
)
def test_usage_errors_exit_2_with_one_line(args, env, expected):
    # Execute
    code, out, err = run(*args, env=env)

    # Assert
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err


def test_variables_fill_flags_and_the_flag_wins(tmp_path):
    # Prepare: MIST_EPOCHS=0 would be a usage error; the flag overrides it, so the run reaches the network
    port = closed_port()
    env = {"MIST_TASK": "t", "MIST_DATA": str(tmp_path), "MIST_EPOCHS": "0", "MIST_REGISTRY": f"127.0.0.1:{port}"}

    # Execute
    overridden = run("tune", "--epochs", "3", env=env)
    from_variable = run("tune", env=env)

    # Assert
    assert overridden[0] == 1 and "UNAVAILABLE" in overridden[2]
    assert from_variable[0] == 2 and "epochs must be an integer >= 1, got 0" in from_variable[2]


@pytest.mark.parametrize("command", ["tune", "predict", "evaluate"])
def test_unreachable_registry_is_one_unavailable_line(command, tmp_path):
    # Prepare
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    args = {
        "tune": ["--task", "t", "--data", str(tmp_path)],
        "predict": ["--task", "t", str(image)],
        "evaluate": ["--task", "t", "--data", str(tmp_path)],
    }[command]

    # Execute
    code, out, err = run(
        command, *args, "--registry", f"127.0.0.1:{closed_port()}", "--cache-dir", "", "--progress", "quiet"
    )

    # Assert: exit 1, one line naming the status and the server, no traceback
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"mist {command}: error: UNAVAILABLE: registry: ")


def test_missing_image_is_a_clear_error(tmp_path):
    # Execute
    code, out, err = run("predict", "--task", "t", str(tmp_path / "nope.png"), "--registry", "127.0.0.1:1")

    # Assert
    assert (
        code == 1
        and err.strip() == f"mist predict: error: INVALID_ARGUMENT: no such image or folder: {tmp_path / 'nope.png'}"
    )


def test_every_variable_the_cli_reads_is_allowed_by_the_worker():
    # Assert: a shell that configures `mist` can start `mist-tuner` too (the worker refuses unknown MIST_*)
    assert {"MIST_EXTRACTOR", "MIST_REGISTRY", "MIST_TASK", "MIST_EPOCHS", "MIST_TOKEN_FILE"} <= set(cli.CLI_ENV)
    assert all(name.startswith("MIST_") and name.upper() == name for name in cli.CLI_ENV)


def test_demo_transfer_table_compares_every_method_with_what_mist_received():
    # Prepare: the tiny test ViT's Describe baselines and 700 bytes received per image
    from services.tuner.demo import DemoOptions, transfer_rows
    from services.tuner.reports import TransferSummary

    transfer = TransferSummary(
        k=2,
        codec="i8-zstd",
        bytes_per_image=700.0,
        fetched_bytes_per_image=2800.0,
        baselines={"lst": 10880, "last": 6528, "partial": 2176, "cls": 128, "mist_f32": 2176},
    )

    # Execute
    rows = transfer_rows(transfer)

    # Assert
    assert rows[0] == ("method", "bytes/image", "vs MIST as received")
    assert rows[1:] == [
        ("MIST as received (i8-zstd, k=2)", "700", "1.00x"),
        ("MIST uncompressed (float32)", "2,176", "3.11x"),
        ("LST", "10,880", "15.54x"),
        ("LAST", "6,528", "9.33x"),
        ("Partial-1", "2,176", "3.11x"),
        ("linear probing (CLS only)", "128", "0.18x"),
    ]
    with pytest.raises(InvalidArgumentError, match="epochs must be an integer >= 2"):
        DemoOptions(epochs=1)
