#!/usr/bin/env bash
# The GPU check: CUDA/bf16 paths of the objective and the teacher's scoring at Qwen2.5's
# 151,936-token vocabulary, and Gemma-2's softcapped output head at its 256,000-token vocabulary
# (see benchmarks/gpu_check.py). Needs only torch + transformers, so it runs on a bare CUDA
# image. Output: $OUT/gpu_check.{md,json,log}; the recorded run is benchmarks/GPU_CHECK.md.
# Extra arguments go to gpu_check.py.
#
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh --sections gemma2_softcap
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tsdkd_gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
PYTHONUNBUFFERED=1 timeout 480 python3 benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
PYTHONUNBUFFERED=1 timeout 300 python3 benchmarks/gpu_actor_step.py --out "$OUT" 2>&1 | tee "$OUT/gpu_actor_step.log"
