#!/usr/bin/env bash
# Put back into results/ the runs that bench/gpu.sh packed on the GPU machine.
#   bash bench/gpu_unpack.sh FILES_AT
set -euo pipefail
FROM=${1:?usage: bench/gpu_unpack.sh FILES_AT}
cd "$(dirname "$0")/.."
cat "$FROM"/runs.tgz.part* | tar -xzvf - | sed 's/^/unpacked: /'
git status --short results/ | head -60
