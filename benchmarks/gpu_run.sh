#!/usr/bin/env bash
# One accelerator session: kernel parity tests, attention alone, SFT/DPO MFU sweeps of a 1B Llama, a kernel profile.
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh [steps]
#
# 1. tests/test_attention_kernels.py (GPU cases): cuDNN (sequence-length and segment-mask branches) against an fp32
#    reference next to XLA's bf16 error, and a check that the compiled step calls cuDNN.
# 2. attention_bench.py: attention forward + backward per path at the 1B model's shape.
# 3. mfu_sweep.py: SFT 8 x 2048 (bf16, cuDNN) with the LM head's logits kept / recomputed; gpu_profile.py
#    (kernel time by kind); DPO 4 pairs x 2048 (reference every step); SFT under XLA_FLAGS=$ALT_XLA_FLAGS;
#    SFT 16 x 2048. SKIP_CHECKS=1 skips steps 1-2 (a second call on a warm machine).
# Results: $OUT/*.json and $OUT/log.
set -uo pipefail
STEPS=${1:-10}
OUT=${OUT:-benchmarks/results}
ALT_XLA_FLAGS=${ALT_XLA_FLAGS:---xla_gpu_enable_triton_gemm=false}
MODEL=configs/models/llama3_2_1b.gin
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
cd "$(dirname "$0")/.."
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  [ -n "${SKIP_CHECKS:-}" ] || timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_attention_kernels.py -k "cudnn or branches or segment or auto"
  [ -n "${SKIP_CHECKS:-}" ] || timeout 90 python3 benchmarks/attention_bench.py --batch 8 --seq 2048 --heads 32 --kv-heads 8 --head-dim 64
  sweep=(python3 benchmarks/mfu_sweep.py --model $MODEL --seq 2048 --steps "$STEPS")
  # Most important first: a 1B variant costs about 70 s (model creation, init, compile), so a 10-minute device
  # call fits about seven; whatever a time limit cuts is at the end.
  timeout 170 "${sweep[@]}" --task sft --out "$OUT/sweep_sft.json" --variant batch=8,stored_logits_mib=20000 \
    --variant batch=8
  timeout 100 python3 benchmarks/gpu_profile.py --model $MODEL --task sft --batch 8 --seq 2048 --stored-logits-mib 20000
  timeout 100 "${sweep[@]}" --task dpo --out "$OUT/sweep_dpo.json" --variant batch=4,stored_logits_mib=20000
  XLA_FLAGS="$ALT_XLA_FLAGS" timeout 100 "${sweep[@]}" --task sft --out "$OUT/sweep_sft_flags.json" \
    --variant batch=8,stored_logits_mib=20000
  timeout 100 "${sweep[@]}" --task sft --out "$OUT/sweep_sft_b16.json" --variant batch=16,stored_logits_mib=40000
} 2>&1 | tee "$OUT/log"
