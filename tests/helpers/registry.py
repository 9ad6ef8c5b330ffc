"""Registry servers for tests, and the tiny task and real safetensors blobs they serve.

with InProcessRegistry(RegistryConfig(db=url, metrics_listen="off")) as server:   # port 0, own thread
    server.target, server.metric("mist_registry_pushes_total", code="OK")
proc = RegistryProcess.start(url, "--grace-s", "5")     # `python -m services.registry.server`, port 0
    proc.target, proc.metrics_port, proc.terminate() -> exit code, proc.kill(), proc.log()
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import safetensors.numpy
from prometheus_client import CollectorRegistry

from services.common.pb import feature_pb2, registry_pb2
from services.common.serving.metrics import GrpcMetrics, new_metrics_registry, start_metrics_server
from services.common.serving.server import create_server, shutdown
from services.common.wire.edge_spec import EdgeNetworkConfig, state_shapes
from services.registry.config import RegistryConfig
from services.registry.records import Version
from services.registry.server import build
from services.registry.store import RegistryStore
from tests.helpers.process import ServiceProcess

# 32 dims x 17 tokens like the tiny test ViT; 2 blocks of rank 4: 1,403 parameters, a ~7 KB blob (2 chunks
# of 4 KiB, so chunking is exercised).
CONFIG = EdgeNetworkConfig(dims=32, tokens=17, num_classes=3, num_blocks=2, rank=4)
CLASSES = ("cat", "dog", "fox")
_START_TIMEOUT_S = 30.0


def task_proto(
    name: str = "cats", config: EdgeNetworkConfig = CONFIG, classes: tuple[str, ...] = CLASSES
) -> registry_pb2.Task:
    """A CreateTask definition for `config` (i8-zstd features of a random tiny ViT, k = 2)."""
    return registry_pb2.Task(
        name=name,
        backbone=feature_pb2.BackboneId(name="vit_tiny_patch16_224", weights_fingerprint="random-0"),
        mode=feature_pb2.GATHER_MODE_MIST,
        k=2,
        codec=feature_pb2.CodecSpec(dtype=feature_pb2.DTYPE_I8, compression=feature_pb2.COMPRESSION_ZSTD),
        class_names=list(classes),
        edge=config.to_proto(),
        description="test task",
    )


def make_blob(
    seed: int = 0,
    config: EdgeNetworkConfig = CONFIG,
    *,
    nan: bool = False,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> bytes:
    """Safetensors weights of the config's exact shapes (or `shapes`), float32 from `seed`; one NaN if asked."""
    rng = np.random.default_rng(seed)
    arrays = {
        name: rng.standard_normal(shape).astype(np.float32) for name, shape in (shapes or state_shapes(config)).items()
    }
    if nan:
        arrays["head.bias"][0] = np.nan
    return safetensors.numpy.save(arrays)


class InProcessRegistry:
    """A registry server on 127.0.0.1 port 0 served by its own event loop thread; stop() drains it."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.port = 0
        self.metrics_port: int | None = None
        self.metrics_registry: CollectorRegistry = new_metrics_registry()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value (0.0 when absent), read like a scrape would."""
        return self.metrics_registry.get_sample_value(name, labels) or 0.0

    async def _serve(self) -> None:
        try:
            setup = await build(self.config, self.metrics_registry)
            metrics = GrpcMetrics(self.metrics_registry, "mist_registry")
            server, self.port, health = await create_server(
                self.config, setup.add_services, token_validator=setup.token_validator, metrics=metrics
            )
            stop_metrics, self.metrics_port = start_metrics_server(self.config.metrics_listen, self.metrics_registry)
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        except BaseException as error:
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await shutdown(server, health, grace_s=2.0, on_drain=setup.on_drain)
            await setup.on_shutdown()
            stop_metrics()

    def start(self) -> InProcessRegistry:
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise RuntimeError(f"registry did not start within {_START_TIMEOUT_S} s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def __enter__(self) -> InProcessRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RegistryProcess(ServiceProcess):
    """`python -m services.registry.server` (helpers.process.ServiceProcess), started and listening by `start()`."""

    @classmethod
    def start(cls, db_url: str, *flags: str, env: dict[str, str] | None = None) -> RegistryProcess:
        server = cls("services.registry.server", "--db", db_url, *flags, env=env)
        try:
            server.wait_listening()
        except BaseException:
            server.kill()
            raise
        return server


def all_versions(store: RegistryStore, task: str) -> list[Version]:
    """Every live version of `task`, newest first, across pages (one page holds at most 1000)."""
    versions, token = [], ""
    while True:
        page = store.list_versions(task, page_size=1000, page_token=token)
        versions.extend(page.items)
        if not page.next_page_token:
            return versions
        token = page.next_page_token
