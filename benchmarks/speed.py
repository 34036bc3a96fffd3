"""Speed benchmark: early exit vs plain vLLM. Same as `python -m vllm_early_exit bench`.

    .venv/bin/python benchmarks/speed.py [--batches 1,8,32] [--model DIR] [--out benchmarks/results]
"""

import sys

from vllm_early_exit.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
