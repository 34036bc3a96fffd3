"""Serving benchmark with vLLM's own client. Same as `python -m vllm_early_exit bench-serve`.

    .venv/bin/python benchmarks/serve.py [--concurrency 1,8,32] [--early-exit-config FILE] [--resume]
"""

import sys

from vllm_early_exit.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench-serve", *sys.argv[1:]]))
