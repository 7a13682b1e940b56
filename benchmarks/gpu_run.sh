#!/usr/bin/env bash
# One accelerator session: kernel parity tests, then SFT and DPO of a 1B Llama (bf16, seq 2048) with MFU.
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh [steps]
#
# 1. tests/test_attention_kernels.py: cuDNN fused attention equals the XLA path (values and gradients,
#    packed rows, sliding window) and the compiled step really calls cuDNN.
# 2. SFT 8 x 2048 with XLA attention, then with cuDNN attention (same process layout, same card), and
#    DPO 4 pairs x 2048 (reference run every step) with cuDNN attention: median step, tokens/s, MFU.
# Results: $OUT/*.json and *.md (one pair per benchmark run) and $OUT/log.
set -uo pipefail
STEPS=${1:-10}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
cd "$(dirname "$0")/.."
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  python3 -m pytest -q -p no:cacheprovider tests/test_attention_kernels.py
  bench() { timeout 200 python3 benchmarks/cpu_workload.py --systems jaxpost --model configs/models/llama3_2_1b.gin \
              --seq 2048 --dtype bfloat16 --cpus none --steps "$STEPS" --warmup 2 --out "$OUT" "$@"; }
  bench --task sft --batch 8 --attention cudnn
  bench --task dpo --batch 4 --attention cudnn
  bench --task sft --batch 8 --attention xla
  bench --task sft --batch 8 --attention cudnn --remat save_dots
} 2>&1 | tee "$OUT/log"
