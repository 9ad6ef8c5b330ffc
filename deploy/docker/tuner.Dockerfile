# syntax=docker/dockerfile:1
# mist-tuner: the gRPC training worker (and the `mist` CLI) on the CPU build of torch, without timm, as on
# an edge device. Build from the repository root:
#   docker build -f deploy/docker/tuner.Dockerfile -t mist-tuner:0.1.0 .

# The same base in both stages: the runtime copies the build stage's virtualenv, which points at its Python.
# Pin by digest for reproducible builds: --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Where pip finds packages: unset, PyPI; `scripts/images.py` (make images) points them at a wheelhouse it serves
# on the Docker bridge. PIP_CONSTRAINT: the exact versions of deploy/docker/constraints.txt, for every install.
ARG PIP_INDEX_URL
ARG PIP_TRUSTED_HOST
# The CPU-only build: about a tenth of the CUDA wheels' size, and all a tuner uses.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/opt/constraints.txt
COPY deploy/docker/constraints.txt /opt/constraints.txt
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
# DL3013: this is the project itself; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[tuner]"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 mist \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin mist
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The tuner must run where timm cannot be installed: prove the image has neither timm nor a CUDA torch,
# and that the entry point starts.
RUN ! python -c "import timm" \
    && python -c "import sys, torch; sys.exit(torch.version.cuda is not None)" \
    && mist-tuner --help > /dev/null
USER 10001:10001
WORKDIR /tmp
EXPOSE 50053 9103
ENTRYPOINT ["mist-tuner"]
