"""mamp quantize / python -m mamp.quantizer MODEL --out DIR [...]: quantize a Llama-family HF model into a mamp checkpoint."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mamp.quantizer.config import (ALLOCATIONS, ASSIGNS, BITS, BUDGET_SCOPES, KEEP_DTYPES, MAX_BUDGET, METHODS,
                                   SALIENT_BITS, QuantSpec, SpecError, parse_bits)

DEFAULTS = QuantSpec.build()


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2 (argparse prints usage too)
        raise UsageError(message)


def build_parser(prog: str = "python -m mamp.quantizer") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=__doc__.split(":", 1)[1].strip())
    p.add_argument("model", help="local HF folder or hub id (Llama, Mistral, Qwen2, SmolLM)")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--method", choices=METHODS, default=DEFAULTS.method)
    p.add_argument("--bits", default=str(DEFAULTS.bits),
                   help=f"a width for every layer ({', '.join(map(str, BITS))}), or any other number up to {MAX_BUDGET}: "
                        "a budget in bits per weight, met with per-layer widths (for example 3.0 or 2.5)")
    p.add_argument("--budget-scope", choices=BUDGET_SCOPES, default=DEFAULTS.budget_scope,
                   help="what a budget counts: the decoder's linear layers, or the whole file (embeddings, lm_head, "
                        "norms too; the lm_head keeps --head-bits)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=DEFAULTS.allocation,
                   help="how a budget picks the widths: measured per-layer sensitivity (KL on calibration tokens), or "
                        "a llama.cpp-like rule")
    p.add_argument("--sensitivity", type=Path, default=None,
                   help="sensitivity table (JSON): read it if the file exists, else measure and write it (reuse one "
                        "across budgets)")
    p.add_argument("--sensitivity-tokens", type=int, default=DEFAULTS.sensitivity_tokens,
                   help="calibration tokens each unit's KL is measured on")
    p.add_argument("--salient-bits", type=int, choices=SALIENT_BITS, default=None,
                   help="width of a salient code, each the mean of salient_bits/bits weights (default: bits; "
                        "the paper's encoding is --bits 2 --salient-bits 8)")
    p.add_argument("--salient-fraction", type=float, default=None,
                   help="salient groups per 16-row block as a fraction of out_features (default 0.25 at 2 bits, "
                        "0.05 at 4 bits)")
    p.add_argument("--top-k", type=int, default=None, help="salient groups per 16-row block (instead of a fraction)")
    p.add_argument("--assign", choices=ASSIGNS, default=None,
                   help="saliency: top-K groups per 16-row block get the salient grid (the paper); error: start there, "
                        "then give each group the grid with the lower Hessian-weighted rounding error (default for mamp)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="least-squares refit of the scales after the solver (default: on for mamp, off for gptq/rtn)")
    p.add_argument("--keep-dtype", choices=KEEP_DTYPES, default=DEFAULTS.keep_dtype,
                   help="dtype of the tensors left unquantized (embeddings, lm_head, norms)")
    p.add_argument("--head-bits", type=int, choices=(0, *BITS), default=None,
                   help="pack the lm_head too at this width (round-to-nearest with clipping; a tied embedding reads "
                        "the same packed copy); 0 keeps it in --keep-dtype (default: 8 for mamp, 0 for gptq/rtn)")
    p.add_argument("--calib", default=DEFAULTS.calib, help="calibration text file, or c4")
    p.add_argument("--sink-weight", type=float, default=None,
                   help="weight of each calibration window's first token (the attention sink) in the Hessians, "
                        "against 1 for the others (default: --seqlen for mamp, 1 for gptq/rtn)")
    p.add_argument("--nsamples", type=int, default=DEFAULTS.nsamples)
    p.add_argument("--seqlen", type=int, default=DEFAULTS.seqlen)
    p.add_argument("--group-size", type=int, default=DEFAULTS.group_size)
    p.add_argument("--salient-group-size", type=int, default=DEFAULTS.salient_group_size)
    p.add_argument("--no-mse-clip", action="store_true", help="grids span min..max (no clipping search)")
    p.add_argument("--no-true-sequential", action="store_true",
                   help="collect all Hessians of a layer before quantizing any of its linears")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def spec_from_args(a) -> QuantSpec:
    if a.method != "mamp" and (a.salient_fraction is not None or a.top_k is not None or a.salient_bits is not None):
        raise SpecError(f"--salient-bits/--salient-fraction/--top-k only apply to --method mamp, not {a.method}")
    if a.salient_fraction is not None and a.top_k is not None:
        raise SpecError("give --salient-fraction or --top-k, not both")
    kw = {}
    if a.salient_fraction is not None:
        kw["salient_fraction"] = a.salient_fraction
    bits, budget = parse_bits(a.bits)
    if budget is None and (a.sensitivity is not None or a.allocation != DEFAULTS.allocation
                           or a.budget_scope != DEFAULTS.budget_scope):
        raise SpecError("--allocation, --budget-scope and --sensitivity need a budget (--bits 3.0, for example)")
    return QuantSpec.build(method=a.method, bits=bits, budget=budget, budget_scope=a.budget_scope,
                     allocation=a.allocation, sensitivity_tokens=a.sensitivity_tokens,
                     salient_bits=a.salient_bits, top_k=a.top_k,
                     group_size=a.group_size, salient_group_size=a.salient_group_size, mse_clip=not a.no_mse_clip,
                     true_sequential=not a.no_true_sequential, calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen,
                     seed=a.seed, assign=a.assign, keep_dtype=a.keep_dtype, refit=a.refit, head_bits=a.head_bits,
                     sink_weight=a.sink_weight, **kw)


def run(a) -> int:
    import torch

    from mamp.quantizer.calibration import calibration_windows, load_text
    from mamp.kernels.checkpoint import check_output, remove_stale_temporaries
    from mamp.quantizer.export import save_quantized
    from mamp.quantizer.pipeline import check_model, quantize_model
    from mamp.quantizer.report import format_summary, summarize

    spec = spec_from_args(a)
    check_output(a.out, a.overwrite)
    for stale in remove_stale_temporaries(a.out):
        print(f"removed {stale}: an unfinished write of an earlier run")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device cuda but no CUDA device is available")
    if spec.method != "rtn" and spec.calib != "c4":
        load_text(spec.calib)  # fail on an unreadable file before loading the model
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # keep stderr for our progress bar and a one-line error
    hf_logging.disable_progress_bar()

    try:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(a.model)
    except (OSError, ValueError, KeyError) as e:
        raise OSError(f"cannot load model {a.model}: {str(e).splitlines()[0] if str(e) else e.__class__.__name__}") from None
    check_model(model)
    windows = None
    if spec.method != "rtn":
        windows = calibration_windows(tok, spec.calib, spec.nsamples, spec.seqlen, spec.seed)
    widths, extra = None, {}
    if spec.budget is not None:
        widths, extra = allocate_widths(model, spec, windows, a.sensitivity, a.device)
    qm = quantize_model(model, spec, windows, device=a.device, widths=widths)
    summary = summarize(qm, seconds=time.time() - t0)
    summary["model"] = a.model
    if spec.budget is not None:
        from mamp.quantizer.allocation import describe
        from mamp.quantizer.sensitivity import model_kl

        summary["widths"] = describe(extra["units"], widths)
        summary["layer_widths"] = {f"{li}.{st}": w for (li, st), w in widths.items()}
        summary["predicted_kl"] = extra.get("predicted")
        summary["measured_kl"] = model_kl(model, extra["ev"], extra["ref"], a.device)
        summary["kl_tokens"] = int(extra["ev"].numel())
    save_quantized(qm, tok, a.out, overwrite=a.overwrite, report=summary)
    print(format_summary(summary))
    print(f"wrote {a.out}")
    return 0


def allocate_widths(model, spec: QuantSpec, windows, sensitivity_path: Path | None, device):
    """Per-unit widths under spec.budget: (widths, {units, ev, ref, predicted}) where ev/ref are the calibration
    windows and float log-probs the finished model's KL is measured on."""
    import torch

    from mamp.quantizer.allocation import BudgetError, allocate, check_budget, rule_allocation
    from mamp.quantizer.pipeline import units_of
    from mamp.quantizer.report import fixed_bits
    from mamp.quantizer.sensitivity import Sensitivity, eval_windows, format_table, log_probs, measure_sensitivity

    units = units_of(model)
    budget = spec.budget
    if spec.budget_scope == "model":  # what the linears may use once everything else is stored
        linear = sum(u.weights for u in units)
        names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                 and n.startswith("model.layers.")}
        other_bits, other = fixed_bits(model, spec, names)
        budget = (spec.budget * (linear + other) - other_bits) / linear
        if budget <= 0:
            raise BudgetError(f"a budget of {spec.budget:g} bits per weight over the whole model leaves nothing for "
                              f"the linear layers (the rest takes {other_bits / (linear + other):.4f})")
        try:
            check_budget(units, budget)
        except BudgetError:
            least = (sum(u.stored_bits(min(BITS)) for u in units) + other_bits) / (linear + other)
            raise BudgetError(f"a budget of {spec.budget:g} bits per weight over the whole model is below the "
                              f"smallest it can be stored in ({least:.4f}: every layer at {min(BITS)} bits)") from None
    check_budget(units, budget)
    if windows is None:
        raise SpecError("a bit budget needs calibration data (not --method rtn)")
    extra = {"units": units}
    if spec.allocation == "rule":
        widths = rule_allocation(units, budget)
        extra["ev"] = eval_windows(windows, spec.sensitivity_tokens)
        extra["ref"] = log_probs(model, extra["ev"], device)
        return widths, extra
    if sensitivity_path is not None and sensitivity_path.exists():
        table = Sensitivity.load(sensitivity_path, units)
        print(f"sensitivity: read {sensitivity_path}")
        extra["ev"] = eval_windows(windows, spec.sensitivity_tokens)
        extra["ref"] = log_probs(model, extra["ev"], device)
    else:
        table, extra["ev"], extra["ref"] = measure_sensitivity(model, spec, windows, device)
        print(format_table(table))
        print(f"sensitivity: {table.seconds:.0f} s")
        if sensitivity_path is not None:
            table.save(sensitivity_path)
            print(f"sensitivity: wrote {sensitivity_path}")
    widths = allocate(units, table.error, budget)
    extra["predicted"] = table.predicted(widths)
    return widths, extra


def main(argv: list[str] | None = None, prog: str = "python -m mamp.quantizer") -> int:
    from mamp.quantizer.calibration import CalibrationError
    from mamp.kernels.checkpoint import CheckpointError
    from mamp.quantizer.allocation import BudgetError
    from mamp.quantizer.pipeline import UnsupportedModel

    try:
        args = build_parser(prog).parse_args(argv)
        return run(args)
    except (UsageError, SpecError, BudgetError, CalibrationError, CheckpointError, UnsupportedModel, OSError) as e:
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
