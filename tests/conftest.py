"""Shared pytest fixtures. Tests use tiny randomly initialised timm ViTs; nothing downloads."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers.postgres import PostgresServer, PostgresUnavailable

# Belt and braces: no test may reach a model hub, even by accident.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_OFFLINE", "1")

# Tiny ViT geometry used across the suite: 32x32 images, 8x8 patches -> 16 patches + CLS = 17 tokens.
TINY_VIT_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


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
