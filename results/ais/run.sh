#!/usr/bin/env bash
# AIS beside L_5000 on 1,000 test images, and BDMC on 100 simulated images, for the best
# 1- and 2-layer MNIST models of results/table1-mnist (13 passes). Run from the repository
# root: bash results/ais/run.sh ../shared/data [RUN ...]   (default: both runs, one after
# the other; the committed results ran the two in parallel, logs results/ais/run-RUN.log)
set -euo pipefail
DATA=${1:-../shared/data}
shift || true
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(mnist-l1-iwae-k50-s0 mnist-l2-vae-k50-s0)
export OMP_NUM_THREADS=1
IWAE=${IWAE:-iwae}
lscpu | grep "Model name"
for run in "${RUNS[@]}"; do
    echo "== $run evaluate --method ais: $(date -u +%FT%TZ)"
    /usr/bin/time -f "wall %e s, user %U s" $IWAE evaluate results/table1-mnist/runs/$run --method ais \
        --ais-steps 400 --chains 4 --hmc-leapfrog 10 --n-test 1000 --data-dir "$DATA" --out results/ais/$run --overwrite --quiet
    echo "== $run bdmc: $(date -u +%FT%TZ)"
    /usr/bin/time -f "wall %e s, user %U s" $IWAE bdmc results/table1-mnist/runs/$run --n 100 \
        --ais-steps 10,100,1000 --chains 4 --hmc-leapfrog 10 --out results/ais/$run --overwrite --quiet
done
echo "== done: $(date -u +%FT%TZ)"
