#!/usr/bin/env bash
# The prepared GPU check (≤ 5 min on one NVIDIA GPU), run from the checkout with the machine's own python3:
#   bash scripts/gpu_check.sh [--json FILE] [--reps N]
# Needs jax[cuda], flax, optax, orbax-checkpoint, torch, transformers; no downloads, no pretrained weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHONPATH=. exec "${PYTHON:-python3}" -m scripts.cli --compile-cache off gpu-check "$@"
