"""Quality benchmark: early exit vs full depth. Same as `python -m vllm_early_exit quality`.

    .venv/bin/python benchmarks/quality.py [--prompts 48] [--methods max_prob,...] [--heads DIR] [--out benchmarks/results]
"""

import sys

from vllm_early_exit.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["quality", *sys.argv[1:]]))
