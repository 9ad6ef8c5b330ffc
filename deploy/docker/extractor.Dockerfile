# syntax=docker/dockerfile:1
# mist-extractor: the frozen timm ViT as a gRPC service. Build from the repository root:
#   docker build -f deploy/docker/extractor.Dockerfile -t mist-extractor:0.1.0 .
#   docker build -f deploy/docker/extractor.Dockerfile -t mist-extractor:0.1.0-cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# No weights inside: the pod mounts them read-only at /models (MIST_WEIGHTS=/models/FILE).

# The same base in both stages: the runtime copies the build stage's virtualenv, which points at its Python.
# Pin by digest for reproducible builds: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Where pip finds packages: unset, PyPI; `scripts/images.py` (make images) points them at a wheelhouse it serves
# on the Docker bridge. PIP_CONSTRAINT: the exact versions of deploy/docker/constraints.txt, for every install.
ARG PIP_INDEX_URL
ARG PIP_TRUSTED_HOST
# CPU build by default; a CUDA index (e.g. .../whl/cu128) for GPU nodes. The versions match the Makefile's
# TORCH_PINS, which are known to import together with timm.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/opt/constraints.txt
COPY deploy/docker/constraints.txt /opt/constraints.txt
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from its own index: the project's `torch>=` requirement is then already met.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
# DL3013: this is the project itself; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[extractor]"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 mist \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin mist
COPY --from=build /opt/venv /opt/venv
# HF_HUB_OFFLINE: weights come from a file or a pre-filled cache, never from the network.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1
# Fails the build if the entry point or an import is broken.
RUN mist-extractor --help > /dev/null
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9101
ENTRYPOINT ["mist-extractor"]
