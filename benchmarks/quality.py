"""Quality sweep: perplexity, exact bits per weight, quantization time and peak memory per method.

    python benchmarks/quality.py [--model DIR] [--protocol reference|full] [--only NAME ...] [--out FILE.md]

Protocols (WikiText-2; calibration on the validation split, never on the test split):
  reference  32 x 512 calibration tokens, first 20,480 test tokens at context 1024 (cheap; used to choose defaults)
  full       128 x 2048 calibration tokens, the whole test split at context 2048 (the issue's protocol)

Each configuration runs in its own process (so peak memory is its own); results are appended as JSON lines to
FILE.jsonl and the markdown table is rewritten to FILE.md after every run. The quantized model is evaluated
fake-quantized (its weights are dequantize(packed), equal to what load_checkpoint serves; see the tests).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "assets"
DEFAULT_MODEL = Path.home() / ".cache" / "mamp" / "SmolLM2-135M-Instruct"
CALIB = SHARED / "wikitext-2" / "valid.txt"
TEST = SHARED / "wikitext-2-raw" / "test.txt"
PROTOCOLS = {
    "reference": dict(nsamples=32, seqlen=512, eval_seqlen=1024, max_tokens=20480),
    "full": dict(nsamples=128, seqlen=2048, eval_seqlen=2048, max_tokens=None),
}

# name -> QuantSpec overrides (None: the float model). "paper" is METHOD.md's encoding: h = 8 at b = 2.
CONFIGS: dict[str, dict | None] = {
    "float": None,
    "rtn-b2": dict(method="rtn", bits=2),
    "gptq-b2": dict(method="gptq", bits=2),
    "gptq-b2-g64": dict(method="gptq", bits=2, group_size=64, salient_group_size=1 << 20),
    "paper-b2-h8-2.4%": dict(method="mamp", assign="saliency", refit=False, bits=2, salient_bits=8, salient_fraction=0.024),
    "paper-b2-h8-5%": dict(method="mamp", assign="saliency", refit=False, bits=2, salient_bits=8, salient_fraction=0.05),
    "paper-b2-h8-10%": dict(method="mamp", assign="saliency", refit=False, bits=2, salient_bits=8, salient_fraction=0.10),
    "mamp-b2-h2-2.4%": dict(method="mamp", assign="saliency", refit=False, bits=2, salient_bits=2, salient_fraction=0.024),
    "mamp-b2-h2-5%": dict(method="mamp", assign="saliency", refit=False, bits=2, salient_bits=2, salient_fraction=0.05),
    "mamp-b2-h2-10%": dict(method="mamp", assign="saliency", refit=False, bits=2, salient_bits=2, salient_fraction=0.10),
    "mamp-b2-h2-25%": dict(method="mamp", assign="saliency", refit=False, bits=2, salient_bits=2, salient_fraction=0.25),
    "mamp-b2-h2-50%": dict(method="mamp", assign="saliency", refit=False, bits=2, salient_bits=2, salient_fraction=0.50),
    "gptq-b2-noclip": dict(method="gptq", bits=2, mse_clip=False),
    "mamp-b2-h2-25%-noclip": dict(method="mamp", assign="saliency", refit=False, bits=2, salient_bits=2, salient_fraction=0.25, mse_clip=False),
    "mamp-b2-h4-5%": dict(method="mamp", assign="saliency", refit=False, bits=2, salient_bits=4, salient_fraction=0.05),
    "mamp-b2-h4-25%": dict(method="mamp", assign="saliency", refit=False, bits=2, salient_bits=4, salient_fraction=0.25),
    "mamp-b2-err-25%": dict(method="mamp", bits=2, salient_bits=2, salient_fraction=0.25, assign="error", refit=False),
    "mamp-b2-err-10%": dict(method="mamp", bits=2, salient_bits=2, salient_fraction=0.10, assign="error", refit=False),
    "gptq-b2-refit": dict(method="gptq", bits=2, refit=True),
    "mamp-b2": dict(method="mamp", bits=2),  # the defaults
    "mamp-b2-start-10%": dict(method="mamp", bits=2, salient_fraction=0.10),  # the defaults, 10 % start mask
    "rtn-b4": dict(method="rtn", bits=4),
    "gptq-b4": dict(method="gptq", bits=4),
    "paper-b4-h8-5%": dict(method="mamp", assign="saliency", refit=False, bits=4, salient_bits=8, salient_fraction=0.05),
    "mamp-b4-h4-5%": dict(method="mamp", assign="saliency", refit=False, bits=4, salient_bits=4, salient_fraction=0.05),
    "mamp-b4-h4-25%": dict(method="mamp", assign="saliency", refit=False, bits=4, salient_bits=4, salient_fraction=0.25),
    "gptq-b4-refit": dict(method="gptq", bits=4, refit=True),
    "mamp-b4": dict(method="mamp", bits=4),  # the defaults
    "mamp-b8": dict(method="mamp", bits=8),
    "mamp-b4-sink64": dict(method="mamp", bits=4, sink_weight=64.0),
    "mamp-b4-sink512": dict(method="mamp", bits=4, sink_weight=512.0),
    "mamp-b2-sink512": dict(method="mamp", bits=2, sink_weight=512.0),
    "gptq-b4-sink512": dict(method="gptq", bits=4, sink_weight=512.0),
    "gptq-b8": dict(method="gptq", bits=8),
    "rtn-b8": dict(method="rtn", bits=8),
}
# Bit budgets (issue 17): per-layer widths by measured sensitivity (one table per protocol, measured by the first
# budget run and reused), and the llama.cpp-like rule at two budgets for comparison.
BUDGETS = (2.25, 2.5, 3.0, 3.5, 4.5, 5.5, 6.5, 8.5)
CONFIGS.update({f"mamp-{b}": dict(method="mamp", budget=b) for b in BUDGETS})
CONFIGS.update({f"rule-{b}": dict(method="mamp", budget=b, allocation="rule") for b in (3.0, 4.5, 6.5)})
CURVE_SET = (["float"] + [f"{m}-b{b}" for m in ("gptq", "rtn") for b in (2, 4, 8)] + [f"mamp-{b}" for b in BUDGETS]
             + [f"rule-{b}" for b in (3.0, 4.5, 6.5)])
FULL_SET = ["float", "gptq-b2", "paper-b2-h8-5%", "mamp-b2", "gptq-b4", "mamp-b4"]


def run_single(model_dir: str, name: str, overrides: dict | None, protocol: str, threads: int) -> dict:
    """Quantize (fake-quant, in memory) and evaluate one configuration in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from mamp.quantizer.calibration import calibration_windows
    from mamp.quantizer.config import QuantSpec
    from mamp.quantizer.eval import perplexity, tokenize_file
    from mamp.quantizer.pipeline import quantize_model
    from mamp.quantizer.report import peak_memory_bytes, summarize

    torch.set_num_threads(threads)
    proto = PROTOCOLS[protocol]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    row = {"name": name, "protocol": protocol, "bits_per_weight": 16.0, "quant_seconds": 0.0}
    if overrides is not None:
        spec = QuantSpec.build(calib=str(CALIB), nsamples=proto["nsamples"], seqlen=proto["seqlen"], **overrides)
        t0 = time.time()
        windows = None if spec.method == "rtn" else calibration_windows(tok, spec.calib, spec.nsamples, spec.seqlen, spec.seed)
        widths = None
        if spec.budget is not None:  # the quantizer CLI's own allocation, the sensitivity table shared per protocol
            from mamp.quantizer.__main__ import allocate_widths
            sens = ROOT / "benchmarks" / "results" / f"sensitivity-{Path(model_dir).name}-{protocol}.json"
            widths, extra = allocate_widths(model, spec, windows, sens, "cpu")
            row["widths"] = {f"{li}.{st}": w for (li, st), w in widths.items()}
            row["predicted_kl"] = extra.get("predicted")
        qm = quantize_model(model, spec, windows, progress=False, widths=widths)
        s = summarize(qm, seconds=time.time() - t0)
        if spec.budget is not None:
            from mamp.quantizer.sensitivity import model_kl
            row["measured_kl"] = model_kl(model, extra["ev"], extra["ref"], "cpu")
        row.update(decoder_bits_per_weight=s["decoder_bits_per_weight"],
                   model_bits_per_weight=8 * s["model_bytes"] / s["model_weights"])
        row.update(spec=spec.to_dict(), bits_per_weight=s["bits_per_weight"], quant_seconds=s["seconds"],
                   quantized_bytes=s["quantized_bytes"], quantized_bytes_bf16=s["quantized_bytes_bf16"],
                   model_bytes=s["model_bytes"], model_bytes_bf16=s["model_bytes_bf16"],
                   salient=s["salient_group_fraction_by_type"])
    row["peak_memory_quant_bytes"] = peak_memory_bytes()
    t0 = time.time()
    tokens = tokenize_file(tok, TEST, proto["max_tokens"])
    ppl, count = perplexity(model, tokens, proto["eval_seqlen"], progress=False)
    row.update(perplexity=ppl, scored_tokens=count, eval_seconds=time.time() - t0, peak_memory_bytes=peak_memory_bytes())
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| config | protocol | bits/weight (all metadata) | perplexity | quant time (s) | peak memory (GiB) | "
            "scored tokens |\n|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['name']} | {r['protocol']} | {r['bits_per_weight']:.4f} | {r['perplexity']:.4g} | "
        f"{r['quant_seconds']:.0f} | {r['peak_memory_bytes'] / (1 << 30):.2f} | {r['scored_tokens']} |\n" for r in rows)
    return head + body


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="reference")
    p.add_argument("--only", nargs="*", default=None, help=f"config names (default: all; full protocol: {FULL_SET})")
    p.add_argument("--curve", action="store_true", help="the bits-vs-quality curve's configs (issue 17)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality.md")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    p.add_argument("--extra", default=None, help="JSON of extra configs {name: overrides}")
    a = p.parse_args(argv)
    configs = dict(CONFIGS)
    if a.extra:
        configs.update(json.loads(a.extra))
    if a.single:
        from mamp.quantizer.allocation import BudgetError
        try:
            row = run_single(a.model, a.single, configs[a.single], a.protocol, a.threads)
        except BudgetError as e:  # a budget below what the model can be stored in: say so, no row
            row = {"name": a.single, "error": str(e)}
        print("RESULT " + json.dumps(row))
        return 0
    if not Path(a.model).exists() or not TEST.exists():
        print(f"skip: need {a.model} and {TEST}", file=sys.stderr)
        return 0
    names = a.only or (CURVE_SET if a.curve else FULL_SET if a.protocol == "full" else list(configs))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = a.out.with_suffix(".jsonl")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    for name in names:
        cmd = [sys.executable, __file__, "--model", a.model, "--protocol", a.protocol, "--single", name,
               "--threads", str(a.threads)] + (["--extra", a.extra] if a.extra else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(lines[-1][7:])
        if "error" in row:
            print(f"{name}: {row['error']}", flush=True)
            continue
        rows.append(row)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        a.out.write_text(markdown(rows))
        print(f"{name}: bpw {row['bits_per_weight']:.4f}  ppl {row['perplexity']:.4g}  quant {row['quant_seconds']:.0f} s  "
              f"peak {row['peak_memory_bytes'] / (1 << 30):.2f} GiB", flush=True)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
