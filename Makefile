# mist-suite: separated tuning of vision transformers.
# `make demo` runs the main job, `make test` the tests; both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# timm needs torchvision; these two builds are known to import together (the CPU-only
# torch wheel has no matching torchvision on PyPI). Override on other machines if needed.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.mist-installed
# checkov pins old networkx/packaging that would downgrade torch's: it gets a virtualenv of its own.
TOOLS_VENV ?= .venv-tools
TOOLS_STAMP := $(TOOLS_VENV)/.mist-installed
CHECKOV_VERSION ?= 3.3.30
PYTEST_ARGS ?=
# e.g. make demo DEMO_ARGS='--epochs 5 --workdir /tmp/demo' (flags of `mist demo --help`)
DEMO_ARGS ?=

.PHONY: setup tools system-deps proto proto-check test stress demo bench bench-quick bench-gpu images e2e-containers lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[all,dev,bench]'
	@touch $@

$(TOOLS_STAMP):
	@test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install -q 'checkov==$(CHECKOV_VERSION)'
	@touch $@

tools: $(TOOLS_STAMP)

system-deps:
	@scripts/system_deps.sh

proto: setup
	$(PY) scripts/gen_proto.py

proto-check: setup
	$(PY) scripts/gen_proto.py --check

test: setup tools system-deps
	$(PY) -m pytest -q -m "not stress" $(PYTEST_ARGS)

# The fuzz runs need atheris (the `stress` extra, a compiled wheel): installed here, not by `make setup`.
STRESS_STAMP := $(VENV)/.mist-stress-installed

$(STRESS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[stress]'
	@touch $@

stress: setup system-deps $(STRESS_STAMP)
	$(PY) -m pytest -q -s -m stress $(PYTEST_ARGS)

demo: setup
	$(PY) -m services.tuner.cli demo $(DEMO_ARGS)

bench: setup system-deps
	$(PY) -m bench.run

# The container images from deploy/docker/, also without a reachable container registry (scripts/images.py):
# needs a Docker engine (started when not running) and, without registry access, mmdebstrap for the base.
images: setup
	$(PY) scripts/images.py

# The three images as containers with the Kubernetes manifests' settings, driven from the host and from a device
# container under its memory budget; a registry SIGKILLed mid-push keeps every acknowledged version. Removes
# everything it starts (scripts/e2e_containers.py).
e2e-containers: images
	$(PY) scripts/e2e_containers.py

bench-quick: setup system-deps
	$(PY) -m bench.run --quick

# The accelerator benchmark: ViT-B/16 at bf16 and fp32 on CUDA (under 8 min), the micro ViT on a CPU; writes
# bench/results/gpu.json and GPU.md. e.g. make bench-gpu BENCH_GPU_ARGS='--smoke --out /tmp/gpu'
BENCH_GPU_ARGS ?=

bench-gpu: setup system-deps
	$(PY) -m bench.gpu $(BENCH_GPU_ARGS)

lint: setup tools proto-check
	$(PY) -m ruff check services tests scripts bench
	$(PY) -m ruff format --check services tests scripts bench
	$(PY) scripts/gen_cli_docs.py --check
	$(PY) scripts/check_manifests.py
	$(PY) scripts/build_monitoring.py --check

clean:
	rm -rf $(VENV) $(TOOLS_VENV) var .pytest_cache .ruff_cache .hypothesis
