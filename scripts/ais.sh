#!/usr/bin/env bash
# AIS beside L_5000 on 1,000 test images, and BDMC on 100 images simulated from the model, for
# MNIST models of results/table1-mnist (13 passes), into results/ais/RUN. One thread per
# process; wall and user CPU time of each step from /usr/bin/time.
#   bash scripts/ais.sh DATA_DIR [RUN ...]   (default: mnist-l1-iwae-k50-s0 mnist-l2-vae-k50-s0)
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/ais.sh DATA_DIR [RUN ...]   (DATA_DIR holds mnist/)" >&2
    exit 2
fi
DATA=$(cd "$1" && pwd)
shift
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=(mnist-l1-iwae-k50-s0 mnist-l2-vae-k50-s0)
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
lscpu | grep "Model name"
for run in "${RUNS[@]}"; do
    echo "== $run evaluate --method ais: $(date -u +%FT%TZ)"
    /usr/bin/time -f "wall %e s, user %U s" iwae evaluate results/table1-mnist/runs/$run --method ais \
        --ais-steps 400 --chains 4 --hmc-leapfrog 10 --n-test 1000 --data-dir "$DATA" \
        --out results/ais/$run --overwrite --quiet
    echo "== $run bdmc: $(date -u +%FT%TZ)"
    /usr/bin/time -f "wall %e s, user %U s" iwae bdmc results/table1-mnist/runs/$run --n 100 \
        --ais-steps 10,100,1000 --chains 4 --hmc-leapfrog 10 --out results/ais/$run --overwrite --quiet
done
echo "== done: $(date -u +%FT%TZ)"
