"""The `mist-extractor` entry point: load the backbone once, start the engine, serve Extract and Describe through the
shared server factory (health, reflection, /metrics, TLS, auth, SIGTERM drain); with --workers N, N such processes
on one port under a supervisor (services/common/serving/supervisor.py).

    python -m services.extractor.server --listen 127.0.0.1:50051 --metrics-listen 127.0.0.1:9101 \\
        --backbone vit_tiny_patch16_224 --model-kwargs '{"img_size":32,"patch_size":8,"embed_dim":32,"depth":4,"num_heads":2}'
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import sys
from collections.abc import Sequence

import torch
from prometheus_client import CollectorRegistry

from services.common.config import load_config
from services.common.serving.allocator import limit_malloc_arenas
from services.common.serving.server import ServiceSetup, serve
from services.common.serving.supervisor import supervise
from services.extractor.backbone import LoadedBackbone, load_backbone
from services.extractor.config import ExtractorConfig, available_cpus
from services.extractor.engine import ExtractionEngine
from services.extractor.metrics import ExtractorMetrics
from services.extractor.servicer import add_extractor

SERVICE_NAME = "mist-extractor"
logger = logging.getLogger(__name__)


def load_configured_backbone(config: ExtractorConfig) -> LoadedBackbone:
    """The backbone the flags name (a random init logs the loud warning itself)."""
    return load_backbone(
        config.backbone,
        weights=config.weights or None,
        device=config.device,
        precision=config.precision,
        seed=config.seed,
        model_kwargs=config.model_kwargs_dict,
        input_size=config.input_size,
    )


async def build(
    config: ExtractorConfig, registry: CollectorRegistry, *, backbone: LoadedBackbone | None = None
) -> ServiceSetup:
    """Load the backbone (unless one is given, as tests do), start the engine, and hand the servicer to serve()."""
    torch.set_num_threads(config.forward_threads)  # this thread; the engine sets its own threads' counts
    backbone = backbone if backbone is not None else load_configured_backbone(config)
    engine = ExtractionEngine(backbone, config, ExtractorMetrics(registry))
    await engine.start()
    geometry = backbone.geometry
    logger.info(
        "serving %s (%s: N=%d %s, T=%d tokens, D=%d dims) on %s: batches of up to %d images within %g ms, "
        "%d images in flight per stream, %d streams, cache %d bytes, %d decode threads, %d torch threads",
        backbone.name,
        backbone.architecture,
        geometry.num_blocks,
        geometry.k_unit,
        geometry.tokens,
        geometry.dims,
        backbone.device,
        config.max_batch_size,
        config.max_queue_delay_ms,
        config.max_items_in_flight,
        config.max_streams,
        config.cache_max_bytes,
        config.worker_threads,
        config.forward_threads,
    )
    return ServiceSetup(
        add_services=functools.partial(add_extractor, engine=engine),
        on_shutdown=functools.partial(engine.close, drain=True),
    )


def worker_config(config: ExtractorConfig) -> ExtractorConfig:
    """The config of each of --workers N processes: "every CPU" for torch (--torch-threads 0) becomes a 1/N share."""
    if config.torch_threads:
        return config
    return dataclasses.replace(config, torch_threads=max(1, available_cpus() // config.workers))


def main(argv: Sequence[str] | None = None) -> int:
    """`mist-extractor`: flags and MIST_* variables -> a running server (or --workers of them) until SIGTERM."""
    limit_malloc_arenas()  # before any serving thread allocates (services/common/serving/allocator.py)
    config = load_config(ExtractorConfig, argv, prog=SERVICE_NAME)
    if config.workers > 1:
        return supervise(worker_config(config), build, service_name=SERVICE_NAME, workers=config.workers)
    return asyncio.run(serve(config, build, service_name=SERVICE_NAME))


if __name__ == "__main__":
    sys.exit(main())
