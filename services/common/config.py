"""Typed configuration for every mist server and command: frozen dataclasses whose fields are flags and MIST_* variables.

    @dataclass(frozen=True, kw_only=True)
    class ExtractorConfig(ServerConfig):
        max_batch_size: int = setting(32, help="images per forward pass", minimum=1)   # --max-batch-size

    config = load_config(ExtractorConfig)          # flag > MIST_MAX_BATCH_SIZE > default; exit 2 on a bad value

Commands with several groups of settings add each class to their parser (`add_arguments`) and build each from the
parsed flags (`config_from_args`). Field types: str, int, float, bool (--flag / --no-flag), Literal[...] of str,
tuple[str, ...] / tuple[int, ...] (comma-separated) and `X | None` (None where the default is "decided later").
Plain dataclass fields (no `setting`) are not flags: code fills them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from services.common.errors import InvalidArgumentError
from services.common.logging_setup import loggable_path

ENV_PREFIX = "MIST_"
_META_KEY = "mist"
# 16 MiB: gRPC's 4 MiB default is below one f32 response carrying every k of ViT-B (12 maps x 0.58 MiB =
# 6.9 MiB) or the LST baseline (13 maps, 7.5 MiB); 16 MiB fits those with headroom while still bounding
# the memory one message can pin. Weights and datasets travel in chunks, never in one message.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

C = TypeVar("C")


@dataclass(frozen=True)
class _Setting:
    """What `setting()` stores in a field's metadata."""

    help: str
    choices: tuple[str, ...] | None  # None: derived from a Literal type, if any
    parser: Callable[[str], str] | None  # validates (and may normalise) a str value; raises ValueError
    minimum: float | None
    maximum: float | None
    secret: bool  # never echo the value (help, errors, logs)
    metavar: str | None
    none_words: tuple[str, ...]  # for `X | None` fields: texts that mean None (lowercase)
    shown: str | None  # how --help shows the default, when not the value itself


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Sequence[str] | None = None,
    parser: Callable[[str], str] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    secret: bool = False,
    metavar: str | None = None,
    none_words: Sequence[str] = ("",),
    shown: str | None = None,
) -> Any:
    """A config field: its default, help text and validation rules (checked on flags, env vars and in code)."""
    meta = _Setting(
        help,
        tuple(choices) if choices else None,
        parser,
        minimum,
        maximum,
        secret,
        metavar,
        tuple(word.lower() for word in none_words),
        shown,
    )
    return dataclasses.field(default=default, metadata={_META_KEY: meta})


class ConfigError(InvalidArgumentError):
    """A bad configuration value; `str()` names the flag and its env var."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{flag_name(field)} (env {env_name(field)}): {problem}")


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


# ---------------------------------------------------------------------------------------------- validators


def split_host_port(address: str) -> tuple[str, int]:
    """'HOST:PORT' or '[IPv6]:PORT' -> (host, port); port 0 means "pick a free one". Raises ValueError."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ValueError(f"expected HOST:PORT with IPv6 hosts in brackets ([::1]:50051), got {address!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port} in {address!r}")
    return host, port


def check_host_port(address: str) -> str:
    split_host_port(address)
    return address


def check_optional_host_port(address: str) -> str:
    """HOST:PORT, or "" / "off" to disable the listener."""
    return address if address in ("", "off") else check_host_port(address)


def check_existing_file(path: str) -> str:
    """A readable file, or "" for "not set"."""
    if path and not Path(path).is_file():
        raise ValueError(f"no such file: {path!r}")
    return path


# ---------------------------------------------------------------------------------------------- the base


class ConfigBase:
    """Mixin for config dataclasses: validates every field after __init__, then runs `check()`."""

    def __post_init__(self) -> None:
        for field, kind in _config_fields(type(self)):
            _check_value(field, kind, getattr(self, field.name))
        self.check()

    def check(self) -> None:
        """Cross-field rules; raise ConfigError. Subclasses override and call super().check()."""


@dataclass(frozen=True, kw_only=True)
class ServerConfig(ConfigBase):
    """Settings every mist gRPC server shares."""

    listen: str = setting(
        "127.0.0.1:0",
        help="gRPC address HOST:PORT; port 0 picks a free port",
        parser=check_host_port,
        metavar="HOST:PORT",
    )
    metrics_listen: str = setting(
        "127.0.0.1:0",
        help="Prometheus /metrics HTTP address; '' or 'off' disables",
        parser=check_optional_host_port,
        metavar="HOST:PORT",
    )
    tls_cert: str = setting(
        "",
        help="PEM server certificate chain; set with --tls-key to serve TLS",
        parser=check_existing_file,
        metavar="PATH",
    )
    tls_key: str = setting("", help="PEM private key of --tls-cert", parser=check_existing_file, metavar="PATH")
    tls_client_ca: str = setting(
        "",
        help="PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS)",
        parser=check_existing_file,
        metavar="PATH",
    )
    auth_tokens_file: str = setting(
        "",
        help="bearer tokens, one 'name:token' per line; empty turns auth off",
        parser=check_existing_file,
        metavar="PATH",
    )
    max_message_bytes: int = setting(
        DEFAULT_MAX_MESSAGE_BYTES,
        help="largest gRPC message sent or received; larger requests fail with RESOURCE_EXHAUSTED",
        minimum=1024,
        metavar="BYTES",
    )
    max_concurrent_streams: int = setting(
        1000,
        help="concurrent calls per client connection (HTTP/2 streams); "
        "gRPC Python shares one connection among all channels of a process, and "
        "its client does not queue beyond this: more fail UNAVAILABLE "
        "(REFUSED_STREAM)",
        minimum=1,
        metavar="N",
    )
    max_concurrent_rpcs: int = setting(
        0,
        help="concurrent calls over all connections; beyond it calls fail with RESOURCE_EXHAUSTED; 0 = unlimited",
        minimum=0,
        metavar="N",
    )
    keepalive_time_s: float = setting(
        60.0,
        help="ping idle clients this often to find dead connections (devices behind NAT vanish silently)",
        minimum=1.0,
        metavar="SECONDS",
    )
    keepalive_timeout_s: float = setting(
        20.0, help="drop a connection whose ping is not answered within this", minimum=1.0, metavar="SECONDS"
    )
    max_connection_age_s: float = setting(
        0.0,
        help="close connections after this long so clients re-resolve and spread over new replicas; 0 = never",
        minimum=0.0,
        metavar="SECONDS",
    )
    max_connection_age_grace_s: float = setting(
        300.0,
        help="time calls get to finish on a connection closed by --max-connection-age-s",
        minimum=0.0,
        metavar="SECONDS",
    )
    grace_s: float = setting(
        10.0,
        help="on SIGTERM, time in-flight calls get to finish before they are cancelled",
        minimum=0.0,
        metavar="SECONDS",
    )
    log_level: Literal["debug", "info", "warning", "error"] = setting("info", help="least severe level logged")
    log_format: Literal["text", "json"] = setting("text", help="log line format on stderr")

    def check(self) -> None:
        super().check()
        if self.tls_key and not self.tls_cert:
            raise ConfigError("tls_cert", "required when --tls-key is set")
        if self.tls_cert and not self.tls_key:
            raise ConfigError("tls_key", "required when --tls-cert is set")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_cert", "required when --tls-client-ca is set (mutual TLS needs server TLS)")
        if self.keepalive_timeout_s >= self.keepalive_time_s:
            raise ConfigError("keepalive_timeout_s", "must be shorter than --keepalive-time-s")


# ---------------------------------------------------------------------------------------------- field typing


def _config_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) for every `setting` field of a config dataclass (plain fields are not flags)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init and _META_KEY in f.metadata]


def _meta(field: dataclasses.Field) -> _Setting:
    return field.metadata[_META_KEY]


def _optional(kind: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, (kind, False) otherwise."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(kind)) == 2:
            return args[0], True
        raise TypeError(f"unsupported union type {kind}; only `X | None` is allowed")
    return kind, False


def _choices(field: dataclasses.Field, kind: Any) -> tuple[str, ...] | None:
    kind, _ = _optional(kind)
    if typing.get_origin(kind) is Literal:
        return tuple(str(c) for c in typing.get_args(kind))
    return _meta(field).choices


def _element_type(kind: Any) -> type | None:
    """str or int for tuple[str, ...] / tuple[int, ...]; None for other types."""
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in (str, int):
            return args[0]
        raise TypeError(f"unsupported tuple type {kind}; use tuple[str, ...] or tuple[int, ...]")
    return None


def _show(field: dataclasses.Field, value: Any) -> str:
    """A value as a user would type it, masked for secrets."""
    if _meta(field).secret and value not in ("", None):
        return "***"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return repr(value) if value == "" else str(value)


# ---------------------------------------------------------------------------------------------- conversion


def _check_value(field: dataclasses.Field, kind: Any, value: Any) -> Any:
    """Validate a typed value against its field's rules; returns it (possibly normalised)."""
    meta, name = _meta(field), field.name
    kind, optional = _optional(kind)
    if value is None and optional:
        return None
    choices = _choices(field, kind)
    elem = _element_type(kind)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"expected true or false, got {type(value).__name__}")
        return value
    if elem is not None:
        if not isinstance(value, tuple) or not all(isinstance(v, elem) for v in value):
            raise ConfigError(name, f"expected a tuple of {elem.__name__}")
        return tuple(_check_scalar(name, meta, choices, elem, v) for v in value)
    return _check_scalar(name, meta, choices, kind, value)


def _check_scalar(name: str, meta: _Setting, choices: tuple[str, ...] | None, kind: Any, value: Any) -> Any:
    shown = "***" if meta.secret else repr(value)
    if choices is not None:
        if value not in choices:
            raise ConfigError(name, f"expected one of {', '.join(choices)}, got {shown}")
        return value
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float)):
            raise ConfigError(name, f"expected {'an integer' if kind is int else 'a number'}, got {shown}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(name, f"expected a finite number, got {shown}")
        if meta.minimum is not None and value < meta.minimum:
            raise ConfigError(name, f"must be >= {meta.minimum:g}, got {value}")
        if meta.maximum is not None and value > meta.maximum:
            raise ConfigError(name, f"must be <= {meta.maximum:g}, got {value}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {type(value).__name__}")
        if meta.parser is not None:
            try:
                return meta.parser(value)
            except ValueError as e:
                raise ConfigError(name, "invalid value" if meta.secret else str(e)) from None
        return value
    raise TypeError(f"config field {name!r} has unsupported type {kind}")


def _from_text(field: dataclasses.Field, kind: Any, text: str) -> Any:
    """Parse a flag or env var string into the field's type (rules are checked later by _check_value)."""
    meta = _meta(field)
    shown = "***" if meta.secret else repr(text)
    kind, optional = _optional(kind)
    if optional and text.strip().lower() in meta.none_words:
        return None
    if kind is bool:
        return parse_bool(text, field.name, shown)
    elem = _element_type(kind)
    target = elem or kind
    try:
        if elem is not None:
            return tuple(_scalar_from_text(elem, part.strip()) for part in text.split(",") if part.strip())
        return _scalar_from_text(kind, text)
    except ValueError:
        what = "an integer" if target is int else "a number"
        words = " or ".join(repr(w) for w in meta.none_words if w)
        expected = f"{words} or {what}" if optional and words else what
        raise ConfigError(field.name, f"expected {expected}{' list' if elem else ''}, got {shown}") from None


def parse_bool(text: str, field: str, shown: str | None = None) -> bool:
    """true/false, 1/0, yes/no, on/off (any case); anything else is a ConfigError, never silently false."""
    low = text.strip().lower()
    if low not in _TRUE | _FALSE:
        raise ConfigError(field, f"expected true/false (or 1/0, yes/no, on/off), got {shown or repr(text)}")
    return low in _TRUE


def _scalar_from_text(kind: Any, text: str) -> Any:
    if kind is int:
        return int(text.strip(), 10)
    if kind is float:
        return float(text.strip())
    return text


# ---------------------------------------------------------------------------------------------- parsing


class UsageError(InvalidArgumentError):
    """A command line argparse refuses (unknown flag, missing value); `prog` names the (sub)command."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing usage and exiting, so every error is one line."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message, self.prog)


def _default_text(field: dataclasses.Field) -> str:
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        return "required"
    if _meta(field).shown is not None:
        return f"default: {_meta(field).shown}"
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    return f"default: {_show(field, default)}"


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One flag per `setting` field of `cls`; help names each flag's env var and default. Values stay text."""
    for field, kind in _config_fields(cls):
        meta = _meta(field)
        choices = _choices(field, kind)
        help_text = f"{meta.help} [env {env_name(field.name)}; {_default_text(field)}]".replace("%", "%%")
        if _optional(kind)[0] is bool:
            parser.add_argument(
                flag_name(field.name),
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        metavar = meta.metavar or ("{" + ",".join(choices) + "}" if choices else field.name.upper())
        parser.add_argument(
            flag_name(field.name), dest=field.name, default=argparse.SUPPRESS, metavar=metavar, help=help_text
        )


def build_parser(cls: type, *, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """A parser with one flag per config field (see add_arguments)."""
    if description is None and cls.__doc__:
        description = cls.__doc__.strip().splitlines()[0]
    parser = ArgumentParser(prog=prog, description=description, allow_abbrev=False, epilog=ENV_EPILOG)
    add_arguments(parser, cls)
    return parser


ENV_EPILOG = f"Every flag also reads {ENV_PREFIX}<FLAG> from the environment (the flag wins)."


def env_names(*classes: type) -> frozenset[str]:
    """The MIST_* variables the settings of `classes` read."""
    return frozenset(env_name(f.name) for cls in classes for f, _ in _config_fields(cls))


def _unknown_env(cls: type, env: Mapping[str, str], allowed_env: Collection[str]) -> None:
    known = env_names(cls) | set(allowed_env)
    for key in sorted(env):
        if key.startswith(ENV_PREFIX) and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise InvalidArgumentError(
                f"unknown environment variable {key}: no flag {flag_name(key[len(ENV_PREFIX) :].lower())} here{hint}"
            )


def config_from_args(cls: type[C], given: Mapping[str, Any], env: Mapping[str, str], **fixed: Any) -> C:
    """`cls` from parsed flags (`given`: dest -> text or bool), else MIST_* variables, else defaults.

    `fixed` sets fields that are not flags here (or overrides them). Raises ConfigError naming flag and source.
    """
    values: dict[str, Any] = {}
    for field, kind in _config_fields(cls):
        if field.name in fixed:
            continue
        if field.name in given:
            raw, source = given[field.name], flag_name(field.name)
        elif env_name(field.name) in env:
            raw, source = env[env_name(field.name)], env_name(field.name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(field.name, "required")
        else:
            continue
        try:
            value = raw if isinstance(raw, bool) else _from_text(field, kind, raw)
            values[field.name] = _check_value(field, kind, value)
        except ConfigError as e:
            raise ConfigError(field.name, f"{e.problem} (from {source})") from None
    return cls(**values, **fixed)


def parse_config(
    cls: type[C],
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    allowed_env: Collection[str] = (),
    prog: str | None = None,
) -> C:
    """Build `cls` from flags (first) and MIST_* env vars (second); raises InvalidArgumentError / ConfigError.

    `allowed_env` names MIST_* variables this program reads elsewhere (they are not reported as unknown).
    """
    namespace = parse_args(build_parser(cls, prog=prog), argv)
    _unknown_env(cls, env, allowed_env)
    return config_from_args(cls, vars(namespace), env)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """parse_args of an ArgumentParser made here: a usage error is a UsageError (one line), never an exit."""
    namespace, extra = parser.parse_known_args(list(argv))
    if extra:
        raise UsageError(f"unrecognized arguments: {' '.join(extra)}", getattr(namespace, "prog", parser.prog))
    return namespace


def load_config(
    cls: type[C],
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] = os.environ,
    *,
    prog: str | None = None,
    allowed_env: Collection[str] = (),
) -> C:
    """parse_config for main(): `--help` prints help and exits 0; an error prints one line and exits 2."""
    argv = sys.argv[1:] if argv is None else argv
    prog = prog or os.path.basename(sys.argv[0])
    try:
        return parse_config(cls, argv, env, allowed_env=allowed_env, prog=prog)
    except InvalidArgumentError as e:
        sys.stderr.write(f"{prog}: error: {e} (see --help)\n")
        raise SystemExit(2) from None


def redacted(config: object) -> dict[str, object]:
    """Field values for a startup log line: secret fields masked, file paths (metavar PATH) cut to their name."""
    shown: dict[str, object] = {}
    for f, _ in _config_fields(type(config)):
        meta, value = _meta(f), getattr(config, f.name)
        if meta.secret and value:
            value = "***"
        elif meta.metavar == "PATH" and isinstance(value, str):
            value = loggable_path(value)
        shown[f.name] = value
    return shown
