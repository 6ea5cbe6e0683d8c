"""Checks a running mamp server the way a user of the image would (docker/ci/image_check.sh calls it):

    python docker/ci/smoke.py URL MODEL_NAME

/health until ready (and how long that took), one completion (timed: the first request after ready), one streamed
chat completion, /metrics with the weight and kernel series. Prints one line per check; exits 1 on the first
failure with what was wrong.
"""
from __future__ import annotations

import json
import sys
import time

import httpx


def fail(message: str) -> None:
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    url, model = sys.argv[1], sys.argv[2]
    start = time.monotonic()
    status = None
    while time.monotonic() - start < 300:
        try:
            r = httpx.get(url + "/health", timeout=2)
            status = r.status_code
            if status == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        fail(f"/health not ready after 300 s (last status {status})")
    print(f"ok: /health ready {time.monotonic() - start:.1f} s after the container started")

    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", timeout=120,
                   json={"model": model, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0})
    first = time.perf_counter() - t0
    if r.status_code != 200 or not r.json()["choices"][0]["text"]:
        fail(f"completion: HTTP {r.status_code} {r.text[:300]}")
    print(f"ok: first completion after ready took {first:.2f} s: {r.json()['choices'][0]['text']!r}")

    pieces = []
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": [{"role": "user", "content": "Tell me a story."}],
                            "max_tokens": 16, "stream": True}) as r:
        if r.status_code != 200:
            fail(f"streamed chat: HTTP {r.status_code} {r.read()[:300]!r}")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                pieces.append(delta.get("content") or "")
    if not "".join(pieces):
        fail("streamed chat: no content")
    print(f"ok: streamed chat, {len(pieces)} chunks: {''.join(pieces)!r}")

    text = httpx.get(url + "/metrics", timeout=10).text
    kernels = [line for line in text.splitlines() if line.startswith("mamp:kernel_layers{")]
    weights = [line for line in text.splitlines() if line.startswith("mamp:weight_memory_bytes")]
    if not kernels or not weights:
        fail("/metrics lacks mamp:kernel_layers or mamp:weight_memory_bytes")
    print(f"ok: /metrics: {'; '.join(kernels)}; {weights[0]}")


if __name__ == "__main__":
    main()
