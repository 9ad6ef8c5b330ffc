"""Typed config: flags > MIST_* env vars > defaults, validation messages, help text (no sockets)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from services.common.config import (
    ConfigError,
    ServerConfig,
    build_parser,
    env_name,
    flag_name,
    load_config,
    parse_config,
    redacted,
    setting,
    split_host_port,
)
from services.common.errors import InvalidArgumentError
from services.common.logging_setup import loggable_path


@dataclass(frozen=True, kw_only=True)
class DemoConfig(ServerConfig):
    """A service config the way extractor/registry extend ServerConfig."""

    backbone: str = setting(help="timm model name")  # required: no default
    warm_up: bool = setting(True, help="run one batch at start")
    ks: tuple[int, ...] = setting((3, 6), help="gather depths", minimum=1, maximum=12)
    codec: Literal["f32", "f16"] = setting("f16", help="feature dtype")
    db: str = setting("sqlite:///tmp/x.db", help="database URL", secret=True)


def parse(argv: list[str], env: dict[str, str] | None = None, cls: type = DemoConfig) -> DemoConfig:
    return parse_config(cls, argv, env or {})


# ---------------------------------------------------------------------------------------------- precedence


def test_defaults_when_neither_flag_nor_env() -> None:
    config = parse(["--backbone", "vit_tiny"])

    assert config.listen == "127.0.0.1:0"
    assert config.metrics_listen == "127.0.0.1:0"
    assert config.max_message_bytes == 16 * 1024 * 1024
    assert config.grace_s == 10.0
    assert (config.warm_up, config.ks, config.codec) == (True, (3, 6), "f16")


def test_env_var_used_when_no_flag() -> None:
    env = {
        "MIST_BACKBONE": "vit_small",
        "MIST_METRICS_LISTEN": "0.0.0.0:9101",
        "MIST_GRACE_S": "2.5",
        "MIST_WARM_UP": "off",
        "MIST_KS": "1, 4,12",
        "MIST_MAX_MESSAGE_BYTES": "2048",
    }

    config = parse([], env)

    assert config.backbone == "vit_small"
    assert config.metrics_listen == "0.0.0.0:9101"
    assert config.grace_s == 2.5
    assert config.warm_up is False
    assert config.ks == (1, 4, 12)
    assert config.max_message_bytes == 2048


def test_flag_wins_over_env_var() -> None:
    env = {"MIST_BACKBONE": "from-env", "MIST_LISTEN": "127.0.0.1:1111", "MIST_WARM_UP": "false"}

    config = parse(["--backbone=from-flag", "--listen", "127.0.0.1:2222", "--warm-up"], env)

    assert (config.backbone, config.listen, config.warm_up) == ("from-flag", "127.0.0.1:2222", True)


def test_no_flag_form_of_bool() -> None:
    assert parse(["--backbone", "b", "--no-warm-up"]).warm_up is False


def test_ipv6_listen_in_brackets() -> None:
    assert split_host_port("[::1]:50051") == ("[::1]", 50051)
    assert parse(["--backbone", "b", "--listen", "[::1]:0"]).listen == "[::1]:0"


# ---------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (
            ["--max-message-bytes", "lots"],
            {},
            "--max-message-bytes (env MIST_MAX_MESSAGE_BYTES): expected an integer, got 'lots'",
        ),
        (
            [],
            {"MIST_GRACE_S": "soon"},
            "--grace-s (env MIST_GRACE_S): expected a number, got 'soon' (from MIST_GRACE_S)",
        ),
        (["--grace-s", "nan"], {}, "--grace-s (env MIST_GRACE_S): expected a finite number"),
        (
            ["--listen", "localhost"],
            {},
            "--listen (env MIST_LISTEN): expected HOST:PORT, got 'localhost' (from --listen)",
        ),
        ([], {"MIST_LISTEN": "127.0.0.1:65536"}, "port must be in 0..65535, got 65536"),
        (["--listen", "::1:80"], {}, "IPv6 hosts in brackets"),
        (["--metrics-listen", "nowhere"], {}, "--metrics-listen (env MIST_METRICS_LISTEN): expected HOST:PORT"),
        (["--log-format", "xml"], {}, "--log-format (env MIST_LOG_FORMAT): expected one of text, json, got 'xml'"),
        (["--codec", "i4"], {}, "--codec (env MIST_CODEC): expected one of f32, f16, got 'i4'"),
        (["--max-message-bytes", "100"], {}, "must be >= 1024, got 100 (from --max-message-bytes)"),
        (["--ks", "3,13"], {}, "--ks (env MIST_KS): must be <= 12, got 13"),
        (["--ks", "3,x"], {}, "--ks (env MIST_KS): expected an integer list, got '3,x'"),
        ([], {"MIST_WARM_UP": "maybe"}, "--warm-up (env MIST_WARM_UP): expected true/false"),
        (["--keepalive-time-s", "5", "--keepalive-timeout-s", "5"], {}, "must be shorter than --keepalive-time-s"),
    ],
    ids=[
        "bad-int",
        "bad-float-env",
        "nan",
        "no-port",
        "port-out-of-range",
        "ipv6-no-brackets",
        "bad-metrics-listen",
        "unknown-log-format",
        "unknown-literal",
        "below-minimum",
        "tuple-above-maximum",
        "bad-int-list",
        "bad-bool-env",
        "keepalive-timeout-too-long",
    ],
)
def test_malformed_value_names_flag_and_env(argv: list[str], env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(["--backbone", "b", *argv], env)

    assert expected in str(info.value)


def test_tls_key_without_cert(tmp_path) -> None:
    key = tmp_path / "server.key"
    key.write_text("not really a key")

    with pytest.raises(ConfigError, match=r"--tls-cert \(env MIST_TLS_CERT\): required when --tls-key is set"):
        parse(["--backbone", "b", "--tls-key", str(key)])


def test_client_ca_without_server_tls(tmp_path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")

    with pytest.raises(ConfigError, match="mutual TLS needs server TLS"):
        parse(["--backbone", "b", "--tls-client-ca", str(ca)])


def test_missing_file(tmp_path) -> None:
    missing = tmp_path / "tokens.txt"

    with pytest.raises(ConfigError) as info:
        parse(["--backbone", "b"], {"MIST_AUTH_TOKENS_FILE": str(missing)})

    assert str(info.value) == (
        f"--auth-tokens-file (env MIST_AUTH_TOKENS_FILE): no such file: '{missing}' (from MIST_AUTH_TOKENS_FILE)"
    )


def test_required_field_missing() -> None:
    with pytest.raises(ConfigError, match=r"--backbone \(env MIST_BACKBONE\): required"):
        parse([])


def test_unknown_flag() -> None:
    with pytest.raises(InvalidArgumentError, match="unrecognized arguments: --listn 1"):
        parse(["--backbone", "b", "--listn", "1"])


def test_abbreviated_flag_is_not_accepted() -> None:
    with pytest.raises(InvalidArgumentError, match="unrecognized arguments: --back"):
        parse(["--back", "b"])


def test_flag_without_value() -> None:
    with pytest.raises(InvalidArgumentError, match="argument --listen: expected one argument"):
        parse(["--backbone", "b", "--listen"])


def test_unknown_mist_env_var_with_suggestion() -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse(["--backbone", "b"], {"MIST_METRIC_LISTEN": "off", "PATH": "/bin", "MISTRAL": "x"})

    assert str(info.value) == (
        "unknown environment variable MIST_METRIC_LISTEN: no flag --metric-listen here; "
        "did you mean MIST_METRICS_LISTEN?"
    )


def test_allowed_env_is_not_unknown() -> None:
    config = parse_config(DemoConfig, ["--backbone", "b"], {"MIST_TOKEN": "t"}, allowed_env={"MIST_TOKEN"})

    assert config.backbone == "b"


def test_env_var_of_another_service_field_is_unknown() -> None:
    with pytest.raises(InvalidArgumentError, match="MIST_BACKBONE"):
        parse([], {"MIST_BACKBONE": "vit"}, cls=ServerConfig)


def test_secret_value_never_echoed() -> None:
    @dataclass(frozen=True, kw_only=True)
    class WithPort(ServerConfig):
        db_port: int = setting(5432, help="port", secret=True)

    with pytest.raises(ConfigError) as info:
        parse_config(WithPort, [], {"MIST_DB_PORT": "hunter2"})

    assert "hunter2" not in str(info.value)
    assert "--db-port (env MIST_DB_PORT): expected an integer, got ***" in str(info.value)


# ---------------------------------------------------------------------------------------------- objects


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="--listen .*expected HOST:PORT"):
        ServerConfig(listen="nope")
    with pytest.raises(ConfigError, match="--grace-s .*must be >= 0"):
        ServerConfig(grace_s=-1.0)
    with pytest.raises(ConfigError, match="--log-level .*expected one of"):
        ServerConfig(log_level="verbose")  # type: ignore[arg-type]


def test_config_is_frozen() -> None:
    config = ServerConfig()

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen = "0.0.0.0:1"  # type: ignore[misc]


def test_redacted_masks_secrets() -> None:
    values = redacted(parse(["--backbone", "b", "--db", "postgresql://u:pw@h/db"]))

    assert values["db"] == "***"
    assert values["backbone"] == "b"


def test_redacted_cuts_absolute_file_paths_to_their_names(tmp_path) -> None:
    # Prepare: a TLS pair and a tokens file (metavar PATH) at absolute paths, one relative path
    for name in ("server.pem", "server.key", "tokens.txt"):
        (tmp_path / name).write_text("x")
    argv = [
        "--backbone",
        "b",
        "--tls-cert",
        str(tmp_path / "server.pem"),
        "--tls-key",
        str(tmp_path / "server.key"),
        "--auth-tokens-file",
        str(tmp_path / "tokens.txt"),
    ]

    values = redacted(parse(argv))

    assert (values["tls_cert"], values["tls_key"], values["auth_tokens_file"]) == (
        ".../server.pem",
        ".../server.key",
        ".../tokens.txt",
    )
    assert str(tmp_path) not in repr(values)
    assert values["tls_client_ca"] == ""  # unset stays unset


@pytest.mark.parametrize(
    ("path", "shown"),
    [
        ("/srv/mist/secrets/tokens.txt", ".../tokens.txt"),
        ("/srv/mist/cache/", ".../cache"),
        ("/", "..."),
        ("weights/vit.safetensors", "weights/vit.safetensors"),
        ("", ""),
    ],
)
def test_loggable_path_keeps_only_the_name_of_an_absolute_path(path: str, shown: str) -> None:
    assert loggable_path(path) == shown


def test_names() -> None:
    assert flag_name("metrics_listen") == "--metrics-listen"
    assert env_name("metrics_listen") == "MIST_METRICS_LISTEN"


# ---------------------------------------------------------------------------------------------- main() path


def test_load_config_exits_2_with_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        load_config(DemoConfig, ["--backbone", "b", "--listen", "x"], {}, prog="mist-demo")

    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err == (
        "mist-demo: error: --listen (env MIST_LISTEN): expected HOST:PORT, got 'x' (from --listen) (see --help)\n"
    )


def test_help_documents_every_field(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        load_config(DemoConfig, ["--help"], {}, prog="mist-demo")

    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert info.value.code == 0
    for field in dataclasses.fields(DemoConfig):
        assert flag_name(field.name) in out
        assert f"env {env_name(field.name)};" in out
    assert "--warm-up, --no-warm-up" in out
    assert "[env MIST_GRACE_S; default: 10.0]" in out
    assert "[env MIST_BACKBONE; required]" in out
    assert "[env MIST_DB; default: ***]" in out
    assert "{text,json}" in out


def test_parser_has_no_positional_arguments() -> None:
    parser = build_parser(ServerConfig)

    assert all(action.option_strings for action in parser._actions)


# ---------------------------------------------------------------------------------------------- mist-tuner upstream TLS


def test_the_tuner_worker_takes_a_client_certificate_for_mutual_tls_upstream(tmp_path) -> None:
    from services.tuner.config import TunerConfig

    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("x")
    ca, cert, key = (str(tmp_path / n) for n in ("ca.pem", "client.pem", "client.key"))

    endpoints = parse_config(
        TunerConfig, ["--upstream-tls-ca", ca, "--upstream-tls-cert", cert, "--upstream-tls-key", key], {}
    ).endpoints()

    assert (endpoints.tls, endpoints.tls_ca, endpoints.client_cert, endpoints.client_key) == (True, ca, cert, key)
    with pytest.raises(ConfigError, match="go together"):
        parse_config(TunerConfig, ["--upstream-tls-ca", ca, "--upstream-tls-cert", cert], {})
    with pytest.raises(ConfigError, match="needs --upstream-tls-ca"):
        parse_config(TunerConfig, ["--upstream-tls-cert", cert, "--upstream-tls-key", key], {})
