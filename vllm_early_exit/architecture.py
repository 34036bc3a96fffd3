"""The name vLLM knows the early-exit model by, and where its class lives.

A leaf: it imports nothing, so the registration (``__init__.py``), the engine hooks
(``plugin/hooks.py``), the start-up checks (``plugin/checks.py``) and the prefix-cache
guard (``plugin/prefix_cache.py``) all read the name from here.
"""

ARCHITECTURE = "EarlyExitLlamaForCausalLM"
MODEL_CLASS = "vllm_early_exit.model_executor.models.llama_early_exit:EarlyExitLlamaForCausalLM"
