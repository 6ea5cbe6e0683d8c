"""Layer-output error of single SmolLM2 layers per quantization variant, as a fraction of GPTQ's.

    python benchmarks/layer_proxy.py [--model DIR] [--bits 2] [--fraction 0.25] [--layers 2,15,28]

Hessians come from the float model (32 x 512 calibration tokens of WikiText-2 valid); the error is
trace((W - Q) H (W - Q)^T) (quantizer.solver.proxy_loss). Cheap (minutes): used to choose solver defaults.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mamp.kernels.packing import PackSpec  # noqa: E402
from mamp.quantizer.calibration import calibration_windows  # noqa: E402
from mamp.quantizer.pipeline import HessianAccumulator, LayerStages, capture_inputs, decoder_layers  # noqa: E402
from mamp.quantizer.saliency import group_saliency, top_k_mask  # noqa: E402
from mamp.quantizer.solver import hinv_diagonal, proxy_loss, solve  # noqa: E402

GROUPS = [(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), 0), (("self_attn.o_proj",), 1),
          (("mlp.gate_proj", "mlp.up_proj"), 2), (("mlp.down_proj",), 3)]


def layer_hessians(model_dir: str, nsamples: int, wanted: set[int]):
    """Yield (layer index, linear names, W [N, K] fp32, H [K, K]) for each linear group of the wanted layers,
    Hessians from the float model's inputs (nsamples x 512 calibration tokens of WikiText-2 valid)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    win = calibration_windows(tok, str(ROOT.parent / "shared/assets/wikitext-2/valid.txt"), nsamples, 512, 0)
    with torch.no_grad():
        x, kw = capture_inputs(model, win, "cpu")
        for li, layer in enumerate(decoder_layers(model)):
            if li > max(wanted):
                break
            st = LayerStages(layer, kw)
            if li in wanted:
                accs = [HessianAccumulator(layer.get_submodule(g[0][0]).in_features, "cpu") for g in GROUPS]
            for s in range(x.shape[0]):
                *inputs, x[s:s + 1] = st.linear_inputs(x[s:s + 1])
                if li in wanted:
                    for acc, inp in zip(accs, inputs):
                        acc.add(inp)
            if li in wanted:
                for (names, _), acc in zip(GROUPS, accs):
                    yield li, names, torch.cat([layer.get_submodule(n).weight.detach().float() for n in names]), acc.h


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(Path.home() / ".cache" / "mamp" / "SmolLM2-135M-Instruct"))
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--fraction", type=float, default=0.25)
    p.add_argument("--layers", default="2,15,28")
    a = p.parse_args()
    torch.set_num_threads(1)
    print("| layer | linears | GPTQ + refit | saliency + refit | error (default) + refit |\n|---|---|---|---|---|")
    with torch.no_grad():
        for li, names, w, h in layer_hessians(a.model, 32, {int(x) for x in a.layers.split(",")}):
            spec = PackSpec(w.shape[1], w.shape[0], bits=a.bits, salient_bits=a.bits)
            sal = top_k_mask(group_saliency(w, hinv_diagonal(h, 0.01)), round(a.fraction * w.shape[0]))
            base = proxy_loss(w, solve(w, h, spec, None, mse_clip=True).weight, h)
            got = [proxy_loss(w, solve(w, h, spec, m, mse_clip=True, assign=asg, refit=True).weight, h) / base
                   for m, asg in ((None, "saliency"), (sal, "saliency"), (sal, "error"))]
            print(f"| {li} | {'/'.join(n.split('.')[-1] for n in names)} | "
                  + " | ".join(f"{g:.3f}" for g in got) + " |", flush=True)


if __name__ == "__main__":
    main()
