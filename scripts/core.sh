#!/usr/bin/env bash
# The core runs of results/core/: IWAE k=5 for the first 3 stages of the schedule (13 passes)
# on MNIST (1 and 2 layers) and OMNIGLOT (1 layer), then `iwae evaluate` with k=5,000 on the
# whole test set; wall times of both from /usr/bin/time. One thread per process. A run that
# has its evaluation.json is skipped.
#   bash scripts/core.sh DATA_DIR
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/core.sh DATA_DIR   (DATA_DIR holds mnist/ and omniglot/)" >&2
    exit 2
fi
data=$(cd "$1" && pwd)
cd "$(dirname "$0")/../results/core"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() {
  name=$1; shift
  if [ -f "$name/evaluation.json" ]; then echo "skip $name (done)"; return; fi
  rm -rf "$name"
  /usr/bin/time -f "$name train wall %e s" iwae train "$@" --data-dir "$data" --out "$name" --quiet
  /usr/bin/time -f "$name evaluate wall %e s" iwae evaluate "$name" --k 5000 --quiet
}
run mnist-l1-iwae-k5 --dataset mnist --layers 1 --objective iwae -k 5 --stages 3
run mnist-l2-iwae-k5 --dataset mnist --layers 2 --objective iwae -k 5 --stages 3
run omniglot-l1-iwae-k5 --dataset omniglot --layers 1 --objective iwae -k 5 --stages 3
