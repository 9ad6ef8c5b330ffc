"""Where the tuner's servers are (Endpoints), the connection flags of `mist tune|predict|evaluate` that build it, and
the settings of the `mist-tuner` worker (TunerConfig).

    endpoints = config_from_args(ConnectionFlags, vars(namespace), os.environ).endpoints()
    with endpoints.extractor_client() as extractor, endpoints.registry_client() as registry:
        ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.clients.extractor import DEFAULT_MAX_IN_FLIGHT, ExtractorClient
from services.common.clients.registry import RegistryClient
from services.common.clients.settings import (
    DEFAULT_EXTRACTOR,
    DEFAULT_REGISTRY,
    DEFAULT_TIMEOUT_S,
    RegistryFlags,
    read_token_file,
)
from services.common.config import ConfigError, ServerConfig, check_existing_file, check_host_port, setting
from services.common.errors import InvalidArgumentError
from services.tuner.options import Runtime

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
            self.registry,
            token=self.registry_token,
            cache_dir=cache,
            timeout_s=self.timeout_s,
            error_prefix="registry: ",  # a tune talks to two servers: say which one refused
            **self._tls(),  # type: ignore[arg-type]
        )


DEFAULT_CACHE_DIR = "~/.cache/mist/registry"  # pulled weights by sha256, shared by predict and evaluate


@dataclass(frozen=True, kw_only=True)
class ConnectionFlags(RegistryFlags):
    """How `mist tune|predict|evaluate` reach the extractor and the registry."""

    extractor: str = setting(
        DEFAULT_EXTRACTOR, help="mist-extractor address", parser=check_host_port, metavar="HOST:PORT"
    )
    extractor_token_file: str = setting(
        "", help="file holding the extractor's bearer token, when it checks tokens", metavar="PATH"
    )
    cache_dir: str = setting(
        DEFAULT_CACHE_DIR, help="local cache of pulled weights (by sha256); '' keeps them in memory", metavar="DIR"
    )
    max_in_flight: int = setting(
        DEFAULT_MAX_IN_FLIGHT, help="images sent to the extractor and not yet answered", minimum=1, metavar="N"
    )

    def endpoints(self) -> Endpoints:
        """The servers with tokens read (InvalidArgumentError for an unreadable token file)."""
        return Endpoints(
            extractor=self.extractor,
            registry=self.registry,
            registry_token=self.registry_token(),
            extractor_token=read_token_file(self.extractor_token_file, "extractor"),
            cache_dir=self.cache_dir or None,
            timeout_s=self.timeout_s,
            **self.tls_options(),  # type: ignore[arg-type]
        )


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
    predict_runtime: Runtime = setting(
        "numpy", help="what runs the edge network in Predict: numpy, or torch (the training code)"
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
