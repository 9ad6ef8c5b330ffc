"""The registry server's entry point: opens the store, wires servicer, auth and metrics into the shared plumbing.

mist-registry --listen 127.0.0.1:50052 --metrics-listen 127.0.0.1:9102 --db sqlite:///registry.db
python -m services.registry.server --help          # every flag, with its MIST_* variable
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
from prometheus_client import CollectorRegistry

from services.common.config import split_host_port
from services.common.pb import registry_pb2_grpc
from services.common.serving.server import ServiceSetup, run_service
from services.registry.config import RegistryConfig, describe_db, read_admin_token
from services.registry.metrics import RegistryMetrics
from services.registry.servicer import SERVICE_NAME, RegistryServicer, StoreTokenValidator
from services.registry.store import hash_token, open_store
from services.registry.watch import AliasFeed

log = logging.getLogger(__name__)

SERVER_NAME = "mist-registry"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


async def build(config: RegistryConfig, registry: CollectorRegistry) -> ServiceSetup:
    """Opens (and migrates) the store and returns what serve() needs; the store closes in on_shutdown."""
    admin_hash = hash_token(read_admin_token(config.admin_token_file)) if config.auth == "on" else None
    # Every store call runs in asyncio's default executor: one thread per database connection, since more
    # threads would only queue for a connection and fewer would leave connections idle.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(config.db_max_connections, thread_name_prefix="registry-store")
    )
    # Opening migrates the schema and may wait on a PostgreSQL lock: keep it off the event loop.
    store = await asyncio.to_thread(
        open_store, config.db, admin_token_sha256=admin_hash, max_connections=config.db_max_connections
    )
    log.info("registry store %s (%s), auth %s", describe_db(config.db), store.dialect, config.auth)
    if config.auth == "off" and split_host_port(config.listen)[0] not in _LOOPBACK_HOSTS:
        log.warning(
            "auth is off on %s: anyone who reaches it may push, move aliases and delete versions "
            "(use --auth on with --admin-token-file)",
            config.listen,
        )
    metrics = RegistryMetrics(registry, store)
    feed = AliasFeed(store, poll_interval_s=config.watch_poll_interval_s)
    feed.start()
    metrics.count_watchers(feed)
    servicer = RegistryServicer(store, config, metrics, feed)

    def add_services(server: grpc.aio.Server) -> list[str]:
        registry_pb2_grpc.add_RegistryServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    async def on_shutdown() -> None:
        await feed.close()
        await asyncio.to_thread(store.close)

    validator = StoreTokenValidator(store) if config.auth == "on" else None
    # Draining ends the watch streams at once (UNAVAILABLE): the devices reconnect to another replica instead of
    # holding the drain for its whole grace period.
    return ServiceSetup(
        add_services=add_services, token_validator=validator, on_shutdown=on_shutdown, on_drain=feed.close
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(RegistryConfig, build, service_name=SERVER_NAME, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
