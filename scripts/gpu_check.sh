#!/usr/bin/env bash
# The prepared GPU check (≤ 5 min on one NVIDIA GPU), run from the checkout with the machine's own python3:
#   bash scripts/gpu_check.sh [--json FILE] [--reps N]
# Needs jax[cuda], flax, optax, orbax-checkpoint, torch, transformers; no downloads, no pretrained weights.
set -euo pipefail
cd "$(dirname "$0")/.."
# JAX and PyTorch share the GPU here: JAX takes half of its memory, not its default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
# cuBLAS GEMMs instead of autotuned Triton ones: on an H200 each bert-base step compiled in 93 s instead of
# 200-240 s, the bf16 step 5% slower (README "Measured on a GPU"). A caller's own XLA_FLAGS replace this.
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}"
PYTHONPATH=. exec "${PYTHON:-python3}" -m scripts.cli --compile-cache off gpu-check "$@"
