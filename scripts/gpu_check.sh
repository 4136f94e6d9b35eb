#!/usr/bin/env bash
# The prepared GPU check (≤ 5 min on one NVIDIA GPU), run from the checkout with the machine's own python3:
#   bash scripts/gpu_check.sh [--json FILE] [--reps N]
# Needs jax[cuda], flax, optax, orbax-checkpoint, torch, transformers; no downloads, no pretrained weights.
set -euo pipefail
cd "$(dirname "$0")/.."
# JAX and PyTorch share the GPU here: JAX takes half of its memory, not its default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
PYTHONPATH=. exec "${PYTHON:-python3}" -m scripts.cli --compile-cache off gpu-check "$@"
