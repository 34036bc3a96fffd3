"""Runs one vLLM engine in a fresh process for a test and writes what it produced.

Usage: python engine_runner.py SPEC.json RESULT.json

SPEC: {"model": dir, "engine": {LLM kwargs},
       "requests": [[prompt_token_ids, max_tokens, extra_args or null], ...],
       "batched": false, "stats": true}
Requests run one at a time unless "batched" is true, so each is decoded alone
and its schedule is deterministic; "batched": "both" runs them one at a time,
then all together (RESULT gets "outputs_batched" too). RESULT: {"outputs": [[token ids]], "stats": [per rank], "layer_groups": [compiled groups of rank 0],
"kv_projections": [per rank, the layers with a K/V-only fill projection]}; with
$EARLY_EXIT_TEST_STEP_OPS set, "steps": per step, its aten ops and host reads (``tools/step_ops.py``);
with $EARLY_EXIT_TEST_STEP_PROGRAM set, decode steps run as conditional-node programs (``step_program.py``).
"""

import dataclasses
import json
import os
import sys

STEP_OPS_ENV = "EARLY_EXIT_TEST_STEP_OPS"
STEP_PROGRAM_ENV = "EARLY_EXIT_TEST_STEP_PROGRAM"


def main(spec_path: str, result_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("batched"):
        # The engine core in this process: LLM.generate then queues every request before
        # the first step, so all prompts prefill together and every later step is pure
        # decode. With a separate core process, requests arrive one by one and a decode
        # token may share a step with another request's prefill (that step runs full depth).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if os.environ.get("EARLY_EXIT_TEST_IN_PLACE_NORM"):  # see in_place_norm.py (needs the core in this process)
        sys.path.insert(0, os.path.dirname(__file__))
        import in_place_norm

        in_place_norm.install()
    if os.environ.get(STEP_PROGRAM_ENV):  # run each decode step as a conditional-node program
        sys.path.insert(0, os.path.dirname(__file__))
        import step_program

        step_program.install()
    recorder = None
    if os.environ.get(STEP_OPS_ENV):  # count each step's host reads (needs the core in this process)
        from vllm_early_exit.model_executor.models.llama_early_exit import EarlyExitLlamaForCausalLM
        from vllm_early_exit.tools.step_ops import StepRecorder

        recorder = StepRecorder()
        recorder.install(EarlyExitLlamaForCausalLM)
    from vllm import LLM, SamplingParams

    llm = LLM(spec["model"], **spec["engine"])
    requests = spec["requests"]

    def params(request):
        _, max_tokens, extra_args = request
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra_args)

    prompts = [{"prompt_token_ids": r[0]} for r in requests]

    def batched():
        return llm.generate(prompts, [params(r) for r in requests], use_tqdm=False)

    def one_by_one():
        return [llm.generate([p], params(r), use_tqdm=False)[0] for p, r in zip(prompts, requests)]

    def token_ids(outs):
        return [list(o.outputs[0].token_ids) for o in outs]

    mode = spec.get("batched")
    result = {"outputs": token_ids(batched() if mode is True else one_by_one())}
    if mode == "both":
        result["outputs_batched"] = token_ids(batched())
    if spec.get("stats"):
        from vllm_early_exit import get_exit_stats

        result["stats"] = [s.to_dict() for s in get_exit_stats(llm, all_ranks=True)]
        result["layer_groups"] = llm.collective_rpc("early_exit_layer_groups")[0]
        result["kv_projections"] = llm.collective_rpc("early_exit_kv_projections")
    if recorder is not None:
        result["steps"] = [dataclasses.asdict(step) for step in recorder.steps]
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
