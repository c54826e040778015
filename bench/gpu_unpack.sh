#!/usr/bin/env bash
# Put back into results/ the runs that bench/gpu.sh packed on the GPU machine.
#   bash bench/gpu_unpack.sh FILES_AT
set -euo pipefail
FROM=${1:?usage: bench/gpu_unpack.sh FILES_AT}
cd "$(dirname "$0")/.."
cat "$FROM"/runs.tgz.part* | tar -xzvf - | sed 's/^/unpacked: /'
git status --short results/table1-mnist-s5 results/table1-omniglot-s5 results/two-stage-s5 results/dreg-s5 \
    results/variants-s4 | head -60
