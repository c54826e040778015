#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what bench/gpu.sh needs on a lent GPU machine that cannot
# reach the internet: the MNIST files and the wheels of the dependencies missing from its
# image (platformdirs; tensorboardX is optional). Writes .gpu/ (ignored by git), which the
# device tool's run then carries:  carry: [".gpu"].
#   bash bench/gpu_prepare.sh ../shared/data
set -euo pipefail
DATA=${1:-../shared/data}
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/data/mnist .gpu/whl
mkdir -p .gpu/data/omniglot
cp "$DATA"/mnist/*-ubyte* .gpu/data/mnist/
cp "$DATA"/omniglot/images_*.npz "$DATA"/omniglot/characters.csv "$DATA"/omniglot/omniglot28_split*.npz .gpu/data/omniglot/
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl "platformdirs>=3"
du -sh .gpu
