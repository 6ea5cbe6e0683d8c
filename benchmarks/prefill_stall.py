"""A long prompt arriving while streams run: its time to first token, and how long the running streams stall.

    python benchmarks/prefill_stall.py CKPT [--budgets 64,128,256,0] [--streams 15] [--prompt-tokens 512]

For each --max-prefill-tokens budget (0: the whole prompt in one step, i.e. no chunking) a server starts; 15
streaming clients generate long completions; once all are streaming, one request with a prompt of about
--prompt-tokens tokens arrives. Reported: the long request's TTFT, the running streams' median inter-token
latency before it arrived, and their largest gap while it was being prefilled, in decode steps (gap / median).
Target (issue 13): TTFT under 1 s and no stall over 2 decode steps. --warm sends the long prompt once first (with
the slot KV cache before issue 18 it kept the cache's growth, all slots reallocated when one sequence outgrew
them, out of the measurement; the paged cache does not grow that way, so it only warms the allocator's pages).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import ServerProcess, System  # noqa: E402

WORDS = ("the cat sat on a mat and looked at the big red ball while the sun was warm in the sky over the "
         "little town where people walked their dogs").split()


async def stream(client, url, body, stamps: list[float]) -> None:
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    stamps.append(time.perf_counter())


async def scenario(server: ServerProcess, streams: int, prompt_tokens: int, warm: bool) -> dict:
    body = {"model": server.name, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
            "stream": True, "ignore_eos": True}
    long_prompt = " ".join(WORDS[i % len(WORDS)] for i in range(prompt_tokens))
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=streams + 4)) as client:
        if warm:  # one long prompt first, alone: the KV cache has grown to its length before the measurement
            await stream(client, server.url, {**body, "prompt": long_prompt, "max_tokens": 1}, [])
        stamps = [[] for _ in range(streams)]
        tasks = [asyncio.create_task(stream(client, server.url, body, s)) for s in stamps]
        while not all(len(s) >= 8 for s in stamps):  # everyone streaming, past their own prefill
            await asyncio.sleep(0.01)
        before = [b - a for s in stamps for a, b in zip(s[-6:], s[-5:])]
        sent = time.perf_counter()
        first: list[float] = []
        await stream(client, server.url, {**body, "prompt": long_prompt, "max_tokens": 1}, first)
        ttft = first[0] - sent if first else float("nan")
        done = time.perf_counter()
        counts = [len(s) for s in stamps]
        while any(len(s) < c + 3 for s, c in zip(stamps, counts)):  # the gaps open at `done` must close
            await asyncio.sleep(0.01)
        gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if b >= sent and a <= done]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    itl = statistics.median(before)
    worst = max(gaps) if gaps else float("nan")
    return {"ttft": ttft, "itl": itl, "worst": worst, "steps": worst / itl}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--budgets", default="64,128,256,0")
    ap.add_argument("--streams", type=int, default=15)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--server-arg", action="append", default=[])
    ap.add_argument("--warm", action="store_true",
                    help="send the long prompt once before the streams start (the KV pool's pages are then committed)")
    a = ap.parse_args()
    print("| --max-prefill-tokens | long prompt TTFT ms | streams' ITL p50 ms | worst stall ms | in decode steps |")
    print("|---|---|---|---|---|")
    for budget in (int(b) for b in a.budgets.split(",")):
        extra = ["--max-prefill-tokens", str(budget if budget > 0 else 1 << 20), *a.server_arg]
        opts = argparse.Namespace(concurrency=[a.streams + 1], device="cpu", server_arg=[])
        server = ServerProcess(System("m", a.checkpoint, "mamp", tuple(extra)), opts)
        try:
            server.wait_ready()
            r = asyncio.run(scenario(server, a.streams, a.prompt_tokens, a.warm))
        finally:
            server.stop()
        label = budget if budget > 0 else "whole prompt"
        print(f"| {label} | {1e3 * r['ttft']:.0f} | {1e3 * r['itl']:.1f} | {1e3 * r['worst']:.0f} "
              f"| {r['steps']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
