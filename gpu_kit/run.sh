#!/usr/bin/env bash
# The GPU kit's acceptance run on a node with its own PyTorch and no network (see the README's
# "A GPU node without network"):
#   PYTHON=python3 ./run.sh [--cpu-smoke] OUTDIR
# Installs the kit into a temporary directory with pip --no-index (the node's packages stay as
# they are), then runs the stages below, each in its own time box. Each stage writes
# OUTDIR/NAME.log and OUTDIR/NAME.json as soon as it ends, so a stage cut off at its limit
# leaves the earlier stages' results. The last line printed is one JSON object with every
# stage's figures (also OUTDIR/result.json). Writes nothing outside /tmp and OUTDIR.
# Without CUDA it refuses in one line; --cpu-smoke runs every stage at toy sizes on the CPU.
set -uo pipefail

KIT=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
# A path (not a command name) is made absolute: the stages run from the unpacked project.
case $PYTHON in */*) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") || exit 2 ;; esac
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && { SMOKE=1; shift; }
[ $# = 1 ] || { echo "usage: [PYTHON=python3] $0 [--cpu-smoke] OUTDIR" >&2; exit 2; }
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || exit 2

# Stage budgets (seconds): 470 in all, inside 8 minutes on one H200 with the kit's unpacking.
# bench gpu stops starting sub-stages BENCH_LIMIT seconds in; the sweep is 3 trials x 3 epochs.
B_INSTALL=45 B_GPU=100 B_SYNTH=75 B_PREPARE=60 B_SWEEP=180 B_PROJECT=10 BENCH_LIMIT=80
if [ $SMOKE = 1 ]; then  # a 2-core CPU: every stage at toy sizes, roomier limits
    B_INSTALL=120 B_GPU=240 B_SYNTH=120 B_PREPARE=240 B_SWEEP=480 B_PROJECT=60 BENCH_LIMIT=150
fi

# Everything the run writes goes here or to OUTDIR: caches, Ray's session, HOME-relative files.
WORK=$(mktemp -d /tmp/raysweep-kit.XXXXXX) || exit 2
# The install, the data (8 GB decoded at full size) and Ray's results go when the run ends;
# KEEP_WORK=1 keeps them for a look.
[ "${KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
export HOME=$WORK/home XDG_CACHE_HOME=$WORK/home/.cache MPLCONFIGDIR=$WORK/home/mpl HF_HOME=$WORK/home/hf \
    PYTHONPYCACHEPREFIX=$WORK/pycache TMPDIR=$WORK/tmp RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_CONFIG_FILE=/dev/null
mkdir -p "$HOME" "$TMPDIR" "$MPLCONFIGDIR"
SRC=$WORK/src/raysweep SITE=$WORK/site
mkdir -p "$WORK/src" "$SITE"
tar -xzf "$KIT/raysweep-src.tar.gz" -C "$WORK/src" || exit 2
export PYTHONPATH=$SRC:$SITE
ACCEPT=("$PYTHON" "$SRC/gpu_kit/accept.py")
cd "$SRC" || exit 2

if [ $SMOKE = 0 ]; then
    "${ACCEPT[@]}" cuda-check || exit 2
fi
cp "$KIT/MANIFEST.json" "$OUT/kit.json"

# stage NAME BUDGET: the function stage_NAME under `timeout`, its output in OUTDIR/NAME.log,
# then OUTDIR/NAME.json (how it ended, and the last JSON line it printed).
stage() {
    local name=$1 budget=$2 t0 rc
    echo "== $name (budget ${budget} s)"
    t0=$(date +%s%N)
    timeout --kill-after=10 "$budget" bash -c "stage_$name" >"$OUT/$name.log" 2>&1
    rc=$?
    "${ACCEPT[@]}" record "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))e-3" "$budget" "$OUT/$name.log" "$OUT"
    echo "   $name: rc $rc, $(tail -n 1 "$OUT/$name.log" | cut -c1-200)"
    return $rc
}

stage_install() {
    set -e
    "$PYTHON" -m pip install --no-index --no-deps --no-compile --quiet --target "$SITE" "$KIT"/wheels/*.whl
    "$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
        "$KIT"/ray-*-slim.tar.xz "$SITE"
    # The node's own packages must meet pyproject.toml's ranges: pip check over the node's and
    # the kit's packages; what concerns raysweep or a kit package fails the stage.
    "$PYTHON" -m pip check >"$WORK/pip-check.txt" 2>&1 || true
    "$PYTHON" "$SRC/gpu_kit/accept.py" installed "$WORK/pip-check.txt" "$SITE"
}

stage_gpu() {
    set -e
    "$PYTHON" "$SRC/gpu_kit/accept.py" preflight
    if [ "$SMOKE" = 1 ]; then
        "$PYTHON" -m raysweep.bench gpu --cpu-smoke --no-sweep --limit-s "$BENCH_LIMIT"
    else
        "$PYTHON" -m raysweep.bench gpu --no-sweep --limit-s "$BENCH_LIMIT"
    fi
}

stage_synth() {
    if [ "$SMOKE" = 1 ]; then
        "$PYTHON" "$SRC/gpu_kit/accept.py" synth "$WORK/data" --classes 10 --per-class 32 8 8 --workers 2 --shard-rows 64
    else
        "$PYTHON" "$SRC/gpu_kit/accept.py" synth "$WORK/data" --classes 100 --per-class 500 100 50
    fi
}

stage_prepare() {
    set -e
    "$PYTHON" -m raysweep.prepare --config configs/gpu-accept.yaml --data "$WORK/data" \
        --set "data.cache_dir=$WORK/cache" $SMOKE_SIZE --quiet
    "$PYTHON" "$SRC/gpu_kit/accept.py" prepared "$OUT/prepare.log"
}

stage_sweep() {
    set -e
    # shellcheck disable=SC2086  # the smoke's --set words
    "$PYTHON" -m raysweep.tune --config configs/gpu-accept.yaml --data "$WORK/data" --set "data.cache_dir=$WORK/cache" \
        $SMOKE_SIZE $SMOKE_TRAIN --gpus-per-trial "$GPUS_PER_TRIAL" --storage-path "$WORK/results" --name accept --quiet
    "$PYTHON" "$SRC/gpu_kit/accept.py" sweep "$WORK/results/accept"
}

stage_project() {
    "$PYTHON" "$SRC/gpu_kit/accept.py" project "$OUT"
}

SMOKE_SIZE="" SMOKE_TRAIN="" GPUS_PER_TRIAL=auto
if [ $SMOKE = 1 ]; then
    SMOKE_SIZE="--set data.image_size=64"
    SMOKE_TRAIN="--set model.width=0.125 --set train.batch_size=16 --set train.eval_batch_size=64 --epochs 2"
    GPUS_PER_TRIAL=0
fi
export KIT PYTHON SMOKE OUT WORK SRC SITE BENCH_LIMIT SMOKE_SIZE SMOKE_TRAIN GPUS_PER_TRIAL
export -f stage_install stage_gpu stage_synth stage_prepare stage_sweep stage_project

stage install "$B_INSTALL" || { "${ACCEPT[@]}" final "$OUT"; exit 1; }
stage gpu "$B_GPU"
stage synth "$B_SYNTH" && stage prepare "$B_PREPARE" && stage sweep "$B_SWEEP" && stage project "$B_PROJECT"
"${ACCEPT[@]}" final "$OUT"  # exits 1 unless every stage ended ok
