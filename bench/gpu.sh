#!/usr/bin/env bash
# The main command on a lent GPU machine (the `device` tool): the CUDA tests, the training
# rates of one run and of lockstep groups (bench/gpu_probe.py), then what issue 12 still needs,
# continued from the committed checkpoints, side by side: Table 1 at --stages 5 (MNIST and
# OMNIGLOT), two-stage and DReG (1 layer) at --stages 5, the variants at --stages 4 (2 seeds),
# stopped cleanly by --time-limit, and packed IN THIS SAME CALL: before
# each call the device tool makes its copy of the working tree match this checkout again,
# deleting files that git here does not know (a first try, 2026-11-26, lost all run files but
# the checkpoints that way: results/README.md).
#
#   here:   bash bench/gpu_prepare.sh ../shared/data
#   device: run(command='bash bench/gpu.sh "$OUT" 7', carry=[".gpu"], timeout_s=600)
#   then:   bash bench/gpu_unpack.sh FILES_AT      (puts the runs back into results/)
#
# At most 64 MiB come back from one call (8 files of 16 MiB), and 16 variants checkpoints alone
# are 82 MB: the pack goes out in 15 MiB parts, four per call. When more remain the log says
# so; call at once, before the machine goes back (30 s idle), `bash bench/gpu.sh --rest "$OUT"`
# for the next four, and unpack all the calls' folders together:
#   bash bench/gpu_unpack.sh FILES_AT FILES_AT_OF_THE_REST ...
# (2026-11-27: a 118 MiB pack came back as its first four parts; the rest was saved this way.)
#
# MINUTES (default 7) is the training time limit; tests and probes take about 1.5 minutes
# before it, evaluation and packing well under a minute after it (on an H100).
# IWAE_GPU_SMOKE=1 runs every step on the CPU with a tiny budget: a check of the script itself.
# IWAE_GPU_EXPERIMENTS picks what trains (default: all five), e.g. "table1-mnist dreg variants"
# when the CPU here continues the others meanwhile (the same run must not train in two places).
# IWAE_GPU_VARIANTS_METHODS="IWAE;VAE;..." trains those variants only (--only method=..., ';'
# between methods), the others being trained elsewhere. IWAE_GPU_CHECKS=0 skips the CUDA tests
# and the rate probes (1.5 minutes) when an earlier call ran them on the same code.
# Checkpoints too large to travel (64 MiB a call) go packed in .gpu/ckpt (bench/gpu_ckpt.py);
# they are unpacked into results/ before training. IWAE_GPU_HARD_STOP_S=N ends the training
# and evaluation commands N seconds after they start (timeout), so that packing still happens
# inside the call's limit when evaluation runs longer than planned.
set -uo pipefail
PARTS=/tmp/runs.parts
send_parts() {  # copy the next four unsent parts of the pack into $1; say what is left
    local n=0 f
    for f in "$PARTS"/runs.tgz.part*; do
        [ -e "$f" ] || continue
        if [ $n -lt 4 ]; then mv "$f" "$1/"; n=$((n + 1)); fi
    done
    local left
    left=$(ls "$PARTS" | wc -l)
    if [ "$left" -gt 0 ]; then
        echo "PACK INCOMPLETE: $left more part(s) of 15 MiB wait on the machine; call at once: bash bench/gpu.sh --rest \"\$OUT\""
    else
        echo "pack complete"
    fi
}
if [ "${1:-}" = "--rest" ]; then
    OUT=${2:?usage: bench/gpu.sh --rest OUT}
    mkdir -p "$OUT"
    send_parts "$OUT"
    ls -la "$OUT"
    exit 0
fi
OUT=${1:?usage: bench/gpu.sh OUT [MINUTES]   or   bench/gpu.sh --rest OUT}
MINUTES=${2:-7}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src" OMP_NUM_THREADS=2
DATA="$PWD/.gpu/data"
PY=${PYTHON:-python3}
if ! $PY -c "import platformdirs" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
SMOKE=${IWAE_GPU_SMOKE:-0}
DEVICE=cuda; N=4000; ONLY=(); ONLY2=(); ONLYD=(); ONLYV=(); WORKERS=4
if [ "$SMOKE" = 1 ]; then  # the cheapest run of each experiment, for a few seconds
    DEVICE=cpu; N=200; ONLY=(--only k=1 --only layers=1); ONLY2=(--only experiment=1 --only stage=first); ONLYD=(--only k=5)
    ONLYV=(--only method=VAE --only seed=0); WORKERS=1; MINUTES=0.3
fi
if [ -n "${IWAE_GPU_VARIANTS_METHODS:-}" ]; then
    IFS=';' read -ra methods <<< "$IWAE_GPU_VARIANTS_METHODS"
    for m in "${methods[@]}"; do ONLYV+=(--only "method=$m"); done
fi
RESULTS="results/table1-mnist-s5 results/table1-omniglot-s5 results/two-stage-s5 results/dreg-s5 results/variants-s4"
EXPERIMENTS=${IWAE_GPU_EXPERIMENTS:-table1-mnist table1-omniglot two-stage dreg variants}
for e in $EXPERIMENTS; do
    case "$e" in table1-mnist|table1-omniglot|two-stage|dreg|variants) ;; *) echo "unknown experiment: $e" >&2; exit 2 ;; esac
done
wanted() { case " $EXPERIMENTS " in *" $1 "*) return 0 ;; esac; return 1; }
stamp() { echo "== $(date -u +%T) $*"; }
touch /tmp/gpu-start

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [ -e .gpu/ckpt/manifest.tsv ]; then
    stamp "checkpoints: unpacked from .gpu/ckpt"
    $PY bench/gpu_ckpt.py unpack .gpu/ckpt | tail -1 || exit 1
fi
if [ "${IWAE_GPU_CHECKS:-1}" != 0 ]; then
stamp "tests: the cuda-marked ones (a capture that falls back to eager steps fails them)"
timeout 200 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cudagraph.py

stamp "rates: group steps per second, one run and lockstep pairs, CUDA graphs on and off"
for args in "--layers 1 --k 50 --group 1" "--layers 1 --k 50 --group 2" "--layers 1 --k 50 --group 2 --cuda-graphs off" \
            "--layers 2 --k 50 --group 2" "--layers 2 --k 5 --group 2"; do
    IWAE_DATA="$DATA" timeout 60 $PY bench/gpu_probe.py $args --n-train "$N" --device "$DEVICE" 2>>"$OUT/probe.err"
done | tee "$OUT/probe.jsonl"
fi

stamp "issue 12 for ${MINUTES} minutes, side by side: $EXPERIMENTS"
# Every command continues its runs from the committed checkpoints and skips finished ones;
# --reuse copies the finished Table 1 runs that two-stage and DReG share with it.
S5=(--stages 5 --data-dir "$DATA" --time-limit "$MINUTES" --quiet)
HARD=(); [ -n "${IWAE_GPU_HARD_STOP_S:-}" ] && HARD=(timeout "$IWAE_GPU_HARD_STOP_S")
pids=()
for ds in mnist omniglot; do
    wanted table1-$ds || continue
    "${HARD[@]}" $PY -m iwae.cli reproduce table1 "${S5[@]}" --only dataset=$ds "${ONLY[@]}" --workers "$WORKERS" \
        --out "results/table1-$ds-s5" &
    pids+=($!)
done
if wanted two-stage; then
    "${HARD[@]}" $PY -m iwae.cli reproduce two-stage "${S5[@]}" "${ONLY2[@]}" --workers 2 --reuse results/table1-mnist-s5 \
        --out results/two-stage-s5 &
    pids+=($!)
fi
if wanted dreg; then
    "${HARD[@]}" $PY -m iwae.cli reproduce dreg "${S5[@]}" --only layers=1 "${ONLYD[@]}" --workers 2 --reuse results/table1-mnist-s5 \
        --out results/dreg-s5 &
    pids+=($!)
fi
if wanted variants; then
    "${HARD[@]}" $PY -m iwae.cli reproduce variants --stages 4 --data-dir "$DATA" --time-limit "$MINUTES" --quiet "${ONLYV[@]}" \
        --workers 2 --out results/variants-s4 &
    pids+=($!)
fi
wait "${pids[@]}"  # these only: a bare `wait` also waits for the log's tee, which never ends
stamp "training ended"

stamp "pack: the files written in this call but TensorBoard logs and, for runs not finished, the stage-end weights (their checkpoint holds them); checkpoints of finished runs left out"
find $RESULTS -type f -cnewer /tmp/gpu-start ! -path '*/tb/*' 2>/dev/null |
while read -r f; do
    finished=0; [ -e "$(dirname "$f")/summary.json" ] && finished=1
    case "$f" in
        */checkpoint*.safetensors) [ $finished = 1 ] && continue ;;
        */model.safetensors) [ $finished = 0 ] && continue ;;
    esac
    echo "$f"
done > /tmp/runs.list
cp /tmp/runs.list "$OUT/runs.list"
tar -czf /tmp/runs.tgz -T /tmp/runs.list
echo "pack: $(wc -l < /tmp/runs.list) files, $(du -m /tmp/runs.tgz | cut -f1) MiB"
rm -rf "$PARTS" && mkdir -p "$PARTS"
split -b 15m -d -a 3 /tmp/runs.tgz "$PARTS/runs.tgz.part"
send_parts "$OUT"
ls -la "$OUT"
stamp "done"
