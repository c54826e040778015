#!/usr/bin/env bash
# Table 1 on MNIST and OMNIGLOT at --stages 5 (121 passes per run), into
# results/table1-mnist-s5 and results/table1-omniglot-s5: the cheapest runs first, the k=50
# runs last, two worker processes. Resumable: the same command continues every unfinished run
# from its checkpoint and skips finished ones.
#   bash scripts/sweep-s5.sh DATA_DIR
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/sweep-s5.sh DATA_DIR   (DATA_DIR holds mnist/ and omniglot/)" >&2
    exit 2
fi
D=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
R=(iwae reproduce table1 --stages 5 --workers 2 --data-dir "$D" --quiet --out results/table1-mnist-s5)
O=(iwae reproduce table1 --stages 5 --workers 2 --data-dir "$D" --quiet --out results/table1-omniglot-s5)
"${R[@]}" --only dataset=mnist --only k=1 --only objective=iwae
# VAE k=1 is IWAE k=1 (L_1 both, bit for bit): copied, not trained again
"${R[@]}" --only dataset=mnist --only k=1 --only objective=vae --reuse results/table1-mnist-s5
"${R[@]}" --only dataset=mnist --only k=5
"${O[@]}" --only dataset=omniglot --only k=1 --only objective=iwae
"${O[@]}" --only dataset=omniglot --only k=1 --only objective=vae --reuse results/table1-omniglot-s5
"${O[@]}" --only dataset=omniglot --only k=5
"${O[@]}" --only dataset=omniglot --only k=50
"${R[@]}" --only dataset=mnist --only k=50
