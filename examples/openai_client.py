"""Talks to `examples/serve.sh` with the openai package: completions, chat, streaming,
per-request early-exit control, and the early-exit metrics.

    .venv/bin/python examples/openai_client.py [BASE_URL]
"""

import sys
import urllib.request

from openai import OpenAI

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
client = OpenAI(base_url=base + "/v1", api_key="unused")
model = client.models.list().data[0].id

completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=16, temperature=0)
print("completion:", completion.choices[0].text)

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Name three colors."}], max_tokens=32, temperature=0
)
print("chat:", chat.choices[0].message.content)

print("stream: ", end="")
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Count to five."}], max_tokens=32, temperature=0, stream=True
):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()

# Per request: early exit off (full depth, identical to plain vLLM), or its own threshold.
full = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=16, temperature=0,
    extra_body={"vllm_xargs": {"early_exit_enabled": False}},
)
print("early exit off:", full.choices[0].text)
strict = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=16, temperature=0,
    extra_body={"vllm_xargs": {"early_exit_threshold": 0.99}},
)
print("threshold 0.99:", strict.choices[0].text)

with urllib.request.urlopen(base + "/metrics") as r:
    lines = [line for line in r.read().decode().splitlines() if line.startswith("vllm:early_exit_")]
print("\n".join(line for line in lines if "layer_exits" not in line or not line.endswith(" 0.0")))
