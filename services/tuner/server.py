"""The `mist-tuner` entry point: the stateless tuner worker behind the shared server plumbing (health, reflection,
/metrics, TLS, auth, SIGTERM drain). Devices too weak to train send labelled images and get a pushed version back.

    mist-tuner --listen 127.0.0.1:50053 --metrics-listen 127.0.0.1:9103 --extractor 127.0.0.1:50051 \\
        --registry 127.0.0.1:50052
    python -m services.tuner.server --help          # every flag, with its MIST_* variable
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import grpc
from prometheus_client import CollectorRegistry

from services.common.pb import tuner_pb2_grpc
from services.common.serving.server import ServiceSetup, run_service
from services.tuner.cli import CLI_ENV
from services.tuner.config import TunerConfig
from services.tuner.memory import limit_heap_growth
from services.tuner.metrics import TunerMetrics
from services.tuner.servicer import SERVICE_NAME, TunerServicer

SERVER_NAME = "mist-tuner"
log = logging.getLogger(__name__)


async def build(config: TunerConfig, registry: CollectorRegistry) -> ServiceSetup:
    """The servicer (token files are read now, so a bad one fails at start, not on the first call)."""
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    servicer = TunerServicer(config, TunerMetrics(registry))
    log.info(
        "tuning with features from %s, pushing to %s; %d tune job(s) at a time, up to %d images each",
        config.extractor,
        config.registry,
        config.max_concurrent_jobs,
        config.max_tune_images,
    )

    def add_services(server: grpc.aio.Server) -> list[str]:
        tuner_pb2_grpc.add_TunerServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    return ServiceSetup(add_services=add_services)


def main(argv: Sequence[str] | None = None) -> int:
    """`mist-tuner`: flags and MIST_* variables (the `mist` command's too) -> a running worker until SIGTERM."""
    limit_heap_growth()
    return run_service(TunerConfig, build, service_name=SERVER_NAME, argv=argv, allowed_env=CLI_ENV)


if __name__ == "__main__":
    sys.exit(main())
