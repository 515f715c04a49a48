#!/usr/bin/env bash
# What one lent GPU session runs (about 10 minutes of device time): the benchmark table,
# then as much of paper 000's Table 2 as the budget allows (resumable: the same command
# on a later session continues from runs/ when that folder travels back).
#
#   bash benchmarks/gpu_run.sh OUT_DIR [GRID_BUDGET_MINUTES]
#
# Needs the datasets' IDX files in .data/mnist and .data/fashion-mnist (git-ignored).
set -uo pipefail
OUT=${1:?output folder}
BUDGET=${2:-5}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
timeout 200 python -m benchmarks.run --min-time 1 --out "$OUT" 2>&1 | tee "$OUT/bench.log"
timeout $(( BUDGET * 60 + 90 )) python -m experiments.reproduce table2 --seeds 5 --budget "$BUDGET" \
    --data-dir .data --out runs/reproduce-table2 --no-progress 2>&1 | tee "$OUT/grid.log"
tar czf "$OUT/runs.tgz" --exclude='*.msgpack' runs
