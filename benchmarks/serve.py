"""Serving benchmark: a live server per checkpoint (subprocess on loopback), 1/4/16 concurrent streaming clients.

    python benchmarks/serve.py --packed CKPT_PACKED --float CKPT_FLOAT [--concurrency 1 4 16]
        [--requests-per-client 4] [--max-tokens 128] [--prompt "Once upon a time"] [--device auto]

For each checkpoint and concurrency level: aggregate generation tokens/s (all clients' completion tokens over
the level's wall time), time to first token and inter-token latency p50/p99 (measured by the client on the
SSE stream), and the server's resident memory and weight memory (read from its /metrics). Prints a markdown
table. Every request uses ignore_eos, so all generate exactly --max-tokens tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


@dataclass
class LevelResult:
    label: str
    concurrency: int
    tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    rss_bytes: float = 0.0
    weight_bytes: float = 0.0
    weight_bf16_bytes: float = 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """python -m mamp.server in a subprocess on loopback; its log goes to a temporary file shown on failure."""

    def __init__(self, model: str, name: str, device: str, max_num_seqs: int, extra: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "mamp.server", "--model", model, "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", name, "--device", device, "--max-num-seqs", str(max_num_seqs), *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server for {self.name} exited:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server for {self.name} did not start:\n{self.tail()}")

    def tail(self) -> str:
        self.log.seek(0)
        return "".join(self.log.readlines()[-30:])

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, float, list[float]]:
    """One streaming completion -> (completion tokens, TTFT, inter-token latencies), seconds."""
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    if not stamps:
        return tokens, float("nan"), []
    return tokens, stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])]


async def run_level(server: ServerProcess, concurrency: int, per_client: int, body: dict) -> LevelResult:
    result = LevelResult(server.name, concurrency, 0, 0.0)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        async def client_loop() -> None:
            for _ in range(per_client):
                tokens, ttft, itl = await one_request(client, server.url, body)
                result.tokens += tokens
                result.ttft.append(ttft)
                result.itl.extend(itl)

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - start
    m = server.metrics()
    result.rss_bytes = m.get("mamp:process_resident_memory_bytes", 0.0)
    result.weight_bytes = m.get("mamp:weight_memory_bytes", 0.0)
    result.weight_bf16_bytes = m.get("mamp:weight_memory_bf16_bytes", 0.0)
    return result


def bench_model(label: str, path: str, args) -> list[LevelResult]:
    server = ServerProcess(path, label, args.device, max(args.concurrency), args.server_arg)
    try:
        server.wait_ready()
        body = {"model": label, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        asyncio.run(run_level(server, 1, 1, {**body, "max_tokens": 4}))  # warm-up
        return [asyncio.run(run_level(server, c, args.requests_per_client, body)) for c in args.concurrency]
    finally:
        server.stop()


def markdown(results: list[LevelResult]) -> str:
    rows = ["| model | weights MiB (bf16 MiB) | clients | gen tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
            "| ITL p99 ms | server RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.label} | {r.weight_bytes / MIB:.2f} ({r.weight_bf16_bytes / MIB:.2f}) | {r.concurrency} "
                    f"| {r.tokens / r.seconds:.1f} | {1e3 * percentile(r.ttft, 50):.1f} "
                    f"| {1e3 * percentile(r.ttft, 99):.1f} | {1e3 * percentile(r.itl, 50):.1f} "
                    f"| {1e3 * percentile(r.itl, 99):.1f} | {r.rss_bytes / MIB:.0f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--packed", help="packed mamp checkpoint folder")
    p.add_argument("--float", dest="float_", help="the float checkpoint of the same network")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    args = p.parse_args(argv)
    models = [(label, path) for label, path in (("packed", args.packed), ("float", args.float_)) if path]
    if not models:
        p.error("give --packed and/or --float")
    results = [r for label, path in models for r in bench_model(label, path, args)]
    print(f"command: python benchmarks/serve.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"device {args.device}; date {datetime.date.today().isoformat()}")
    print(f"each request: {args.max_tokens} tokens, prompt {args.prompt!r}; "
          f"{args.requests_per_client} requests per client\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
