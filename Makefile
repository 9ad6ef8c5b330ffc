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
PYTEST_ARGS ?=

.PHONY: setup system-deps proto proto-check test stress demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[all,dev]'
	@touch $@

system-deps:
	@scripts/system_deps.sh

proto: setup
	$(PY) scripts/gen_proto.py

proto-check: setup
	$(PY) scripts/gen_proto.py --check

test: setup system-deps
	$(PY) -m pytest -q -m "not stress" $(PYTEST_ARGS)

stress: setup system-deps
	$(PY) -m pytest -q -s -m stress $(PYTEST_ARGS)

demo: setup
	$(PY) -m services.extractor.transfer --backbone vit_tiny_patch16_224 --images 4 \
	  --model-kwargs '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}'
	$(PY) -m services.extractor.transfer --backbone vit_base_patch16_224 --images 8 --json var/demo/transfer.json

bench: setup
	$(PY) -m services.extractor.transfer --backbone vit_base_patch16_224 --images 8 --json bench/results/transfer.json

lint: setup proto-check
	$(PY) -m ruff check services tests scripts bench

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis
