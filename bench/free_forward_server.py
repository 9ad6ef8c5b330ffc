"""A benchmark-only harness: the real extractor with its backbone's forward pass made free, so that what is left of
a served image's cost is the serving path's own (decode, batching, quantize, encode, gRPC). Never deploy it.

    python -m bench.free_forward_server --listen 127.0.0.1:0 --backbone vit_base_patch16_224 [any mist-extractor flag]

On import it replaces `services.extractor.engine.gather` (the module global the engine calls once per batch) with
`free_gather`: the first call for a (mode, ks) runs the real gather once on up to SEED_IMAGES images of that batch,
then every call returns rows cycled from those real features as views, so the answers are compressed exactly as
real features would be. The patch is at module level, not under `__main__`, because the workers of `--workers N`
are started with multiprocessing's spawn, which imports the parent's main module again in every worker.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence

import torch

import services.extractor.engine as _engine
from services.extractor.gather import gather as _real_gather
from services.extractor.server import main

SEED_IMAGES = 4  # distinct images whose real features every answer reuses
POOL_ROWS = 32  # rows kept per k: the default --max-batch-size, so a batch is one view of the pool

_pools: dict[tuple[str, tuple[int, ...]], dict[int, torch.Tensor]] = {}
_lock = threading.Lock()  # the engine calls gather from one forward thread; the lock only guards a future change


def free_gather(model: torch.nn.Module, images: torch.Tensor, mode: str, ks: Sequence[int]) -> dict[int, torch.Tensor]:
    """What `gather` returns ({k: float32 [B, T, D]}; key 0 for modes other than mist), without a forward pass."""
    batch = int(images.shape[0])
    pool = _pool(model, images, mode, tuple(ks))
    return {k: _rows(rows, batch) for k, rows in pool.items()}


def _pool(model: torch.nn.Module, images: torch.Tensor, mode: str, ks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    key = (mode, ks)
    pool = _pools.get(key)
    if pool is None:
        with _lock:
            pool = _pools.get(key)
            if pool is None:
                seeds = _real_gather(model, images[:SEED_IMAGES], mode, ks)  # the only real forward pass
                pool = {k: _tile(features, POOL_ROWS) for k, features in seeds.items()}
                _pools[key] = pool
    return pool


def _tile(features: torch.Tensor, rows: int) -> torch.Tensor:
    """`rows` rows cycled from `features` (float32, contiguous), built once."""
    repeats = -(-rows // features.shape[0])
    return features.float().repeat(repeats, *([1] * (features.dim() - 1)))[:rows].contiguous()


def _rows(pool: torch.Tensor, batch: int) -> torch.Tensor:
    if batch <= pool.shape[0]:
        return pool[:batch]  # a view: no copy, no arithmetic
    return _tile(pool, batch)  # only with --max-batch-size above POOL_ROWS


if not hasattr(_engine, "gather"):
    raise ImportError(
        "services.extractor.engine no longer has a module-global `gather`: bench.free_forward_server cannot make "
        "the forward free; update the harness to patch what the engine calls now"
    )
_engine.gather = free_gather


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
