"""Shared pytest fixtures. Tests use tiny randomly initialised timm ViTs; nothing downloads."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest
from grpc._cython import cygrpc

from tests.helpers.postgres import PostgresServer, PostgresUnavailable

# Belt and braces: no test may reach a model hub, even by accident.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_OFFLINE", "1")

# Tiny ViT geometry used across the suite: 32x32 images, 8x8 patches -> 16 patches + CLS = 17 tokens.
TINY_VIT_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


@pytest.fixture(scope="session", autouse=True)
def grpc_aio_stays_initialised() -> Iterator[None]:
    """Keep grpc.aio initialised for the whole session, as it is in a server process.

    grpc.aio counts its live objects and tears its poller thread and the core down when the count reaches zero,
    then sets them up again for the next object. A test suite creates and drops hundreds of event loops, servers
    and channels; aborted calls leave reference cycles, so that count often reaches zero inside a garbage
    collection on an unrelated thread, long after the test that made them. CI once died with SIGSEGV in exactly
    such a collection (the poller thread alive, the main thread "Garbage-collecting"). Holding one reference
    keeps that teardown out of the suite: cygrpc.init_grpc_aio is the counter's own increment (a private grpc
    API, used only here in the tests).
    """
    cygrpc.init_grpc_aio()
    yield
    gc.collect()  # the session's garbage goes while grpc.aio is still up


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session (the registry store and service suites share it);
    each test takes a fresh namespace with create_schema(). Skips, saying why, where it cannot run."""
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as error:
        pytest.skip(f"PostgreSQL backend not tested: {error}")
    yield server
    server.stop()
