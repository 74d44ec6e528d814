#!/usr/bin/env bash
# The main job, offline, on this machine's CPU: SmolLM2-135M over Shakespeare ->
# one store at layer 10 -> a sweep of Gated and baseline SAEs (equal compute) -> eval -> plots.
#
#   scripts/demo.sh [OUT_DIR]          # default: demo/ ; about 30 minutes on 2 CPU cores
#
# Every stage is rerunnable: an interrupted harvest or sweep resumes where it stopped.
# Sizes are small so a laptop finishes; scale --tokens/--steps/--d-sae up on a GPU.
set -euo pipefail
OUT=${1:-demo}
HOOK=blocks.10.hook_resid_post
TOKENS=${TOKENS:-500000}
STEPS=${STEPS:-2000}
D_SAE=${D_SAE:-768}              # Gated width (1.33x d_model); baselines get 1.5x with --equal-compute
EVAL_TOKENS=${EVAL_TOKENS:-16384}

if [ ! -f "$OUT/store/zarr.json" ] || ! saeforge store info "$OUT/store" >/dev/null 2>&1; then
  saeforge harvest --model smollm2-135m --dataset shakespeare --hooks "$HOOK" \
    --context-size 128 --batch-size 16 --dtype bfloat16 --tokens "$TOKENS" --out "$OUT/store"
fi
saeforge store verify "$OUT/store"

SWEEP=(--store "$OUT/store" --hook "$HOOK" --out "$OUT/sweep" --steps "$STEPS" --batch-rows 1024
       --lr-warmup-steps 100 --l1-warmup-steps 100 --resample-every 250 --resample-rows 65536
       --autocast bf16 --checkpoint-every 250 --log-every 50
       --arch gated --arch baseline --d-sae "$D_SAE" --equal-compute
       --l1 1e-3 --l1 3e-3 --l1 1e-2 --l1-baseline 2e-6 --l1-baseline 6e-6 --l1-baseline 2e-5)
if [ -f "$OUT/sweep/sweep.json" ]; then saeforge sweep "${SWEEP[@]}" --resume; else saeforge sweep "${SWEEP[@]}"; fi

saeforge eval "$OUT"/sweep/*/ --tokens "$EVAL_TOKENS" --batch-size 16
saeforge plot "$OUT/sweep"
