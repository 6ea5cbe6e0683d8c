"""Greedy parity of two live OpenAI-compatible servers serving the same checkpoint (mamp's own and vLLM with the
mamp plugin): 8 prompts x 32 tokens at temperature 0; per prompt, how many tokens agree and the largest logprob
difference over them.

    python benchmarks/vllm_parity.py MAMP_URL VLLM_URL [--model NAME]

Start both first, on one checkpoint, e.g. (fp32 activations and an fp32 KV cache in both, as docs/RESULTS.md ran it):
    MAMP_CPU_ACTIVATIONS=float python -m mamp.server --model CKPT --port 8412 --served-model-name smol \\
        --kv-cache-dtype fp32
    MAMP_CPU_ACTIVATIONS=float VLLM_CPU_KVCACHE_SPACE=1 VENV/bin/python -m vllm.entrypoints.openai.api_server \\
        --model CKPT --served-model-name smol --port 8411 --dtype float32 --enforce-eager
"""
from __future__ import annotations

import argparse

import httpx

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are",
           "In 1492, Columbus", "Water boils at", "My favourite food is", "The quick brown fox"]


def greedy(url: str, model: str, prompt: str) -> tuple[str, list[str], list[float]]:
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0, "logprobs": 1})
    r.raise_for_status()
    c = r.json()["choices"][0]
    return c["text"], c["logprobs"]["tokens"], c["logprobs"]["token_logprobs"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--model", default="smol")
    args = p.parse_args()
    same = first16 = 0
    for prompt in PROMPTS:
        (ta, ka, la), (tb, kb, lb) = greedy(args.a, args.model, prompt), greedy(args.b, args.model, prompt)
        n = next((i for i, (x, y) in enumerate(zip(ka, kb)) if x != y), min(len(ka), len(kb)))
        same += ta == tb
        first16 += n >= 16
        d = max((abs(x - y) for x, y in zip(la[:n], lb[:n])), default=float("nan"))
        print(f"{prompt!r}: equal tokens {n}/32, max |dlogprob| over them {d:.4f}")
    print(f"identical texts {same}/{len(PROMPTS)}, first 16 tokens equal {first16}/{len(PROMPTS)}")


if __name__ == "__main__":
    main()
