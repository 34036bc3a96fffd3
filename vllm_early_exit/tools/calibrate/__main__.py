"""``python -m vllm_early_exit.tools.calibrate``: the ``calibrate`` command on its own."""

import sys

from vllm_early_exit.tools.calibrate.cli import main

sys.exit(main())
