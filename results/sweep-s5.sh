#!/usr/bin/env bash
# Issue 12: Table 1 on MNIST and OMNIGLOT at --stages 5 (121 passes per run), cheapest runs
# first, the k=50 runs last, on the two cores (two worker processes of one thread each). Resumable: run it again, here or on
# another machine, and every run continues from its checkpoint (committed for unfinished runs).
#   bash results/sweep-s5.sh ../shared/data
set -euo pipefail
D=${1:-../shared/data}
cd "$(dirname "$0")/.."
R=(python -m iwae.cli reproduce table1 --stages 5 --workers 2 --data-dir "$D" --quiet --out results/table1-mnist-s5)
O=(python -m iwae.cli reproduce table1 --stages 5 --workers 2 --data-dir "$D" --quiet --out results/table1-omniglot-s5)
"${R[@]}" --only dataset=mnist --only k=1 --only objective=iwae
# VAE k=1 is IWAE k=1 (L_1 both, bit for bit): copied, not trained again
"${R[@]}" --only dataset=mnist --only k=1 --only objective=vae --reuse results/table1-mnist-s5
"${R[@]}" --only dataset=mnist --only k=5
"${O[@]}" --only dataset=omniglot --only k=1 --only objective=iwae
"${O[@]}" --only dataset=omniglot --only k=1 --only objective=vae --reuse results/table1-omniglot-s5
"${O[@]}" --only dataset=omniglot --only k=5
"${O[@]}" --only dataset=omniglot --only k=50
"${R[@]}" --only dataset=mnist --only k=50
