"""Where the tuner's dependencies live (Endpoints: the extractor and the registry, with TLS and tokens) and the
settings of the `mist-tuner` worker (TunerConfig: every flag also a MIST_* variable, as for every server).

    mist-tuner --listen 127.0.0.1:50053 --metrics-listen 127.0.0.1:9103 --extractor 127.0.0.1:50051 \\
        --registry 127.0.0.1:50052 [--registry-token-file PATH] [--max-concurrent-jobs 1] \\
        [--upstream-tls-ca PATH [--upstream-tls-cert PATH --upstream-tls-key PATH]]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.clients.extractor import DEFAULT_MAX_IN_FLIGHT, ExtractorClient
from services.common.clients.registry import RegistryClient
from services.common.config import ConfigError, ServerConfig, check_existing_file, check_host_port, setting
from services.common.errors import InvalidArgumentError

DEFAULT_EXTRACTOR = "127.0.0.1:50051"  # DESIGN.md's command line: mist-extractor --listen 127.0.0.1:50051
DEFAULT_REGISTRY = "127.0.0.1:50052"  # mist-registry --listen 127.0.0.1:50052
DEFAULT_TIMEOUT_S = 60.0  # per registry call; a push of ~1 MB weights takes well under a second
_GiB = 1 << 30


@dataclass(frozen=True)
class Endpoints:
    """How to reach the extractor and the registry; one object the CLI, the demo and the worker share."""

    extractor: str = DEFAULT_EXTRACTOR  # HOST:PORT (or a DNS name of several replicas) of mist-extractor
    registry: str = DEFAULT_REGISTRY  # HOST:PORT of mist-registry
    registry_token: str | None = None  # bearer token for the registry (a per-task token is enough to push)
    extractor_token: str | None = None  # bearer token for the extractor, when it runs with --auth-tokens-file
    tls: bool = False  # TLS to both, with the system's CAs unless tls_ca is set
    tls_ca: str | None = None  # PEM CA bundle that signed both servers (implies TLS)
    client_cert: str | None = None  # PEM client certificate for mutual TLS
    client_key: str | None = None  # PEM key of client_cert
    server_name: str | None = None  # name on the servers' certificates when it differs from the host
    cache_dir: str | None = None  # pulled weights by sha256 (None: in memory, for this process only)
    timeout_s: float = DEFAULT_TIMEOUT_S  # deadline of each registry call

    def __post_init__(self) -> None:
        for name in ("extractor", "registry"):
            try:
                check_host_port(getattr(self, name))
            except ValueError as error:
                raise InvalidArgumentError(f"{name} address: {error}") from None
        if not self.timeout_s > 0:
            raise InvalidArgumentError(f"timeout_s must be positive, got {self.timeout_s!r}")

    def _tls(self) -> dict[str, object]:
        return dict(
            tls=self.tls,
            tls_ca=self.tls_ca,
            client_cert=self.client_cert,
            client_key=self.client_key,
            server_name=self.server_name,
        )

    def extractor_client(self) -> ExtractorClient:
        return ExtractorClient(self.extractor, token=self.extractor_token, **self._tls())  # type: ignore[arg-type]

    def registry_client(self, *, use_cache_dir: bool = True) -> RegistryClient:
        cache = Path(self.cache_dir).expanduser() if self.cache_dir and use_cache_dir else None
        return RegistryClient(
            self.registry, token=self.registry_token, cache_dir=cache, timeout_s=self.timeout_s, **self._tls()
        )  # type: ignore[arg-type]


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
class TunerConfig(ServerConfig):
    """mist-tuner: the stateless tuner worker (Tune and Predict over gRPC for devices too weak to train)."""

    extractor: str = setting(
        DEFAULT_EXTRACTOR,
        help="mist-extractor address the worker fetches features from",
        parser=check_host_port,
        metavar="HOST:PORT",
    )
    registry: str = setting(
        DEFAULT_REGISTRY,
        help="mist-registry address the worker pulls from and pushes to",
        parser=check_host_port,
        metavar="HOST:PORT",
    )
    registry_token_file: str = setting(
        "",
        help="bearer token the worker presents to the registry (needs read_write on the tasks it tunes); empty: none",
        parser=check_existing_file,
        metavar="PATH",
    )
    extractor_token_file: str = setting(
        "",
        help="bearer token the worker presents to the extractor; empty: none",
        parser=check_existing_file,
        metavar="PATH",
    )
    upstream_tls_ca: str = setting(
        "",
        help="PEM CA bundle of the extractor and registry; set: talk TLS to them",
        parser=check_existing_file,
        metavar="PATH",
    )
    upstream_tls_cert: str = setting(
        "",
        help="PEM client certificate the worker presents upstream (mutual TLS); "
        "needs --upstream-tls-ca and --upstream-tls-key",
        parser=check_existing_file,
        metavar="PATH",
    )
    upstream_tls_key: str = setting(
        "", help="PEM private key of --upstream-tls-cert", parser=check_existing_file, metavar="PATH"
    )
    upstream_server_name: str = setting(
        "", help="name on the upstream certificates when it differs from HOST", metavar="NAME"
    )
    max_concurrent_jobs: int = setting(
        1,
        help="Tune calls trained at once; more fail with RESOURCE_EXHAUSTED so "
        "clients retry on another replica (training uses every core)",
        minimum=1,
        metavar="N",
    )
    max_tune_images: int = setting(
        20_000, help="images one Tune call may send (they are held in memory)", minimum=2, metavar="N"
    )
    max_tune_bytes: int = setting(
        2 * _GiB, help="image bytes one Tune call may send in total", minimum=1 << 20, metavar="BYTES"
    )
    max_in_flight: int = setting(
        DEFAULT_MAX_IN_FLIGHT,
        help="images sent to the extractor and not yet answered, per call",
        minimum=1,
        metavar="N",
    )
    torch_threads: int = setting(
        0, help="torch threads for training and inference; 0 = every CPU", minimum=0, metavar="N"
    )

    def check(self) -> None:
        super().check()
        if self.upstream_server_name and not self.upstream_tls_ca:
            raise ConfigError("upstream_server_name", "only applies with --upstream-tls-ca")
        if bool(self.upstream_tls_cert) != bool(self.upstream_tls_key):
            raise ConfigError("upstream_tls_cert", "--upstream-tls-cert and --upstream-tls-key go together")
        if self.upstream_tls_cert and not self.upstream_tls_ca:
            raise ConfigError("upstream_tls_cert", "a client certificate needs --upstream-tls-ca (mutual TLS)")

    def endpoints(self) -> Endpoints:
        """The worker's own connections; nothing is cached across calls (the worker keeps no state)."""
        tls_ca = self.upstream_tls_ca or None
        return Endpoints(
            extractor=self.extractor, registry=self.registry,
            registry_token=read_token_file(self.registry_token_file, "registry"),
            extractor_token=read_token_file(self.extractor_token_file, "extractor"),
            tls=tls_ca is not None, tls_ca=tls_ca, server_name=self.upstream_server_name or None,
            client_cert=self.upstream_tls_cert or None, client_key=self.upstream_tls_key or None,
        )  # fmt: skip
