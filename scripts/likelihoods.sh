#!/usr/bin/env bash
# The runs of results/likelihoods/: MNIST beyond binarized pixels, at one small budget
# (the first 3 stages of Burda et al.'s schedule, 13 passes, k=5, IWAE, seed 0):
#   mnist8-mlp   MNIST's 256 levels, logistic-256 likelihood, Burda et al.'s 1-layer MLP
#   mnist8-conv  the same data and likelihood, the convolutional model (channels 32,64)
#   mnistgrey-cb MNIST's grey values in [0, 1], continuous-Bernoulli likelihood, 1-layer MLP
# (no stage-end test NLL), then `iwae evaluate` with k=5,000 on one seeded random subset of
# N test images (the same images for every run; default 500) and a grid of 100 samples.
# Wall times from /usr/bin/time. One thread per process. A run with its evaluation.json and
# samples.png is skipped; an interrupted one continues from its checkpoint. RUN names pick
# some of the runs (e.g. the conv run in one process, the others in another).
#   bash scripts/likelihoods.sh DATA_DIR [N_TEST [RUN ...]]
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/likelihoods.sh DATA_DIR [N_TEST [RUN ...]]   (DATA_DIR holds mnist/)" >&2
    exit 2
fi
data=$(cd "$1" && pwd)
n_test=${2:-500}
picked=("${@:3}")
mkdir -p "$(dirname "$0")/../results/likelihoods"
cd "$(dirname "$0")/../results/likelihoods"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() {
    name=$1; shift
    if [ ${#picked[@]} -gt 0 ] && [[ ! " ${picked[*]} " =~ " $name " ]]; then return; fi
    if [ -f "$name/evaluation.json" ] && [ -f "$name/samples.png" ]; then
        echo "skip $name (done)"; return
    fi
    if [ -f "$name/checkpoint.safetensors" ]; then
        /usr/bin/time -f "$name train wall %e s" iwae train --resume "$name" --data-dir "$data" --quiet
    elif [ ! -f "$name/model.safetensors" ]; then
        /usr/bin/time -f "$name train wall %e s" iwae train "$@" --dataset mnist --objective iwae \
            -k 5 --stages 3 --stage-nll-k 0 --seed 0 --data-dir "$data" --out "$name" \
            --overwrite --quiet
    fi
    /usr/bin/time -f "$name evaluate wall %e s" iwae evaluate "$name" --k 5000 \
        --n-test "$n_test" --data-dir "$data" --quiet
    iwae sample "$name" --out "$name/samples.png" --n 100 --seed 0
}
run mnist8-mlp --likelihood logistic-256 --arch mlp --layers 1
run mnist8-conv --likelihood logistic-256 --arch conv --channels 32,64
run mnistgrey-cb --likelihood continuous-bernoulli --arch mlp --layers 1
