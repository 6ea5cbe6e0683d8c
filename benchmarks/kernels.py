"""Packed matmul vs torch fp32 and bf16 nn.Linear of the same shape, measured in the same run.

    python benchmarks/kernels.py --device cpu --threads 2 --shapes smollm2 --ms 1,4,16,256,2048
    python benchmarks/kernels.py --device cuda --shapes smollm2,llama7b --ms 1,4,16,256,2048
    python benchmarks/kernels.py --half --ms 1,4,16,256 --threads 1   # 16-bit weight (lm_head 576 x 49152)

Prints a markdown table: median times (warm-up first) and ratios t(nn.Linear) / t(packed) (> 1: packed is
faster). On a GPU every candidate is timed inside a CUDA graph over its own copies of the weights (together
twice the L2 cache where the shape allows), which is the GPU time a graph-captured decode step sees; the
packed call's eager time (Python and launch overhead included, L2 cleared by do_bench) is the last column. Also
on a GPU: the achieved bandwidth over the bytes the packed kernel must read (words, bitmap, both grids' scales
and zeros, activations) against the device's copy bandwidth (a large Tensor.copy_).

--half times kernels.half_linear.half_matmul (fp32 activations, a bf16 or fp16 weight kept in 16 bits) against
the same fp32 and bf16 nn.Linear, by default on SmolLM2's tied lm_head (K=576, N=49152).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mamp.kernels.cpu_matmul import int8_isa  # noqa: E402
from mamp.kernels.dispatch import packed_matmul  # noqa: E402
from mamp.kernels.packed_linear import PackedLinear  # noqa: E402
from mamp.kernels.half_linear import half_matmul  # noqa: E402
from mamp.kernels.packing import PackSpec, PackedWeight, pack  # noqa: E402

SHAPE_SETS = {  # (K = in_features, N = out_features)
    "smollm2": [(576, 576), (576, 1536), (1536, 576), (576, 192)],
    "llama7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
    "lm_head": [(576, 49152)],  # SmolLM2's tied embedding / lm_head
}


@dataclass(frozen=True)
class BenchArgs:
    device: str = "cpu"
    shapes: tuple[tuple[int, int], ...] = tuple(SHAPE_SETS["smollm2"])
    ms: tuple[int, ...] = (1, 4, 16, 256, 2048)
    repeats: int = 20
    warmup: int = 3
    max_seconds: float = 1.5  # per measurement: fewer repeats where one call is slow
    threads: int | None = None
    bits: int = 2
    salient_bits: int = 8
    group_size: int = 128
    salient_frac: float = 0.05
    act_dtype: str | None = None  # packed path activations: default fp32 on CPU, bf16 on CUDA
    half: bool = False  # time half_matmul (16-bit weight) instead of the packed kernel
    half_dtype: str = "bfloat16"  # the 16-bit weight's dtype for --half
    cold: bool = False  # CPU: every candidate cycles through copies of its weights larger than the last-level cache


def random_packed(spec: PackSpec, frac: float, device: str, seed: int = 0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    n = spec.out_features
    p = pack(spec,
             torch.randint(0, 1 << spec.bits, (n, spec.padded_in), generator=g),
             torch.randint(0, 1 << spec.salient_bits, (n, spec.n_high_codes), generator=g),
             torch.rand(n, spec.n_groups, generator=g) < frac,
             torch.rand(spec.n_scale_groups, n, generator=g) * 0.02 + 1e-3,
             torch.randint(0, 1 << spec.bits, (spec.n_scale_groups, n), generator=g),
             torch.rand(spec.n_salient_scale_groups, n, generator=g) * 0.02 + 1e-3,
             torch.randint(0, 1 << spec.salient_bits, (spec.n_salient_scale_groups, n), generator=g))
    return p.to(device)


def _time_one(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_calls(fns: list, device: torch.device, repeats: int, warmup: int, max_seconds: float) -> list[float]:
    """Median seconds per call of each fn. Calls alternate round-robin, so that load from other processes on a
    shared machine falls on all of them alike. On CUDA, triton's do_bench instead: it clears the L2 cache before
    every call (so weights stream from device memory, as in decode) and times with CUDA events."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return [do_bench(fn, warmup=10, rep=max(20, int(max_seconds * 40)), return_mode="median") / 1e3
                for fn in fns]
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    budget_end = time.perf_counter() + max_seconds * len(fns)
    for i in range(repeats):
        for fn, ts in zip(fns, times):
            ts.append(_time_one(fn, device))
        if i >= 2 and time.perf_counter() > budget_end:
            break
    return [statistics.median(ts) for ts in times]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """GB/s of a large device-to-device Tensor.copy_ (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    (t,) = time_calls([lambda: dst.copy_(src)], device, repeats=10, warmup=2, max_seconds=5.0)
    return 2 * nbytes / t / 1e9


def _setup(a: BenchArgs) -> tuple[torch.device, torch.dtype]:
    """Device, thread count, and the candidate's activation dtype (bf16 on CUDA, fp32 on CPU unless given)."""
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    act = getattr(torch, a.act_dtype) if a.act_dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, act


def last_level_cache_bytes() -> int:
    """The CPU's last-level cache (sysconf, else /sys), 32 MiB where neither says."""
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            v = os.sysconf(name)
        except (ValueError, OSError):
            v = 0
        if v > 0:
            return v
    try:
        idx = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))[-1]
        text = (idx / "size").read_text().strip().upper()
        return int(text.rstrip("KM")) << (20 if text.endswith("M") else 10)
    except (IndexError, OSError, ValueError):
        return 32 << 20


def cpu_copies(nbytes: int, cap: int = 1024) -> int:
    """How many copies of a weight of nbytes make twice the last-level cache (at most cap)."""
    return max(1, min(cap, -(-2 * last_level_cache_bytes() // max(1, nbytes))))


class Rotating:
    """Calls fns[0], fns[1], ... in turn (each its own weights), so that on the CPU every call reads its weights
    from memory, as each layer of a decode step does after the other layers have gone through the caches."""

    def __init__(self, fns: list):
        self.fns, self.i = fns, 0

    def __call__(self, x):
        self.i = (self.i + 1) % len(self.fns)
        return self.fns[self.i](x)


def _vs_linear(a: BenchArgs, device, act, k: int, n: int, candidate, weight_bytes: int | None = None,
               copy_bw: float | None = None, make_candidate=None) -> list[dict]:
    """For each M: median time of candidate(x [M, K] in act) vs fp32 and bf16 nn.Linear(K, N), alternated in
    the same run. With copy_bw, also GB/s over weight_bytes + activations against the copy bandwidth. With
    a.cold (CPU), each of the three cycles through copies of its weights twice the last-level cache
    (make_candidate(i) builds the candidate's i-th copy)."""
    lin32 = torch.nn.Linear(k, n, bias=False, device=device)
    lin16 = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    if a.cold and device.type == "cpu":
        nbytes = weight_bytes or 1
        candidate = Rotating([candidate] + [make_candidate(i) for i in range(1, cpu_copies(nbytes))])
        lin32 = Rotating([lin32] + [torch.nn.Linear(k, n, bias=False) for _ in range(cpu_copies(4 * k * n) - 1)])
        lin16 = Rotating([lin16] + [torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
                                    for _ in range(cpu_copies(2 * k * n) - 1)])
        copy_bw = None
    rows = []
    for m in a.ms:
        x = torch.randn(m, k, device=device)
        xa, x16 = x.to(act), x.to(torch.bfloat16)
        with torch.inference_mode():
            t, t32, t16 = time_calls([lambda: candidate(xa), lambda: lin32(x), lambda: lin16(x16)],
                                     device, a.repeats, a.warmup, a.max_seconds)
        rows.append(_row(k, n, m, t, t32, t16, weight_bytes, m * k * xa.element_size(), copy_bw))
    return rows


def _row(k, n, m, t, t32, t16, weight_bytes, x_bytes, copy_bw, eager=None) -> dict:
    row = {"K": k, "N": n, "M": m, "packed_us": t * 1e6, "fp32_us": t32 * 1e6, "bf16_us": t16 * 1e6,
           "vs_fp32": t32 / t, "vs_bf16": t16 / t}
    if eager is not None:
        row["eager_us"] = eager * 1e6
    if copy_bw is not None:
        row["GB/s"] = (weight_bytes + x_bytes) / t / 1e9
        row["of_copy"] = row["GB/s"] / copy_bw
    print(format_row(row), flush=True)
    return row


def graph_time(fns: list, device: torch.device, replays: int = 10, rounds: int = 3) -> float:
    """Seconds per call with the CPU out of the way: fns called back to back inside one CUDA graph, the graph
    replayed; the median over rounds of total / (replays * len(fns)). Give each fn its own weights, together
    larger than the L2 cache, so that weights stream from device memory as in a model's forward."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # compile, autotune and allocate before capturing
        for fn in fns:
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (replays * len(fns)))
    del graph
    return statistics.median(times)


def copies_for(nbytes: int, device: torch.device, cap: int = 64) -> int:
    """How many copies of a weight of nbytes make twice the L2 cache (at most cap)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(cap, -(-2 * l2 // max(1, nbytes))))


def _vs_linear_cuda(a: BenchArgs, device, act, k: int, n: int, packed: PackedWeight, copy_bw: float) -> list[dict]:
    """CUDA: packed vs fp32 / bf16 nn.Linear, each timed in a CUDA graph over its own copies of the weights
    (graph_time), plus the packed call's eager time (do_bench: Python and launch overhead included)."""
    packs = [packed] + [PackedWeight(packed.spec, **{name: t.clone() for name, t in packed.tensors().items()})
                        for _ in range(copies_for(packed.nbytes, device) - 1)]
    lin32 = [torch.nn.Linear(k, n, bias=False, device=device) for _ in range(copies_for(4 * k * n, device))]
    lin16 = [torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
             for _ in range(copies_for(2 * k * n, device))]
    rows = []
    for m in a.ms:
        x = torch.randn(m, k, device=device)
        xa, x16 = x.to(act), x.to(torch.bfloat16)
        with torch.inference_mode():
            (eager,) = time_calls([lambda: packed_matmul(xa, packed)], device, a.repeats, a.warmup, a.max_seconds)
            try:
                t = graph_time([lambda p=p: packed_matmul(xa, p) for p in packs], device)
                t32 = graph_time([lambda lin=lin: lin(x) for lin in lin32], device)
                t16 = graph_time([lambda lin=lin: lin(x16) for lin in lin16], device)
            except RuntimeError as e:  # no graph capture: eager timings for all three, said so
                print(f"CUDA graph capture failed ({str(e).splitlines()[0]}); eager timings", flush=True)
                t, t32, t16 = time_calls([lambda: packed_matmul(xa, packed), lambda: lin32[0](x),
                                          lambda: lin16[0](x16)], device, a.repeats, a.warmup, a.max_seconds)
        rows.append(_row(k, n, m, t, t32, t16, packed.nbytes, m * k * xa.element_size(), copy_bw, eager))
    torch.cuda.empty_cache()
    return rows


def run(a: BenchArgs) -> list[dict]:
    device, act = _setup(a)
    copy_bw = copy_bandwidth(device) if device.type == "cuda" else None
    rows = []
    for k, n in a.shapes:
        spec = PackSpec(k, n, bits=a.bits, salient_bits=a.salient_bits, group_size=a.group_size,
                        salient_group_size=a.group_size)
        packed = random_packed(spec, a.salient_frac, a.device)
        if device.type == "cuda":
            rows += _vs_linear_cuda(a, device, act, k, n, packed, copy_bw)
        else:  # as served: a PackedLinear, its kernel (and the CPU's column-tiled layout) chosen at load
            layer = PackedLinear.from_packed(packed)
            print(f"{k} x {n}: kernel {layer.kernel_name}{' (column-tiled)' if layer.tiled else ''}"
                  f"{', integer path ' + str(int8_isa()) if layer.kernel_name == 'cpu-int8' else ''}", flush=True)
            rows += _vs_linear(a, device, act, k, n, layer, weight_bytes=packed.nbytes,
                               make_candidate=lambda i: PackedLinear.from_packed(
                                   random_packed(spec, a.salient_frac, a.device, seed=i)))
    if copy_bw is not None:
        print(f"\ncopy bandwidth ({torch.cuda.get_device_name(device)}): {copy_bw:.0f} GB/s")
    return rows


def run_half(a: BenchArgs) -> list[dict]:
    """half_matmul (x in fp32 on CPU, bf16 on CUDA; W in a.half_dtype) vs fp32 / bf16 nn.Linear, same run."""
    device, act = _setup(a)
    rows = []
    for k, n in a.shapes:
        w = (torch.randn(n, k, device=device) / k**0.5).to(getattr(torch, a.half_dtype))
        def make(i, k=k, n=n):
            wi = (torch.randn(n, k, device=device) / k**0.5).to(getattr(torch, a.half_dtype))
            return lambda xa: half_matmul(xa, wi)
        rows += _vs_linear(a, device, act, k, n, lambda xa: half_matmul(xa, w), weight_bytes=w.nbytes,
                           make_candidate=make)
    return rows


HEADER = "| K | N | M | packed us | fp32 us | bf16 us | fp32/packed | bf16/packed |"
HALF_HEADER = "| K | N | M | half us | fp32 us | bf16 us | fp32/half | bf16/half |"


def format_row(r: dict) -> str:
    s = (f"| {r['K']} | {r['N']} | {r['M']} | {r['packed_us']:.1f} | {r['fp32_us']:.1f} | {r['bf16_us']:.1f} | "
         f"{r['vs_fp32']:.2f}x | {r['vs_bf16']:.2f}x |")
    if "GB/s" in r:
        s += f" {r['GB/s']:.0f} | {100 * r['of_copy']:.0f}% | {r['eager_us']:.1f} |"
    return s


def parse_args(argv: list[str] | None = None) -> BenchArgs:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", default=None,
                   help="comma list of sets (" + ", ".join(SHAPE_SETS) + ") and/or KxN pairs, e.g. 4096x4096 "
                        "(default: smollm2, or lm_head with --half)")
    p.add_argument("--ms", default="1,4,16,256,2048", help="comma list of M (rows of x)")
    p.add_argument("--repeats", type=int, default=BenchArgs.repeats)
    p.add_argument("--warmup", type=int, default=BenchArgs.warmup)
    p.add_argument("--max-seconds", type=float, default=BenchArgs.max_seconds)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--bits", type=int, default=BenchArgs.bits)
    p.add_argument("--salient-bits", type=int, default=BenchArgs.salient_bits)
    p.add_argument("--group-size", type=int, default=BenchArgs.group_size)
    p.add_argument("--salient-frac", type=float, default=BenchArgs.salient_frac)
    p.add_argument("--act-dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--half", action="store_true",
                   help="time kernels.half_linear.half_matmul (16-bit weight) instead of the packed kernel")
    p.add_argument("--half-dtype", default=BenchArgs.half_dtype, choices=["bfloat16", "float16"],
                   help="weight dtype for --half")
    p.add_argument("--cold", action="store_true",
                   help="CPU: each candidate cycles through copies of its weights twice the last-level cache, so "
                        "weights come from memory as in a decode step (default: the same weights every call)")
    ns = p.parse_args(argv)
    shapes: list[tuple[int, int]] = []
    for item in (ns.shapes or ("lm_head" if ns.half else "smollm2")).split(","):
        item = item.strip()
        if item in SHAPE_SETS:
            shapes += SHAPE_SETS[item]
        else:
            k, n = item.lower().split("x")
            shapes.append((int(k), int(n)))
    return BenchArgs(device=ns.device, shapes=tuple(shapes), ms=tuple(int(m) for m in ns.ms.split(",")),
                     repeats=ns.repeats, warmup=ns.warmup, max_seconds=ns.max_seconds, threads=ns.threads,
                     bits=ns.bits, salient_bits=ns.salient_bits, group_size=ns.group_size,
                     salient_frac=ns.salient_frac, act_dtype=ns.act_dtype, half=ns.half, half_dtype=ns.half_dtype,
                     cold=ns.cold)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.half:
        print(f"half_matmul, weight {a.half_dtype}, "
              f"threads={torch.get_num_threads() if a.threads is None else a.threads}, device={a.device}\n")
        print(HALF_HEADER)
        print("|" + "---|" * (HALF_HEADER.count("|") - 1))
        run_half(a)
        return
    header = HEADER + (" GB/s | of copy BW | packed eager us |" if a.device == "cuda" else "")
    print(f"packed b={a.bits} h={a.salient_bits} gs={a.group_size} salient={a.salient_frac:.0%}, "
          f"threads={torch.get_num_threads() if a.threads is None else a.threads}, device={a.device}"
          + (f", weights from memory (copies over 2 x {last_level_cache_bytes() >> 20} MiB)" if a.cold else "")
          + "\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    run(a)


if __name__ == "__main__":
    main()
