"""How a command reaches the mist servers: the connection settings that `mist registry` and `mist tune|predict|evaluate`
share, declared once as typed config (every field a flag and a MIST_* variable).

    flags = config_from_args(RegistryFlags, vars(namespace), os.environ)
    with flags.registry_client() as registry:
        registry.list_tasks()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.clients.registry import RegistryClient
from services.common.config import ConfigBase, ConfigError, check_host_port, setting
from services.common.errors import InvalidArgumentError

DEFAULT_EXTRACTOR = "127.0.0.1:50051"  # mist-extractor --listen 127.0.0.1:50051 (docs/reference/configuration.md)
DEFAULT_REGISTRY = "127.0.0.1:50052"  # mist-registry --listen 127.0.0.1:50052
# Per registry call: a push of a ~1 MB edge network takes about a second on a 10 Mbit/s device link; a minute
# leaves room for slow links and a registry under load without hanging a script forever.
DEFAULT_TIMEOUT_S = 60.0


def read_token_file(path: str, what: str) -> str | None:
    """The token in `path` (stripped), None for an empty path; a clear error for an unreadable or empty file."""
    if not path:
        return None
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as error:
        raise InvalidArgumentError(f"cannot read the {what} token file {path}: {error.strerror or error}") from None
    if not token:
        raise InvalidArgumentError(f"the {what} token file {path} is empty")
    return token


@dataclass(frozen=True, kw_only=True)
class RegistryFlags(ConfigBase):
    """Where the registry is, how to authenticate to it, and TLS to every server a command talks to."""

    registry: str = setting(DEFAULT_REGISTRY, help="mist-registry address", parser=check_host_port, metavar="HOST:PORT")
    token: str = setting(
        "", help="registry bearer token; prefer --token-file: flags show in `ps`", secret=True, metavar="TOKEN"
    )
    token_file: str = setting("", help="file holding the registry bearer token", metavar="PATH")
    timeout_s: float = setting(
        DEFAULT_TIMEOUT_S, help="deadline of each registry call", minimum=0.001, metavar="SECONDS"
    )

    tls: bool = setting(False, help="TLS with the system's CAs")
    tls_ca: str = setting("", help="PEM CA bundle that signed the servers (implies TLS)", metavar="PATH")
    client_cert: str = setting("", help="PEM client certificate for mutual TLS", metavar="PATH")
    client_key: str = setting("", help="PEM key of --client-cert", metavar="PATH")
    server_name: str = setting("", help="name on the servers' certificates when it differs from HOST", metavar="NAME")

    def check(self) -> None:
        super().check()
        if bool(self.client_cert) != bool(self.client_key):
            raise ConfigError("client_cert", "--client-cert and --client-key go together")

    def tls_options(self) -> dict[str, object]:
        """Keyword arguments of create_channel (and so of both clients)."""
        return dict(
            tls=self.tls,
            tls_ca=self.tls_ca or None,
            client_cert=self.client_cert or None,
            client_key=self.client_key or None,
            server_name=self.server_name or None,
        )

    def registry_token(self) -> str | None:
        """--token, else the content of --token-file, else None (InvalidArgumentError for a bad file)."""
        return self.token or read_token_file(self.token_file, "registry")

    def registry_client(self, cache_dir: str | Path | None = None) -> RegistryClient:
        return RegistryClient(
            self.registry,
            token=self.registry_token(),
            cache_dir=cache_dir,
            timeout_s=self.timeout_s,
            **self.tls_options(),  # type: ignore[arg-type]
        )


@dataclass(frozen=True, kw_only=True)
class JsonOutput(ConfigBase):
    """Whether a command prints JSON for scripts."""

    json: bool = setting(False, help="print the result as JSON on stdout")
