"""Settings of the registry server (`mist-registry`): the shared server flags plus database, auth and blob limits.

    mist-registry --listen 127.0.0.1:50052 --metrics-listen 127.0.0.1:9102 --db sqlite:///var/registry.db
    mist-registry ... --db postgresql://mist@db:5432/mist --auth on --admin-token-file /run/secrets/admin

Each setting is a flag with a MIST_* environment variable (services/common/config.py). Auth is off by default (a
laptop, a test): every caller may do everything and lineage says "anonymous". `--auth on` needs
`--admin-token-file`: the admin token creates tasks and per-task tokens; every other caller needs a per-task token
(`mist registry create-token`). The registry keeps its tokens in its database, so the shared `--auth-tokens-file`
is refused here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.common.config import ConfigError, ServerConfig, check_existing_file, setting
from services.common.errors import InvalidArgumentError
from services.common.logging_setup import loggable_path
from services.registry.sql import parse_url

# Short tokens can be guessed; 16 characters of a random alphabet is ~95 bits and above.
MIN_ADMIN_TOKEN_CHARS = 16
# 256 KiB: a 1 MiB ViT-B edge network arrives in 4 messages; far below the message limit, so a slow link
# shows progress and a pull's memory per message stays small.
DEFAULT_CHUNK_SIZE_BYTES = 256 * 1024
# Clients may ask for smaller chunks, never below this: a 1-byte chunk size would turn one pull into
# a million messages.
MIN_CHUNK_SIZE_BYTES = 4096
# 64 MiB: far above any real edge network (ViT-B's is ~1 MiB; the largest config edge_spec accepts is
# 128 MiB of float32, which no sane task uses) while bounding what one push can make the server buffer.
DEFAULT_MAX_BLOB_BYTES = 64 * 1024 * 1024


def describe_db(url: str) -> str:
    """The URL for log lines: any password (user:PASSWORD@ or password=PASSWORD) masked, an absolute SQLite path cut
    to its file name (sqlite:////srv/mist/registry.db -> sqlite:///.../registry.db)."""
    if url.startswith("sqlite:///"):
        return "sqlite:///" + loggable_path(url[len("sqlite:///") :])
    masked = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", masked)


@dataclass(frozen=True, kw_only=True)
class RegistryConfig(ServerConfig):
    """Settings of the registry server (versioned edge-network weights per task)."""

    db: str = setting(
        help="database URL: sqlite:///PATH (relative) or sqlite:////ABS/PATH, or "
        "postgresql://USER@HOST:PORT/DB for several replicas (or PGPASSWORD / ~/.pgpass)",
        secret=True,
        metavar="URL",
    )  # secret: a PostgreSQL URL may carry a password
    db_max_connections: int = setting(
        8,
        help="database connections per server process (SQLite writes are "
        "serialised anyway; PostgreSQL gains up to its own limit)",
        minimum=1,
        maximum=1000,
        metavar="N",
    )
    auth: Literal["off", "on"] = setting(
        "off",
        help="'on' requires a bearer token on every call "
        "(--admin-token-file, or a per-task token); 'off' lets anyone do "
        "everything (local use only)",
    )
    admin_token_file: str = setting(
        "",
        help="file holding the admin token (one line, at least "
        f"{MIN_ADMIN_TOKEN_CHARS} chars): it creates tasks and tokens; needs --auth on",
        parser=check_existing_file,
        metavar="PATH",
    )
    chunk_size_bytes: int = setting(
        DEFAULT_CHUNK_SIZE_BYTES,
        help="bytes per message when a version is pulled (a request may ask for less)",
        minimum=MIN_CHUNK_SIZE_BYTES,
        metavar="BYTES",
    )
    max_blob_bytes: int = setting(
        DEFAULT_MAX_BLOB_BYTES,
        help="largest weights blob a push may send; larger pushes fail with RESOURCE_EXHAUSTED and nothing is stored",
        minimum=1024,
        metavar="BYTES",
    )
    device_heartbeat_s: int = setting(
        30,
        help="how often devices are asked to report (mist registry fleet calls one stale after 90 s by default)",
        minimum=1,
        maximum=3600,
        metavar="SECONDS",
    )
    watch_poll_interval_s: float = setting(
        0.25,
        help="how often watched aliases are read for moves made on other replicas (moves made here go out at once)",
        minimum=0.01,
        maximum=60.0,
        metavar="SECONDS",
    )

    def check(self) -> None:
        super().check()
        try:
            parse_url(self.db)  # here, not as a field parser: a secret field's parse errors would be masked
        except InvalidArgumentError as error:
            raise ConfigError("db", str(error)) from None
        if self.auth_tokens_file:
            raise ConfigError(
                "auth_tokens_file",
                "the registry keeps its tokens in its database: use --auth on "
                "with --admin-token-file, then `mist registry create-token`",
            )
        if self.auth == "on" and not self.admin_token_file:
            raise ConfigError("admin_token_file", "required with --auth on (the admin token creates tasks and tokens)")
        if self.auth == "off" and self.admin_token_file:
            # Fail loudly: someone who set a token file believes the registry is protected.
            raise ConfigError("auth", "is off but --admin-token-file is set: pass --auth on to require tokens")
        if self.chunk_size_bytes > self.max_message_bytes - 1024:
            raise ConfigError(
                "chunk_size_bytes",
                f"must leave room for framing below --max-message-bytes "
                f"({self.max_message_bytes}); got {self.chunk_size_bytes}",
            )


def read_admin_token(path: str) -> str:
    """The admin token in `path` (surrounding whitespace stripped); ConfigError without ever echoing it."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError("admin_token_file", f"cannot read {path!r}: {type(error).__name__}") from None
    if len(token) < MIN_ADMIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(
            "admin_token_file",
            f"{path!r} must hold one token of at least {MIN_ADMIN_TOKEN_CHARS} "
            "characters without spaces (e.g. `openssl rand -hex 32`)",
        )
    return token
