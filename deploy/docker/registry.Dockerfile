# syntax=docker/dockerfile:1
# mist-registry: versioned edge-network weights (SQLite on a volume, or PostgreSQL). No torch: safetensors
# headers are parsed without it. Build from the repository root:
#   docker build -f deploy/docker/registry.Dockerfile -t mist-registry:0.1.0 .

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
# psycopg[binary] ships libpq in its wheel: no compiler or libpq-dev needed.
# DL3013: this is the project itself; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[registry]"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 mist \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin mist
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A registry image with torch would be ten times larger for nothing: prove it has none.
RUN ! python -c "import torch" \
    && mist-registry --help > /dev/null
USER 10001:10001
WORKDIR /tmp
EXPOSE 50052 9102
ENTRYPOINT ["mist-registry"]
