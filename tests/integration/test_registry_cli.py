"""`mist registry ...` against a real registry server on 127.0.0.1 port 0: tables and --json hold the expected
rows, promote / rollback move the alias, export writes the exact bytes, errors are one line with the status
code's name and a non-zero exit code."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.common.clients.registry import RegistryClient
from services.common.clients.registry_cli import main
from services.registry.config import RegistryConfig
from tests.helpers.process import ROOT as REPO_ROOT
from tests.helpers.registry import InProcessRegistry, make_blob, task_proto

ADMIN_TOKEN = "admin-cli-7Hq2Lw9ZpX"
METRICS = [{"val_accuracy": 0.5, "test_accuracy": 0.45}, {"val_accuracy": 0.625}, {"val_accuracy": 0.75}]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[InProcessRegistry]:
    """cats with versions 1..3 (val_accuracy 0.5, 0.625, 0.75) and production -> 2."""
    with InProcessRegistry(RegistryConfig(db=f"sqlite:///{tmp_path}/r.db", metrics_listen="off")) as running:
        with RegistryClient(running.target) as client:
            client.create_task(task_proto("cats"))
            for number, metrics in enumerate(METRICS, start=1):
                client.push("cats", make_blob(number), parent_version=number - 1, metrics=metrics)
            client.set_alias("cats", "production", 2)
        yield running


def run(
    server: InProcessRegistry, capsys: pytest.CaptureFixture[str], *argv: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    code = main(["--registry", server.target, *argv], env=env or {})
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


def alias_target(server: InProcessRegistry, name: str = "production") -> int:
    with RegistryClient(server.target) as client:
        return client.get_alias("cats", name).version


# ---- tables and --json -------------------------------------------------------------------------------------


def test_tasks_is_a_table_with_one_row_per_task(server, capsys):
    code, out, _ = run(server, capsys, "tasks")

    rows = table(out)
    assert code == 0
    assert rows[0] == ["NAME", "KIND", "BACKBONE", "MODE", "K", "CLASSES", "LATEST", "CREATED"]
    assert rows[1][:7] == ["cats", "classification", "vit_tiny_patch16_224", "mist", "2", "3", "3"] and len(rows) == 2


def test_task_shows_the_definition_and_its_aliases(server, capsys):
    code, out, _ = run(server, capsys, "task", "cats")

    assert code == 0
    assert "kind:           classification\n" in out
    assert "edge network:   M=2 r=4 heads=1 pooling=cls D=32 T=17 C=3" in out
    assert "codec:          i8-zstd" in out and "classes:        cat, dog, fox" in out
    assert "aliases:        production -> 2" in out


def test_versions_is_a_table_of_metrics_parents_and_aliases_newest_first(server, capsys):
    code, out, _ = run(server, capsys, "versions", "cats")

    rows = table(out)
    shas = [hashlib.sha256(make_blob(n)).hexdigest()[:12] for n in (3, 2, 1)]
    assert code == 0
    assert rows[0] == ["VERSION", "CREATED", "SHA256", "SIZE", "VAL_ACCURACY", "TEST_ACCURACY", "PARENT", "ALIASES"]
    assert [r[0] for r in rows[1:]] == ["3", "2", "1"] and [r[2] for r in rows[1:]] == shas
    assert rows[1][3:6] == ["6.7", "KiB", "0.75"]  # no test_accuracy: the cell stays empty
    assert rows[2][5:] == ["0.625", "1", "production"]
    assert rows[3][5:] == ["0.5", "0.45", "-"]


def test_json_output_carries_full_values_for_scripts(server, capsys):
    code, out, _ = run(server, capsys, "--json", "versions", "cats", "--limit", "2")

    versions = json.loads(out)
    assert code == 0
    assert [v["version"] for v in versions] == [3, 2]
    assert versions[1]["metrics"] == {"val_accuracy": 0.625} and versions[1]["aliases"] == ["production"]
    assert versions[0]["sha256"] == hashlib.sha256(make_blob(3)).hexdigest()
    assert versions[0]["size_bytes"] == len(make_blob(3)) and versions[0]["parent_version"] == 2


# ---- promote, rollback, history, export, delete ------------------------------------------------------------


def test_promote_and_rollback_move_the_alias_and_history_shows_it(server, capsys):
    promoted = run(server, capsys, "promote", "cats", "3", "--alias", "production")
    after_promote = alias_target(server)
    rolled = run(server, capsys, "rollback", "cats", "--alias", "production")
    after_rollback = alias_target(server)
    code, out, _ = run(server, capsys, "history", "cats", "production")

    assert promoted[:2] == (0, "cats: production 2 -> 3\n") and after_promote == 3
    assert rolled[:2] == (0, "cats: production 3 -> 2 (rolled back)\n") and after_rollback == 2
    moves = [row[1:4] for row in table(out)[1:]]
    assert code == 0 and moves == [["production", "3", "2"], ["production", "2", "3"], ["production", "-", "2"]]


def test_promote_with_a_stale_expectation_is_aborted_and_moves_nothing(server, capsys):
    code, out, err = run(server, capsys, "promote", "cats", "3", "--alias", "production", "--expect", "1")

    assert code == 1 and out == ""
    assert err.startswith("mist registry: error: ABORTED: alias 'production' of task 'cats' points to version 2")
    assert err.count("\n") == 1 and alias_target(server) == 2


def test_export_writes_the_exact_bytes_of_the_chosen_version(server, capsys, tmp_path):
    targets = {"alias": ["--alias", "production"], "version": ["--version", "1"], "latest": ["--latest"]}

    results = {
        name: run(server, capsys, "export", "cats", *flags, "-o", str(tmp_path / f"{name}.safetensors"))
        for name, flags in targets.items()
    }

    assert {name: code for name, (code, _, _) in results.items()} == {"alias": 0, "version": 0, "latest": 0}
    assert (tmp_path / "alias.safetensors").read_bytes() == make_blob(2)
    assert (tmp_path / "version.safetensors").read_bytes() == make_blob(1)
    assert (tmp_path / "latest.safetensors").read_bytes() == make_blob(3)
    assert f"sha256 {hashlib.sha256(make_blob(2)).hexdigest()}" in results["alias"][1]
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_delete_version_refuses_an_aliased_version_and_deletes_another(server, capsys):
    refused = run(server, capsys, "delete-version", "cats", "2")
    deleted = run(server, capsys, "delete-version", "cats", "1")
    _, out, _ = run(server, capsys, "--json", "versions", "cats")

    assert refused[0] == 1 and refused[2].startswith("mist registry: error: FAILED_PRECONDITION: version 2")
    assert deleted[:2] == (0, "deleted version 1 of cats\n")
    assert [v["version"] for v in json.loads(out)] == [3, 2]


# ---- errors, environment, tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["task", "nope"], "mist registry: error: NOT_FOUND: task 'nope' not found\n"),
        (
            ["export", "cats", "--alias", "canary", "-o", "x"],
            "mist registry: error: NOT_FOUND: alias 'canary' of task 'cats' not found\n",
        ),
        (
            ["rollback", "cats", "--alias", "staging"],
            "mist registry: error: NOT_FOUND: alias 'staging' of task 'cats' has no history to roll back\n",
        ),
        (
            ["export", "cats", "--latest", "-o", "/nonexistent-dir/w.safetensors"],
            "mist registry: error: cannot write /nonexistent-dir/w.safetensors: No such file or directory\n",
        ),
    ],
)
def test_refusals_print_one_line_with_the_code_and_exit_1(server, capsys, argv, message):
    code, out, err = run(server, capsys, *argv)

    assert (code, out, err) == (1, "", message)


def test_usage_errors_exit_2_and_an_unreachable_registry_is_unavailable(capsys):
    usage = main(["export", "cats", "-o", "x"], env={})  # which version is missing
    usage_err = capsys.readouterr().err
    unreachable = main(["--registry", "127.0.0.1:1", "--timeout-s", "3", "tasks"], env={})
    unreachable_err = capsys.readouterr().err

    assert usage == 2 and "one of the arguments --version --alias --latest is required" in usage_err
    assert unreachable == 1 and unreachable_err.startswith("mist registry: error: UNAVAILABLE: ")
    assert unreachable_err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            ["tasks", "--token-file", "/nonexistent-token"],
            {},
            "mist registry: error: cannot read the registry token file /nonexistent-token: No such file or directory",
        ),
        (["tasks"], {"MIST_TLS": "junk"}, "mist registry: error: --tls (env MIST_TLS): expected true/false"),
        (["tasks"], {"MIST_TIMEOUT_S": "soon"}, "mist registry: error: --timeout-s (env MIST_TIMEOUT_S): expected a"),
    ],
    ids=["unreadable-token-file", "tls-junk", "timeout-junk"],
)
def test_bad_settings_are_usage_errors_as_in_every_mist_command(capsys, argv, env, message):
    # Execute: the same settings layer as `mist tune` (a bad value never silently becomes a default)
    code = main(argv, env=env)
    err = capsys.readouterr().err

    # Assert
    assert code == 2 and err.startswith(message) and err.count("\n") == 1


def test_registry_commands_and_tune_share_one_default_per_setting(capsys, monkeypatch):
    # Prepare: one help line per flag
    monkeypatch.setenv("COLUMNS", "400")
    from services.tuner.cli import main as mist_main

    def flag_lines(run: Callable[[], int]) -> dict[str, str]:
        assert run() == 0
        lines = capsys.readouterr().out.splitlines()
        return {line.split()[0].rstrip(","): " ".join(line.split()) for line in lines if line.strip().startswith("--")}

    # Execute
    registry = flag_lines(lambda: main(["--help"], env={}))
    tune = flag_lines(lambda: mist_main(["tune", "--help"], env={}))

    # Assert: the settings both commands take are the same settings (help, env variable, default)
    shared = {"--registry", "--token", "--token-file", "--tls", "--tls-ca", "--client-cert", "--timeout-s", "--json"}
    assert shared <= registry.keys() & tune.keys()
    assert {flag: registry[flag] for flag in shared} == {flag: tune[flag] for flag in shared}
    assert "[env MIST_TIMEOUT_S; default: 60.0]" in registry["--timeout-s"]


def test_environment_variables_configure_and_flags_win(server, capsys):
    from_env = main(["tasks"], env={"MIST_REGISTRY": server.target})
    env_out = capsys.readouterr().out
    flag_wins = main(["--registry", server.target, "tasks"], env={"MIST_REGISTRY": "127.0.0.1:1"})
    flag_out = capsys.readouterr().out

    assert (from_env, flag_wins) == (0, 0) and env_out == flag_out and "cats" in env_out


def test_create_token_prints_it_once_and_it_carries_its_scope(tmp_path, capsys):
    (tmp_path / "admin").write_text(ADMIN_TOKEN)
    config = RegistryConfig(
        db=f"sqlite:///{tmp_path}/r.db", metrics_listen="off", auth="on", admin_token_file=str(tmp_path / "admin")
    )
    with InProcessRegistry(config) as secured:
        with RegistryClient(secured.target, token=ADMIN_TOKEN) as admin:
            admin.create_task(task_proto("cats"))
            admin.push("cats", make_blob(1), parent_version=0)
        admin_env = {"MIST_TOKEN_FILE": str(tmp_path / "admin")}
        created, token_out, token_err = run(
            secured, capsys, "create-token", "--task", "cats", "--scope", "read", "device-7", env=admin_env
        )
        token = token_out.strip()
        listed = run(secured, capsys, "versions", "cats", env={"MIST_TOKEN": token})
        promoted = run(secured, capsys, "promote", "cats", "1", "--alias", "production", "--token", token)
        anonymous = run(secured, capsys, "tasks")

    assert created == 0 and token.startswith("mist_") and "shown only this once" in token_err
    assert listed[0] == 0 and table(listed[1])[1][0] == "1"
    assert promoted[0] == 1 and promoted[2].startswith("mist registry: error: PERMISSION_DENIED: token 'device-7'")
    assert anonymous[0] == 1 and "UNAUTHENTICATED: missing bearer token" in anonymous[2]


def test_the_module_runs_as_a_command_without_tracebacks(server):
    result = subprocess.run(
        [sys.executable, "-m", "services.common.clients.registry_cli", "--registry", server.target, "versions", "nope"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == "mist registry: error: NOT_FOUND: task 'nope' not found\n"
