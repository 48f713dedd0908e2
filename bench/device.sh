#!/usr/bin/env bash
# The device check: dpft's non-private, DP (ghost and vmap norms) and huge-batch DP-LAMB steps on
# one accelerator, with PyTorch / Opacus on the same models where they import; one JSON line.
#
#   bash bench/device.sh [ARGS for python -m bench.device]    (make bench-device)
#
# Made for a machine that has JAX, flax, optax, numpy, absl, PyTorch, timm and torchvision
# installed but no network: every other package comes as wheels in .whl/ (make device-wheels
# fetches them where pip works; the device tool's `carry` takes them along). Nothing else is
# installed. The whole check is sized to end within 8 minutes on one H100 or H200; DEVICE_TIMEOUT
# (seconds, default 450) stops it before that, printing what it has.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dpft-site .whl/*.whl || { echo "device.sh: wheel install failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/dpft-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
timeout "${DEVICE_TIMEOUT:-450}" "$PY" -m bench.device "$@"
