"""Serving benchmark: mamp and its peers (llama.cpp's llama-server, vLLM) as live servers on loopback, driven by
1/4/16 concurrent streaming clients, the systems measured one at a time in alternating rounds.

    python benchmarks/serve.py --mamp b4=CKPT [--mamp 'b4-2t=CKPT --threads 2'] [--mamp fp32=FLOAT_CKPT] \
        [--llama-server BIN --gguf q4_0=Q4_0.gguf --gguf q8_0=Q8_0.gguf] \
        [--vllm-python VENV/bin/python --vllm fp32=HF_FOLDER] \
        [--concurrency 1 4 16] [--rounds 2] [--requests-per-client 3] [--max-tokens 128] [--plot serve.png] \
        [--prompt-tokens 512]

(`--packed CKPT` / `--float CKPT` are shorthands for `--mamp packed=CKPT` / `--mamp float=CKPT`.)

Each round starts every system in turn, warms it with one short request, runs every concurrency level and stops
it, so that a noisy shared machine slows all of them alike; ratios are computed within a round. For each system
and level: aggregate generation tokens/s (all clients' completion tokens over the level's wall time), time to
first token and inter-token latency p50/p99 (measured by the client on the SSE stream), and the peak resident
memory of the server's whole process tree (sampled from /proc every 0.2 s during the level; vLLM runs an engine
process beside its API process, and pages the two share count twice). Every request uses ignore_eos, so all
generate exactly --max-tokens tokens. Prints a markdown table and the mamp/peer ratios; --plot writes tokens/s
against clients (needs matplotlib).

--prompt-tokens N replaces the one short prompt with long ones: every request its own prompt of about N tokens
(N words drawn by a seeded generator, the same sequence of prompts for every system), so no server can reuse a
cached prefix, and the ratios then include each peer's TTFT p50 over mamp's: how fast a long prompt is read.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


@dataclass(frozen=True)
class System:
    """One server to measure: a label, the model file or folder, and its kind (mamp | llama.cpp | vllm)."""

    label: str
    model: str
    kind: str
    extra: tuple[str, ...] = ()  # this system's own extra server flags


@dataclass
class LevelResult:
    label: str
    round: int
    concurrency: int
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    peak_rss_bytes: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_bytes(pid: int) -> int:
    """Resident bytes of a process and all its descendants (from /proc; 0 where a process is gone)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


class RssSampler:
    """Peak resident memory of a process tree, sampled in a thread while the with-block runs."""

    def __init__(self, pid: int, every_s: float = 0.2):
        self.pid, self.every_s, self.peak = pid, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self._stop.wait(self.every_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_bytes(self.pid))


def server_command(system: System, port: int, args) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment that start `system` on 127.0.0.1:port."""
    slots = max(args.concurrency)
    if system.kind == "mamp":
        cmd = [sys.executable, "-m", "mamp.server", "--model", system.model, "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", system.label, "--device", args.device,
               "--max-num-seqs", str(slots), *args.server_arg, *system.extra]
        return cmd, {}
    if system.kind == "llama.cpp":
        # One KV slot per client; each slot gets the context it needs (prompt + generation, with room to spare).
        ctx = slots * max(512, args.prompt_tokens + 2 * args.max_tokens + 128)
        cmd = [args.llama_server, "-m", system.model, "--host", "127.0.0.1", "--port", str(port),
               "-np", str(slots), "-c", str(ctx), "--alias", system.label, "--no-webui", *args.llama_arg, *system.extra]
        return cmd, {}
    if system.kind == "vllm":
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", system.model,
               "--served-model-name", system.label, "--host", "127.0.0.1", "--port", str(port),
               "--max-num-seqs", str(slots), "--max-model-len", "2048", "--dtype", "float32", *args.vllm_arg,
               *system.extra]
        return cmd, {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                     "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    raise ValueError(f"unknown system kind {system.kind!r}")


class ServerProcess:
    """A server in a subprocess on loopback; its log goes to a temporary file shown on failure."""

    def __init__(self, system: System, args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = system.label
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd, env = server_command(system, self.port, args)
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env}, start_new_session=True)

    def wait_ready(self, timeout: float = 900) -> None:
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

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.log.close()


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, float, list[float]]:
    """One streaming completion -> (completion tokens, TTFT, inter-token latencies), seconds.

    Tokens are the server's usage count where it sends one, else the number of chunks that carried text."""
    start = time.perf_counter()
    stamps: list[float] = []
    usage = None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
    tokens = usage if usage is not None else len(stamps)
    if not stamps:
        return tokens, float("nan"), []
    return tokens, stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])]


WORDS = ("the cat sat on a mat and looked at the big red ball while the sun was warm in the sky over the little "
         "town where people walked their dogs past old houses by a river").split()


def long_prompt(tokens: int, seed: int) -> str:
    """About `tokens` tokens of common words (one token each), different for every seed."""
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS) for _ in range(tokens))


async def run_level(server: ServerProcess, label: str, round_: int, concurrency: int, per_client: int,
                    body: dict, prompt_tokens: int = 0) -> LevelResult:
    """`concurrency` clients, each sending `per_client` requests of `body` one after another (with prompt_tokens,
    request j of client i gets its own long prompt, the same for every system at this level and round)."""
    result = LevelResult(label, round_, concurrency)
    # A fresh connection per request: llama-server closes idle keep-alive connections, and a request sent on one
    # it has just closed fails with "Server disconnected"; every system is driven the same way.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        async def client_loop(i: int) -> None:
            for j in range(per_client):
                seed = ((round_ * 1000 + concurrency) * 1000 + i) * 1000 + j
                req = {**body, "prompt": long_prompt(prompt_tokens, seed)} if prompt_tokens else body
                tokens, ttft, itl = await one_request(client, server.url, req)
                result.tokens += tokens
                result.ttft.append(ttft)
                result.itl.extend(itl)

        with RssSampler(server.proc.pid) as rss:
            start = time.perf_counter()
            await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
            result.seconds = time.perf_counter() - start
    result.peak_rss_bytes = rss.peak
    return result


def bench_system(system: System, round_: int, args) -> list[LevelResult]:
    server = ServerProcess(system, args)
    try:
        t0 = time.perf_counter()
        server.wait_ready()
        print(f"  round {round_}: {system.label} ({system.kind}) ready in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        body = {"model": system.label, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
        asyncio.run(run_level(server, system.label, round_, 1, 1, {**body, "max_tokens": 8}))  # warm-up
        out = []
        for c in args.concurrency:
            out.append(asyncio.run(run_level(server, system.label, round_, c, args.requests_per_client, body,
                                             args.prompt_tokens)))
            print(f"    {c:>3} clients: {out[-1].tokens_per_s:7.1f} tok/s", file=sys.stderr)
        return out
    except Exception:
        print(f"server log of {system.label} (last lines):\n{server.tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()


def pooled(results: list[LevelResult], label: str, concurrency: int) -> list[LevelResult]:
    return [r for r in results if r.label == label and r.concurrency == concurrency]


def markdown(systems: list[System], results: list[LevelResult], concurrency: list[int]) -> str:
    rows = ["| system | model | clients | gen tok/s (each round) | TTFT p50 / p99 ms | ITL p50 / p99 ms "
            "| peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for s in systems:
        for c in concurrency:
            rs = pooled(results, s.label, c)
            ttft = [t for r in rs for t in r.ttft]
            itl = [t for r in rs for t in r.itl]
            flags = f" `{' '.join(s.extra)}`" if s.extra else ""
            rows.append(f"| {s.label} | {s.kind}: {Path(s.model).name}{flags} | {c} "
                        f"| {' / '.join(f'{r.tokens_per_s:.1f}' for r in rs)} "
                        f"| {1e3 * percentile(ttft, 50):.0f} / {1e3 * percentile(ttft, 99):.0f} "
                        f"| {1e3 * percentile(itl, 50):.1f} / {1e3 * percentile(itl, 99):.1f} "
                        f"| {max(r.peak_rss_bytes for r in rs) / MIB:.0f} |")
    return "\n".join(rows)


def ratios(systems: list[System], results: list[LevelResult], concurrency: list[int], rounds: int,
           ttft: bool = False) -> str:
    """tokens/s of each mamp system over each peer, per level, every round's ratio (same round, same load); with
    ttft, also each peer's TTFT p50 over the mamp system's."""
    lines = []
    mine = [s for s in systems if s.kind == "mamp"]
    for m in mine:
        for p in systems:
            if p.kind == "mamp" and systems.index(p) <= systems.index(m):
                continue  # each pair of mamp systems once
            for c in concurrency:
                per_round = []
                for r in range(rounds):
                    a, b = pooled(results, m.label, c)[r], pooled(results, p.label, c)[r]
                    per_round.append(a.tokens_per_s / b.tokens_per_s)
                lines.append(f"- {m.label} / {p.label}, {c} clients: "
                             + " / ".join(f"{x:.2f}x" for x in per_round)
                             + f" (median {statistics.median(per_round):.2f}x)")
                if ttft:
                    slower = [percentile(pooled(results, p.label, c)[r].ttft, 50)
                              / percentile(pooled(results, m.label, c)[r].ttft, 50) for r in range(rounds)]
                    lines.append(f"- TTFT p50 {p.label} / {m.label}, {c} clients: "
                                 + " / ".join(f"{x:.2f}x" for x in slower))
        ones = pooled(results, m.label, 1)
        for c in concurrency:
            if c == 1 or not ones:
                continue
            per_round = [pooled(results, m.label, c)[r].tokens_per_s / ones[r].tokens_per_s for r in range(rounds)]
            lines.append(f"- {m.label}, {c} clients / 1 client: " + " / ".join(f"{x:.2f}x" for x in per_round))
    return "\n".join(lines)


def plot(systems: list[System], results: list[LevelResult], concurrency: list[int], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for s in systems:
        medians = [statistics.median(r.tokens_per_s for r in pooled(results, s.label, c)) for c in concurrency]
        ax.plot(concurrency, medians, marker="o", label=f"{s.label} ({s.kind})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(concurrency, [str(c) for c in concurrency])
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("generated tokens/s (median of rounds)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def system(spec: str, flag: str, kind: str) -> System:
    """LABEL=PATH [FLAG ...]: a system, with server flags of its own after the path."""
    label, sep, rest = spec.partition("=")
    words = shlex.split(rest)
    if not sep or not label or not words:
        raise SystemExit(f"serve.py: {flag} wants LABEL=PATH [FLAGS], got {spec!r}")
    return System(label, words[0], kind, tuple(words[1:]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mamp", action="append", default=[], metavar="'LABEL=CKPT [FLAGS]'",
                   help="a mamp server on CKPT, with its own extra server flags if given")
    p.add_argument("--packed", help="shorthand for --mamp packed=CKPT")
    p.add_argument("--float", dest="float_", help="shorthand for --mamp float=CKPT")
    p.add_argument("--llama-server", help="llama.cpp's llama-server binary (for --gguf)")
    p.add_argument("--gguf", action="append", default=[], metavar="'LABEL=FILE [FLAGS]'",
                   help="llama-server on FILE")
    p.add_argument("--vllm-python", help="python of an environment with vLLM installed (for --vllm)")
    p.add_argument("--vllm", action="append", default=[], metavar="'LABEL=FOLDER [FLAGS]'",
                   help="vLLM on a HF folder")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds over all systems")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--prompt-tokens", type=int, default=0,
                   help="instead of --prompt: every request its own prompt of about this many tokens")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="mamp's device")
    p.add_argument("--server-arg", action="append", default=[], help="extra mamp server flag (repeatable)")
    p.add_argument("--llama-arg", action="append", default=[], help="extra llama-server flag (repeatable)")
    p.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM server flag (repeatable)")
    p.add_argument("--plot", help="write tokens/s against clients to this image (needs matplotlib)")
    args = p.parse_args(argv)

    systems = [system(spec, "--mamp", "mamp") for spec in args.mamp]
    systems += [System(label, path, "mamp") for label, path in (("packed", args.packed), ("float", args.float_))
                if path]
    systems += [system(spec, "--gguf", "llama.cpp") for spec in args.gguf]
    systems += [system(spec, "--vllm", "vllm") for spec in args.vllm]
    if not systems:
        p.error("give at least one of --mamp/--packed/--float, --gguf, --vllm")
    if len({s.label for s in systems}) != len(systems):
        p.error("labels must differ")
    if args.prompt_tokens < 0:
        p.error("--prompt-tokens must be at least 0")
    if args.gguf and not args.llama_server:
        p.error("--gguf needs --llama-server BIN")
    if args.vllm and not args.vllm_python:
        p.error("--vllm needs --vllm-python PYTHON")
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # say so before the rounds, not after
        p.error("--plot needs matplotlib: pip install -e '.[bench]'")

    results: list[LevelResult] = []
    for r in range(args.rounds):
        for s in systems:
            results += bench_system(s, r, args)
    print(f"command: python benchmarks/serve.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"mamp device {args.device}; date {datetime.date.today().isoformat()}")
    prompt = f"its own of ~{args.prompt_tokens} tokens" if args.prompt_tokens else repr(args.prompt)
    print(f"each request: {args.max_tokens} tokens, prompt {prompt}; {args.requests_per_client} requests "
          f"per client; {args.rounds} alternating round(s)\n")
    print(markdown(systems, results, args.concurrency))
    text = ratios(systems, results, args.concurrency, args.rounds, ttft=bool(args.prompt_tokens))
    if text:
        print("\n" + text)
    if args.plot:
        plot(systems, results, args.concurrency, args.plot)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
