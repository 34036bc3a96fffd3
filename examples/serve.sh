#!/usr/bin/env bash
# Serves SmolLM2-135M-Instruct (or MODEL_DIR) with early exit on an OpenAI-compatible API.
#
#   bash examples/serve.sh [MODEL_DIR]       then, in another shell:
#   .venv/bin/python examples/openai_client.py
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-$(.venv/bin/python -c "from vllm_early_exit.tools.assets import smollm2_checkpoint; print(smollm2_checkpoint())")}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}   # GiB of KV cache on CPU machines
exec .venv/bin/vllm serve "$MODEL" \
  --served-model-name smollm2 \
  --dtype float32 --max-model-len 2048 \
  --enable-early-exit \
  --early-exit-config '{"signal": "max_prob", "threshold": 0.95, "exit_layers": [24, 26, 28]}'
