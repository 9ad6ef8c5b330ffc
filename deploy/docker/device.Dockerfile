# syntax=docker/dockerfile:1
# mist-device: an edge device that only predicts (`mist predict --runtime numpy`, `mist evaluate`): the base
# dependencies and the numpy runtime of the edge network; never torch, timm or Pillow. Build from the
# repository root:
#   docker build -f deploy/docker/device.Dockerfile -t mist-device:0.1.0 .

# The same base in both stages: the runtime copies the build stage's virtualenv, which points at its Python.
# Pin by digest for reproducible builds: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Where pip finds packages: unset, PyPI; `scripts/images.py` (make images) points them at a wheelhouse it serves
# on the Docker bridge. PIP_CONSTRAINT: the exact versions of deploy/docker/constraints.txt, for every install.
ARG PIP_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/opt/constraints.txt
COPY deploy/docker/constraints.txt /opt/constraints.txt
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
# DL3013: this is the project itself; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[device]"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 mist \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin mist
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# What makes it a device image: no torch and no timm, and predict still starts.
RUN ! python -c "import torch" \
    && ! python -c "import timm" \
    && mist predict --help > /dev/null
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["mist"]
