# Every target creates or updates .venv itself: a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv run test lint format bench bench-peers bench-device device-wheels clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The main job: a DP-SGD linear head on ScatterNet features (fixed scattering transform,
# kymatio J=2 L=8, GroupNorm) of Fashion-MNIST at (epsilon 3, delta 1e-5): ~89.8% test, ~5 min.
# Override with CONFIG=... WORKDIR=...
CONFIG ?= configs/fmnist_best.py:run
WORKDIR ?= runs/fmnist_best_run
run: $(STAMP)
	$(PY) -m dpft --config $(CONFIG) --workdir $(WORKDIR)

# Test files are spread over one worker per core (pytest-xdist, a whole file per worker so that
# module fixtures are built once), handed out in collection order, which tests/conftest.py
# makes slowest file first; the slowest tests are listed at the end of the log.
# TEST_WORKERS=0 runs in one process. pytest's exit 5 (no test collected) fails the target.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP)
	$(PY) -m bench.run
	$(PY) -m bench.head_cost
	$(PY) -m bench.federated

# The bench against its peers, in a venv of its own (PEER_VENV, inside .venv by default), so
# that the dev venv keeps its PyTorch: dpft (editable) with jax, jaxlib, flax, optax and numpy
# pinned to the dev venv's versions, PyTorch 2.14.1 with torchvision 0.29.1 (timm needs a
# torchvision built for the installed torch; PyPI's Linux wheels are CUDA builds, about 3.5 GB
# with their nvidia-* wheels, and run on CPU), timm 1.0 (the ViT workload's PyTorch model),
# Opacus 1.6 and jax-privacy 2.x; then `python -m bench.run --peers $(BENCH_PEERS_ARGS)`.
# Peers are optional: a failed install is reported and the bench runs with whatever imports
# (without timm the ViT rows use bench.peers_torch.ViTTwin; `make bench` needs no peer).
# e.g. make bench-peers BENCH_PEERS_ARGS="--only vit_ti16 --out results_vit"
PEER_VENV ?= $(VENV)/peers
PEER_PY := $(PEER_VENV)/bin/python
PEER_PINS := $(PEER_VENV)/peer-pins.txt
BENCH_PEERS_ARGS ?=
bench-peers: $(STAMP)
	test -x $(PEER_PY) || $(PYTHON) -m venv $(PEER_VENV)
	$(PY) -m pip freeze | grep -iE '^(jax|jaxlib|flax|optax|numpy)==' > $(PEER_PINS)
	$(PEER_PY) -m pip install --quiet -c $(PEER_PINS) -e '.[dev]'
	$(PEER_PY) -m pip install --quiet -c $(PEER_PINS) torch==2.14.1 torchvision==0.29.1 \
	    'timm==1.0.*' \
	  || $(PEER_PY) -m pip install --quiet -c $(PEER_PINS) torch==2.13.0 \
	  || echo "bench-peers: torch not installed"
	$(PEER_PY) -c "import timm" 2>/dev/null \
	  || echo "bench-peers: timm does not import (the ViT rows use ViTTwin, its rebuild)"
	$(PEER_PY) -m pip install --quiet -c $(PEER_PINS) 'opacus==1.6.*' \
	  || $(PEER_PY) -m pip install --quiet -c $(PEER_PINS) 'opacus>=1,<2' \
	  || echo "bench-peers: opacus not installed"
	$(PEER_PY) -m pip install --quiet -c $(PEER_PINS) 'jax-privacy>=2,<3' \
	  || ($(PEER_PY) -m pip install --quiet --no-deps 'jax-privacy>=2,<3' \
	      && $(PEER_PY) -m pip install --quiet -c $(PEER_PINS) absl-py chex dp-accounting pydantic) \
	  || echo "bench-peers: jax-privacy not installed"
	$(PEER_PY) -c "import torch, timm, opacus, jax_privacy as jp; \
	  print('bench-peers: torch', torch.__version__, 'timm', timm.__version__, \
	  'opacus', opacus.__version__, 'jax_privacy', jp.__version__)" \
	  || echo "bench-peers: some peers do not import"
	$(PEER_PY) -m bench.run --peers $(BENCH_PEERS_ARGS)

# The accelerator check (bench/device.sh): one JSON line of examples/s for ViT-B/16 and ResNet-50,
# non-private vs DP (ghost, vmap) vs huge-batch DP-LAMB vs Opacus. On a machine without network,
# run `make device-wheels` first where pip works and carry .whl/ along.
bench-device:
	bash bench/device.sh $(BENCH_ARGS)

# Wheels bench/device.sh installs on an offline accelerator machine that has JAX, PyTorch and
# timm but not Opacus (pure Python; its other needs are there).
device-wheels:
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp -d .whl 'opacus==1.6.*'

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
