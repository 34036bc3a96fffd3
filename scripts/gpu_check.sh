#!/usr/bin/env bash
# GPU check of vllm_early_exit: correctness (exits off / forced / threshold / per-request off /
# compiled, against plain vLLM and the HF reference), speed (Llama-3.1-8B shape, dummy bf16
# weights, plain vLLM vs forced exit at 50% depth and never-firing checks, beside plain vLLM on
# the V1 runner with piecewise graphs) and, when asked, a profile of where a step's host time goes.
# The work is scripts/gpu_check.py (its parts: scripts/gpu_checks/); results go to
# $OUT/gpu_check.{json,md} as each check finishes.
#
# usage: [GPU_CHECK_BUDGET_S=470] bash scripts/gpu_check.sh [--only correctness|speed|profile] [--smoke] [...]
#        (any gpu_check.py option; the run is killed 45 s after its budget)
#
# Device-tool calls (shared/gpu-bundle/README.md; build .gpu1-3 here first with
# ../shared/gpu-bundle/make-bundle.sh, and copy SmolLM2's shortlist to .gpu_shortlist.json (an
# untracked file travels with the working tree). The machine is handed back 30 s after a call
# ends: have every command written out before the first call and send the next one at once.
# On 2026-12-04 (H200) calls 1 and 2 took seconds and install.sh 49 s; one slow turn between
# calls 3 and 4 lost the machine and the install had to be repeated.
#   1. run, carry [".gpu1"]:  mkdir -p /tmp/stash && mv .gpu1/* /tmp/stash/ && nvidia-smi -L
#   2. run, carry [".gpu2"]:  mv .gpu2/* /tmp/stash/
#   3. run, carry [".gpu3"], timeout_s 480 (install, then the profile: it says why early exit is slow):
#        mv .gpu3/* /tmp/stash/ && cd /tmp/stash && cat payload.tar.part-* | tar xf - &&
#        (bash payload/device/install.sh > $OUT/install.log 2>&1); cd - >/dev/null &&
#        GPU_CHECK_BUDGET_S=300 bash scripts/gpu_check.sh --only profile --shortlist .gpu_shortlist.json
#   4. run, no carry, timeout_s = budget + 60 (each call's $OUT returns at most 8 files: remove
#      $OUT/work/*.spec.json at the end):
#        . /tmp/stash/payload/device/env.sh && GPU_CHECK_BUDGET_S=<budget_left_s - 90> \
#        bash scripts/gpu_check.sh --only speed --shortlist .gpu_shortlist.json; rm -f $OUT/work/*.spec.json
#   5. correctness when time is left (early-exit engines run the V1 runner in any case, so the
#      -v1 groups repeat the default ones for them):
#        ... --only correctness --groups tiny-default,smollm2-default
#   6. give_back. Copy the files from each call's files_at to benchmarks/results/gpu/<date>-<device>/.
#
# Measured budgets (H200, 2026-12-04): plain + one early-exit engine of the 8B shape start in
# 70-80 s each; speed with three engines at batch 1/8/64 needs about 330 s; correctness of the
# tiny model about 150 s, SmolLM2 about as much. Each check that does not fit its share of the
# budget is recorded as skipped / not run, and what finished stays in $OUT.
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
