#!/usr/bin/env bash
# GPU checks, run on a lent GPU machine that has torch + transformers but no network, zarr or transformer-lens:
# wheels for Python 3.12 travel in .whl/ (see README, "GPU"). Writes its logs under $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PA=$(python3 -c "import pyarrow; print(pyarrow.__version__.split('.')[0])" 2>/dev/null || echo 0)
W=".whl/*.whl"; [ "$PA" -lt 24 ] && W=$(ls .whl/*.whl | grep -v -E '/(datasets|dill|multiprocess)-'; ls .whl/alt/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $W || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/saeforge . || exit 1
export PYTHONPATH=/tmp/saeforge:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, zarr, transformer_lens, saeforge.pipeline.lm as l; print(torch.__version__, transformers.__version__, zarr.__version__)" || exit 1
# Harvest: the CPU benchmark's shape (ctx 128, batch 8; README, Harvest table) and a GPU-sized one, on a 1B-parameter Llama built from a config.
timeout 150 python3 scripts/bench_harvest.py --device cuda --model-config llama-1b --dataset synthetic \
  --layer 10 --context-size 128 --batch-size 8 --batches 60 --repeats 2 2>&1 | tee "$OUT/harvest_ctx128_b8.txt"
timeout 110 python3 scripts/bench_harvest.py --device cuda --model-config llama-1b --dataset synthetic \
  --layer 10 --context-size 1024 --batch-size 32 --batches 10 --repeats 1 --no-full --no-bf16 2>&1 | tee "$OUT/harvest_ctx1024_b32.txt"
