#!/usr/bin/env bash
# The runs of results/precision/: is bf16 training as good as fp32? (issue #28, item 2)
# 1-layer IWAE k=50 on MNIST for the first 3 stages of Burda et al.'s schedule (13 passes),
# with --precision fp32 and with --precision bf16, seeds 0, 1 and 2 (no stage-end test
# NLL), each then evaluated with `iwae evaluate --k 5000` on the whole test set. One thread
# per process. A run with its evaluation.json is skipped; an interrupted one continues from
# its checkpoint. Then `python bench/precision_quality.py results/precision` compares them.
# PRECISIONS="fp32" or "bf16" runs one precision only (two processes, one a precision each).
#   [PRECISIONS="fp32 bf16"] bash scripts/precision.sh DATA_DIR [SEED ...]
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/precision.sh DATA_DIR [SEED ...]   (DATA_DIR holds mnist/)" >&2
    exit 2
fi
data=$(cd "$1" && pwd)
seeds=("${@:2}")
[ ${#seeds[@]} -gt 0 ] || seeds=(0 1 2)
mkdir -p "$(dirname "$0")/../results/precision"
cd "$(dirname "$0")/../results/precision"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for seed in "${seeds[@]}"; do
    for precision in ${PRECISIONS:-fp32 bf16}; do
        name=mnist-l1-iwae-k50-$precision-s$seed
        if [ -f "$name/evaluation.json" ]; then echo "skip $name (done)"; continue; fi
        if [ -f "$name/checkpoint.safetensors" ]; then
            iwae train --resume "$name" --data-dir "$data" --quiet
        else
            iwae train --dataset mnist --layers 1 --objective iwae -k 50 --stages 3 \
                --precision "$precision" --seed "$seed" --stage-nll-k 0 --data-dir "$data" \
                --out "$name" --overwrite --quiet
        fi
        iwae evaluate "$name" --k 5000 --data-dir "$data" --quiet
    done
done
