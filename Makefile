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
# module fixtures are built once); the slowest tests are listed at the end of the log.
# TEST_WORKERS=0 runs in one process. pytest's exit 5 (no test collected) fails the target.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

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

# The bench against its peers: installs PyTorch 2.13 (CPU build), Opacus 1.6 and jax-privacy 2.x
# into the venv, then runs `python -m bench.run --peers`. jax, jaxlib, flax, optax and numpy are
# pinned to the installed versions so that no peer can change them. Peers are optional: a failed
# install is reported and the bench runs with whatever imports (`make bench` needs none of them).
PEER_PINS := $(VENV)/peer-pins.txt
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
bench-peers: $(STAMP)
	$(PY) -m pip freeze | grep -iE '^(jax|jaxlib|flax|optax|numpy)==' > $(PEER_PINS)
	@# The default index gives the CPU build here; if it would pull CUDA, use the CPU index.
	if $(PY) -m pip install --dry-run -c $(PEER_PINS) torch==2.13.0 2>/dev/null \
	    | grep -qi nvidia; then index="--index-url $(TORCH_CPU_INDEX)"; else index=""; fi; \
	$(PY) -m pip install --quiet -c $(PEER_PINS) $$index torch==2.13.0 \
	  || echo "bench-peers: torch 2.13.0 not installed"
	$(PY) -m pip install --quiet -c $(PEER_PINS) 'opacus==1.6.*' \
	  || $(PY) -m pip install --quiet -c $(PEER_PINS) 'opacus>=1,<2' \
	  || echo "bench-peers: opacus not installed"
	$(PY) -m pip install --quiet -c $(PEER_PINS) 'jax-privacy>=2,<3' \
	  || ($(PY) -m pip install --quiet --no-deps 'jax-privacy>=2,<3' \
	      && $(PY) -m pip install --quiet -c $(PEER_PINS) absl-py chex dp-accounting pydantic) \
	  || echo "bench-peers: jax-privacy not installed"
	$(PY) -c "import torch, opacus, jax_privacy as jp; \
	  print('bench-peers: torch', torch.__version__, 'opacus', opacus.__version__, \
	  'jax_privacy', jp.__version__)" || echo "bench-peers: some peers do not import"
	$(PY) -m bench.run --peers

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
