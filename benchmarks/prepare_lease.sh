#!/usr/bin/env bash
# Prepares the folder that the lease command's `run` call carries: .lease/data with MNIST and
# Fashion-MNIST (the IDX .gz files, 42 MB), plus .lease/resume (checkpoints of unfinished runs
# that `python -m experiments.import_lease` put there). git-ignored (.gitignore: /.lease/).
#
#   bash benchmarks/prepare_lease.sh [MNIST_DIR] [FASHION_MNIST_DIR]
set -euo pipefail
MNIST=${1:-/work/shared/data/mnist}
FMNIST=${2:-/usr/share/datasets/fashion-mnist}
cd "$(dirname "$0")/.."
mkdir -p .lease/data/mnist .lease/data/fashion-mnist .lease/resume
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    for src in "$MNIST/$f.gz" "$FMNIST/$f.gz"; do
        # regular files of at most 32 MiB only (the largest, train images, is 26 MB): cp would
        # wait forever on a named pipe and copy a device without end
        [ -f "$src" ] && [ ! -p "$src" ] && [ "$(stat -Lc %s "$src")" -le $((32 << 20)) ] \
            || { echo "error: $src: missing, not a regular file, or larger than 32 MiB" >&2; exit 2; }
    done
    cp "$MNIST/$f.gz" .lease/data/mnist/
    cp "$FMNIST/$f.gz" .lease/data/fashion-mnist/
done
git check-ignore -q .lease || { echo "error: .lease is not git-ignored (add /.lease/ to .gitignore)" >&2; exit 1; }
du -sh .lease | awk '{print "carried folder .lease: " $1 " (the run call carries at most 64 MiB)"}'
