#!/usr/bin/env bash
# The core issue's acceptance runs: IWAE k=5, 3 stages (13 passes), then L_5000 evaluation.
# Usage: bash results/core/run.sh [DATA_DIR]   (default ../shared/data). One thread per process.
set -euo pipefail
cd "$(dirname "$0")"
data=${1:-../../../shared/data}
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
