"""A/B of the CPU packed kernel: the working tree's extension against the one at a git revision, same weights.

    python benchmarks/cpu_kernel_ab.py --rev HEAD --threads 1 --bits 2 --salient-bits 2 --salient-frac 0.3
    python benchmarks/cpu_kernel_ab.py --rev HEAD --kernel int8 --bits 4 --salient-bits 4 --salient-frac 0.08

Builds the extension's sources (kernels/cpu_*.cpp and cpu_layout.h) as they are at --rev into a scratch folder
under a name of its own, checks both give the same product, then times them alternately with torch's fp32
nn.Linear of the same shape (benchmarks/kernels.py's round-robin timer). --kernel float: the float-activation
kernel on the stored layout; int8: the integer kernel on the column-tiled layout, as the server runs it. Prints a
markdown table; old/new > 1: the tree is faster.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.kernels import SHAPE_SETS, random_packed, time_calls  # noqa: E402
from mamp.kernels import cpu_layout, cpu_matmul  # noqa: E402
from mamp.kernels.packing import PackSpec  # noqa: E402

SOURCES = ("kernels/cpu_matmul.cpp", "kernels/cpu_half_matmul.cpp", "kernels/cpu_int8_matmul.cpp",
           "kernels/cpu_decode_layer.cpp", "kernels/cpu_layout.h")


KERNEL = "float"
BASELINE: list = [None]


def build_at(rev: str):
    """The CPU extension compiled from the sources at git revision rev."""
    from torch.utils.cpp_extension import load

    texts = [subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{s}"], check=True, capture_output=True,
                            text=True).stdout for s in SOURCES]
    # Its registered ops and classes under a namespace of their own: the tree's extension holds torch.ops.mamp.
    texts = [t.replace("TORCH_LIBRARY_FRAGMENT(mamp,", "TORCH_LIBRARY_FRAGMENT(mamp_ab,")
             .replace("TORCH_LIBRARY_IMPL(mamp,", "TORCH_LIBRARY_IMPL(mamp_ab,") for t in texts]
    tag = hashlib.sha1("".join(texts).encode()).hexdigest()[:10]
    build = Path(tempfile.gettempdir()) / f"mamp_cpu_ab_{tag}"
    build.mkdir(exist_ok=True)
    paths = []
    for s, text in zip(SOURCES, texts):
        (build / Path(s).name).write_text(text)
        if s.endswith(".cpp"):
            paths.append(str(build / Path(s).name))
    _, flags = cpu_matmul._arch_flags()
    return load(name=f"mamp_cpu_ab_{tag}", sources=paths, build_directory=str(build),
                extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"], verbose=False)


def call(ext, x, p):
    s = p.spec
    if KERNEL == "int8":  # a registered op only: the tree's under torch.ops.mamp, the baseline's under mamp_ab
        op = torch.ops.mamp_ab if ext is BASELINE[0] else torch.ops.mamp
        return op.packed_linear_int8_cpu(x, p.qweight, p.bitmap, p.scales, p.zeros, p.hscales, p.hzeros, None, s.bits,
                                      s.salient_bits, s.group_size, s.salient_group_size, cpu_matmul.ACT_BLOCK,
                                      cpu_matmul.INT8_MAX_M, cpu_matmul.SCRATCH_BYTES)
    return ext.packed_linear(x, p.qweight, p.bitmap, p.scales, p.zeros, p.hscales, p.hzeros, None, None, s.bits,
                             s.salient_bits, s.group_size, s.salient_group_size, cpu_matmul.SMALL_M,
                             cpu_matmul.SCRATCH_BYTES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", default="HEAD", help="git revision of the baseline kernel")
    p.add_argument("--shapes", default="smollm2", help=f"one of {sorted(SHAPE_SETS)}")
    p.add_argument("--ms", default="1,4,16")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--salient-bits", type=int, default=2)
    p.add_argument("--salient-frac", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--kernel", default="float", choices=["float", "int8"])
    a = p.parse_args(argv)
    global KERNEL
    KERNEL = a.kernel
    torch.set_num_threads(a.threads)
    new, old = cpu_matmul.load_extension(), build_at(a.rev)
    BASELINE[0] = old
    if new is None:
        print(f"the working tree's extension does not build: {cpu_matmul.ext_error()}", file=sys.stderr)
        return 1
    isa = cpu_matmul.int8_isa() if a.kernel == "int8" else "float kernel"
    print(f"b = {a.bits}, h = {a.salient_bits}, {a.salient_frac:.0%} salient groups, {a.threads} thread(s), "
          f"baseline {a.rev}, {a.kernel} ({isa})\n")
    print("| K×N | M | baseline µs | tree µs | baseline/tree | fp32 Linear µs | fp32/tree |\n|---|---|---|---|---|---|---|")
    cpu = torch.device("cpu")
    for k, n in SHAPE_SETS[a.shapes]:
        spec = PackSpec(k, n, bits=a.bits, salient_bits=a.salient_bits, group_size=128, salient_group_size=128)
        packed = random_packed(spec, a.salient_frac, "cpu")
        if a.kernel == "int8":
            packed = cpu_layout.tile(packed)
        lin = torch.nn.Linear(k, n, bias=False)
        for m in map(int, a.ms.split(",")):
            x = torch.randn(m, k)
            torch.testing.assert_close(call(new, x, packed), call(old, x, packed), rtol=1e-4, atol=1e-3)
            with torch.inference_mode():
                t_old, t_new, t_lin = time_calls([lambda: call(old, x, packed), lambda: call(new, x, packed),
                                                  lambda: lin(x)], cpu, a.repeats, 3, 2.0)
            print(f"| {k}×{n} | {m} | {t_old * 1e6:.0f} | {t_new * 1e6:.0f} | {t_old / t_new:.2f}x | "
                  f"{t_lin * 1e6:.0f} | {t_lin / t_new:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
