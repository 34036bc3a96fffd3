#!/usr/bin/env bash
# GPU check of vllm_early_exit: correctness (exits off / forced / threshold / per-request off /
# compiled, against plain vLLM and the HF reference, Model Runner V2 and V1) and speed (Llama-3.1-8B
# shape, dummy bf16 weights, plain vLLM vs forced exit at 50% depth and never-firing checks).
# The work is scripts/gpu_check.py; results go to $OUT/gpu_check.{json,md} as each check finishes.
#
# usage: [GPU_CHECK_BUDGET_S=470] bash scripts/gpu_check.sh [--only correctness|speed] [--smoke] [...]
#        (any gpu_check.py option; the run is killed 45 s after its budget)
#
# Device-tool calls (shared/gpu-bundle/README.md; build .gpu1-3 here first with
# ../shared/gpu-bundle/make-bundle.sh; make the calls back to back: an idle machine is given back):
#   1. run, carry [".gpu1"]:  mkdir -p /tmp/stash && mv .gpu1/* /tmp/stash/ && nvidia-smi -L
#   2. run, carry [".gpu2"]:  mv .gpu2/* /tmp/stash/
#   3. run, carry [".gpu3"], timeout_s 600:
#        mv .gpu3/* /tmp/stash/ && cd /tmp/stash && cat payload.tar.part-* | tar xf - &&
#        bash payload/device/install.sh && cd - && GPU_CHECK_BUDGET_S=200 bash scripts/gpu_check.sh --only correctness
#   4. status (free), then run, no carry, timeout_s = budget + 60:
#        GPU_CHECK_BUDGET_S=<budget_left_s - 90> bash scripts/gpu_check.sh --only speed
#   5. give_back. Copy the files from files_at of calls 3 and 4 to benchmarks/results/gpu/.
#
# Device-time plan (15 minutes a task, machine starts, calls and idle waits together):
#   machine start + calls 1-3 up to the end of install.sh   ~8 min (bundle recipe, H100, 2026-11-24)
#   call 3, correctness, budget 200 s                          ~3.5 min: tiny model with V2 then V1
#                                                              first; SmolLM2 groups as far as time allows
#   call 4, speed, what is left (>= 180 s is useful)          plain + forced_50_compiled first, then
#                                                              never_top_k_compiled
# The full run (no --only) needs about 8 minutes on its own, more than a task has after the
# install, so the two halves go in separate calls; each check that does not fit its share of
# the budget is recorded as skipped / not run, and what finished stays in $OUT.
# Exit code: that of gpu_check.py (1: a correctness check failed; 2: none got to a verdict;
# 124: the timeout hit).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)

if [ -f /tmp/stash/payload/device/env.sh ]; then
    . /tmp/stash/payload/device/env.sh          # vLLM and its wheels in /tmp/site, offline flags
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
else PY=python3
fi

# vLLM loads the plugin through its entry point. On the device the package is only on
# PYTHONPATH (not installed): give it a metadata-only distribution that declares the entry point.
if ! "$PY" - <<'EOF'
import sys
from importlib.metadata import entry_points
sys.exit(0 if any(e.name == "early_exit" for e in entry_points(group="vllm.general_plugins")) else 1)
EOF
then
    META=${TMPDIR:-/tmp}/gpu_check_meta
    DIST=$META/vllm_early_exit-0.1.0.dist-info
    mkdir -p "$DIST"
    printf 'Metadata-Version: 2.1\nName: vllm-early-exit\nVersion: 0.1.0\n' > "$DIST/METADATA"
    printf '[vllm.general_plugins]\nearly_exit = vllm_early_exit:register\n' > "$DIST/entry_points.txt"
    export PYTHONPATH="$PYTHONPATH:$META"
    echo "gpu_check.sh: registered the vllm_early_exit entry point through $DIST"
fi

OUT_DIR=${OUT:-$REPO/gpu_check_out}
prev=""
for arg in "$@"; do
    [ "$prev" = "--out" ] && OUT_DIR=$arg
    case $arg in --out=*) OUT_DIR=${arg#--out=} ;; esac
    prev=$arg
done
BUDGET=${GPU_CHECK_BUDGET_S:-470}

mkdir -p "$OUT_DIR"
timeout -k 10 $((BUDGET + 45)) "$PY" scripts/gpu_check.py --out "$OUT_DIR" --budget-s "$BUDGET" "$@" \
    > "$OUT_DIR/gpu_check.log" 2>&1
rc=$?
echo "gpu_check.py exited with $rc (log: $OUT_DIR/gpu_check.log)"
if [ -f "$OUT_DIR/gpu_check.md" ]; then
    cat "$OUT_DIR/gpu_check.md"
else
    tail -n 60 "$OUT_DIR/gpu_check.log"
fi
exit $rc
