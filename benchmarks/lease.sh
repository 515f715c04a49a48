#!/usr/bin/env bash
# The lease command: one call on a lent GPU machine (about 9 minutes), see benchmarks/lease.py
# and benchmarks/README.md ("The lease command") for the exact `run` call and its carry list.
#
#   bash benchmarks/lease.sh OUT [--dry-run] [--budget MINUTES] [...]
#
# Writes into OUT (at most 8 files): lease.log, lease.json, speed.json, lease.tgz.NN.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: bash benchmarks/lease.sh OUT [--dry-run] [options of benchmarks/lease.py]" >&2; exit 2; }
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || { echo "error: cannot create the output folder $1" >&2; exit 2; }
shift
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null \
        || echo "no nvidia-smi (no NVIDIA GPU here)"
    python -m benchmarks.lease --out "$OUT" "$@"
} 2>&1 | tee "$OUT/lease.log"
exit "${PIPESTATUS[0]}"
