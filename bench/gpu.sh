#!/usr/bin/env bash
# One prepared command for a lent GPU machine (the `device` tool; issues #11-#13): the CUDA
# tests, a speed table (eager and CUDA-graph steps), then Table 1 MNIST runs continued from
# their committed checkpoints for SECONDS, packed for the trip back (at most 8 files of 16 MiB).
#
#   here:   bash bench/gpu_prepare.sh ../shared/data
#   device: run(command='bash bench/gpu.sh "$OUT" 300', carry=[".gpu"], timeout_s=590)
#   then:   bash bench/gpu_unpack.sh FILES_AT      (puts the runs back into results/)
#
# IWAE_GPU_SMOKE=1 runs every step on the CPU with a tiny budget: a check of the script itself.
set -uo pipefail
OUT=${1:?usage: bench/gpu.sh OUT [TRAIN_SECONDS]}
TRAIN_S=${2:-300}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src" IWAE_DATA="$PWD/.gpu/data" OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
PY=${PYTHON:-python3}
if ! $PY -c "import platformdirs" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
SMOKE=${IWAE_GPU_SMOKE:-0}
DEVICE=cuda; N_TRAIN=20000; EPOCHS=2
if [ "$SMOKE" = 1 ]; then DEVICE=cpu; N_TRAIN=200; EPOCHS=1; fi
stamp() { echo "== $(date -u +%T) $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

stamp "tests: the cuda-marked ones, then the training and lockstep suites"
timeout 240 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cudagraph.py
timeout 240 $PY -m pytest -q -p no:cacheprovider -x tests/test_cudagraph.py tests/test_lockstep.py

stamp "speed: examples/s of one training pass, eager and CUDA-graph steps (1 layer, batch 20)"
for k in 1 5 50; do
    for graphs in off auto; do
        d="/tmp/speed-k$k-$graphs"
        $PY -m iwae.cli train --dataset mnist -k "$k" --epochs "$EPOCHS" --n-train "$N_TRAIN" --eval-every 1000 \
            --stage-nll-k 0 --device "$DEVICE" --cuda-graphs "$graphs" --out "$d" --overwrite --quiet >/dev/null \
            && $PY - "$d" "$k" "$graphs" <<'PYEOF'
import json, sys
d, k, graphs = sys.argv[1:]
s, m = json.load(open(f"{d}/summary.json")), [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
last = m[-1]  # the second pass: capture and warm-up are in the first
print(json.dumps({"k": int(k), "cuda_graphs": s["cuda_graphs"], "device": s["device"],
                  "examples_per_s": round(s["n_train"] / last["seconds"], 1), "pass_seconds": round(last["seconds"], 3)}))
PYEOF
    done
done | tee "$OUT/speed.jsonl"

stamp "Table 1 MNIST at --stages 5, continued from the committed checkpoints, for ${TRAIN_S}s"
if [ "$SMOKE" = 1 ]; then ONLY=(--only k=1); else ONLY=(); fi
timeout --signal=INT "$TRAIN_S" $PY -m iwae.cli reproduce table1 --stages 5 --only dataset=mnist "${ONLY[@]}" \
    --workers 1 --out results/table1-mnist-s5 --quiet
stamp "reproduce ended with $?"

stamp "pack"
# every run's files but TensorBoard logs, and checkpoints only of unfinished runs (no summary.json)
find results/table1-mnist-s5 -type f ! -path '*/tb/*' | while read -r f; do
    case "$f" in */checkpoint*.safetensors) [ -e "$(dirname "$f")/summary.json" ] && continue ;; esac
    echo "$f"
done > /tmp/runs.list
tar -czf /tmp/runs.tgz -T /tmp/runs.list
split -b 15m -d /tmp/runs.tgz "$OUT/runs.tgz.part"
ls -la "$OUT"
stamp "done"
