"""The GPU check's parts, driven by ``scripts/gpu_check.py`` (and ``scripts/gpu_check.sh``).

``settings`` (models, early-exit settings), ``workers`` (engines in a worker subprocess, the
time budget), ``correctness``, ``speed``, ``profile`` and ``report`` (JSON and Markdown).
"""
