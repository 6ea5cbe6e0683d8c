"""The clipping search's speed/quality trade: coarse-to-fine (solve(..., clip_coarse=4)) vs all 40 candidates.

    python benchmarks/clip_search.py [--model DIR] [--layers 2,15] [--coarse 4] [--nsamples 16]

For each linear group of the chosen SmolLM2 layers (Hessians from the float model, nsamples x 512 calibration
tokens of WikiText-2 valid) and b in {2, 4}, solves with mamp's defaults (error assignment, refit) twice, once
with every candidate shrink factor and once coarse to fine, alternately, one thread, and prints the layer
error trace((W - Q) H (W - Q)^T) ratio and the solve times.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.layer_proxy import layer_hessians  # noqa: E402
from mamp.kernels.packing import PackSpec  # noqa: E402
from mamp.quantizer import solver  # noqa: E402
from mamp.quantizer.saliency import group_saliency, top_k_mask  # noqa: E402

FRACTION = {2: 0.25, 4: 0.05}  # the defaults' start fractions


def timed_solve(w, h, spec, sal, coarse: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    q = solver.solve(w, h, spec, sal, mse_clip=True, assign="error", refit=True, clip_coarse=coarse).weight
    return solver.proxy_loss(w, q, h), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(Path.home() / ".cache" / "mamp" / "SmolLM2-135M-Instruct"))
    p.add_argument("--layers", default="2,15")
    p.add_argument("--coarse", type=int, default=solver.CLIP_COARSE)
    p.add_argument("--nsamples", type=int, default=16)
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"| layer | linears | b | error coarse {a.coarse} / all | all s | coarse s | speed-up |\n"
          "|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for li, names, w, h in layer_hessians(a.model, a.nsamples, {int(x) for x in a.layers.split(",")}):
            for bits in (2, 4):
                spec = PackSpec(w.shape[1], w.shape[0], bits=bits, salient_bits=bits)
                sal = top_k_mask(group_saliency(w, solver.hinv_diagonal(h, 0.01)), round(FRACTION[bits] * w.shape[0]))
                e_all, t_all = timed_solve(w, h, spec, sal, 1)
                e_cf, t_cf = timed_solve(w, h, spec, sal, a.coarse)
                print(f"| {li} | {'/'.join(n.split('.')[-1] for n in names)} | {bits} | {e_cf / e_all:.4f} | "
                      f"{t_all:.1f} | {t_cf:.1f} | {t_all / t_cf:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
