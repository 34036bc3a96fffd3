"""Probe: can a compiled segment run its layers under ``torch.cond`` inside vLLM's compile?

The next design for a check that costs nothing is one compiled call per step: the branch after
each check as ``torch.cond`` inside one unit. This probe replaces ``LayerGroup.forward`` (the
compiled segments) with one that runs its layers under ``torch.cond(keep.sum() > 0, layers,
pass-through)``, starts SmolLM2 compiled with two never-firing checks, and compares the tokens
with plain vLLM's. It prints ``EQUAL`` and times when the unit compiles, else vLLM's error.

    .venv/bin/python benchmarks/cond_probe.py            # vLLM's default layer names
    VLLM_USE_LAYERNAME=0 .venv/bin/python benchmarks/cond_probe.py   # layer names as str

Results: ``benchmarks/results/fused_check/cond_probe.md``.
"""

from __future__ import annotations

import os
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"  # the patched forward must be traced, not loaded


def forward_under_cond(self, positions, hidden_states, residual, keep):
    import torch

    from vllm_early_exit.model_executor.early_exit.kv_fill import run_layers_holding

    def run(p, h, r, k):
        out_h, out_r = run_layers_holding(self.layers, p, h, r, k)
        return out_h.clone(), out_r.clone()

    def hold(p, h, r, k):
        return h.clone(), r.clone()

    return torch.cond(keep.sum() > 0, run, hold, (positions, hidden_states, residual, keep))


def main() -> None:
    from vllm import SamplingParams

    from vllm_early_exit.model_executor.early_exit import groups
    from vllm_early_exit.tools.assets import smollm2_checkpoint
    from vllm_early_exit.tools.engines import build_engine

    groups.LayerGroup.forward = forward_under_cond
    model = str(smollm2_checkpoint())
    settings = {"signal": "max_prob", "exit_layers": [18, 22], "threshold": 1.0, "policy": "per_token",
                "compile": True, "log_interval_s": 0}
    early_exit = build_engine(model, early_exit=settings, max_model_len=1024, kv_cache_gib=1)
    plain = build_engine(model, max_model_len=1024, kv_cache_gib=1)
    params = SamplingParams(max_tokens=48, ignore_eos=True, temperature=0)
    chats = [[{"role": "user", "content": t}] for t in ("Explain how a bicycle works.", "Write a poem about the sea.")]
    ours = [o.outputs[0].token_ids for o in early_exit.chat(chats, params, use_tqdm=False)]
    theirs = [o.outputs[0].token_ids for o in plain.chat(chats, params, use_tqdm=False)]
    print("EQUAL", [list(a) == list(b) for a, b in zip(ours, theirs)], flush=True)
    for name, engine in (("early exit", early_exit), ("plain", plain)) * 2:
        start = time.perf_counter()
        engine.chat(chats[:1], params, use_tqdm=False)
        print(f"{name}: {(time.perf_counter() - start) / 48 * 1e3:.2f} ms per token", flush=True)


if __name__ == "__main__":
    main()
