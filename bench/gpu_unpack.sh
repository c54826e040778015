#!/usr/bin/env bash
# Put back into results/ the runs that bench/gpu.sh packed on the GPU machine.
#   bash bench/gpu_unpack.sh FILES_AT [FILES_AT_OF_A_--rest_CALL ...]
# The parts are numbered across calls; all of them must be there, or tar stops at the gap.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bench/gpu_unpack.sh FILES_AT [FILES_AT ...]" >&2; exit 2; }
parts=()
for d in "$@"; do parts+=("$(cd "$d" && pwd)"/runs.tgz.part*); done
cd "$(dirname "$0")/.."
# in the order of the part numbers, whichever call brought each
mapfile -t parts < <(for p in "${parts[@]}"; do [ -e "$p" ] && echo "$(basename "$p") $p"; done | sort | cut -d' ' -f2-)
[ ${#parts[@]} -ge 1 ] || { echo "no runs.tgz.part* files in: $*" >&2; exit 1; }
echo "${#parts[@]} part(s): $(for p in "${parts[@]}"; do basename "$p"; done | tr '\n' ' ')"
cat "${parts[@]}" | tar -xzvf - | sed 's/^/unpacked: /'
git status --short results/ | head -60
