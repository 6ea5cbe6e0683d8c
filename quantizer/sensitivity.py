"""Measured sensitivity: what each unit's width costs the model's output, for the budget allocation.

For every unit (a decoder layer's q/k/v, o, gate/up, down; quantizer/allocation.py) and every width, the unit
alone is quantized with the pipeline's own solver (Hessian from the float model's inputs to that layer) and
    proxy[unit][w]  = tr(dW H dW^T), the Hessian-weighted error of the unit's outputs (what GPTQ minimises), and,
    for the widths below the largest, the KL divergence of the model's next-token distribution from the float
    model's on `tokens` calibration tokens, with only that unit quantized (the rest of the model float).
The largest width's KL, too small to measure above the noise of fp32 arithmetic, is the next width's KL times
the proxy ratio (the error energy a unit passes on scales its KL to first order). Units are scored one at a
time, so the sum over units is a prediction; the quantizer reports it next to the KL it measures at the end.

Cost (SmolLM2-135M, 2 cores): the solves of every width (about two minutes of one core each, run in two worker
processes) plus one tail forward (from the unit's layer through the lm_head) per unit and measured width on 1,024
tokens.
"""
from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mamp.kernels.packing import BITS
from mamp.quantizer.allocation import STAGE_KEYS, Unit
from mamp.quantizer.config import QuantSpec

SENSITIVITY_VERSION = 1
# Calibration tokens the sensitivity Hessians use at most (whole windows, at least one): 32 windows of the reference
# protocol's 512, 8 of the full protocol's 2,048. The proxy ratios settle early, and the full protocol's budgeted
# run stays within its time target (docs/RESULTS.md).
HESSIAN_TOKENS = 16_384
SOLVE_WORKERS = 2  # solver processes of the sensitivity pass (measure_sensitivity)


@dataclass
class Sensitivity:
    """Per-unit errors: error[(layer, stage)][width] (predicted KL, nats per token) and proxy[...][width]."""

    units: list[Unit]
    error: dict[tuple[int, str], dict[int, float]]
    proxy: dict[tuple[int, str], dict[int, float]]
    tokens: int
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    def predicted(self, widths) -> float:
        return sum(self.error[u.key][widths[u.key]] for u in self.units)

    def to_json(self) -> dict:
        return {
            "version": SENSITIVITY_VERSION, "tokens": self.tokens, "seconds": self.seconds, "meta": self.meta,
            "units": [{"layer": u.layer, "stage": u.stage, "shapes": [list(s) for s in u.shapes],
                       "error": {str(w): e for w, e in self.error[u.key].items()},
                       "proxy": {str(w): e for w, e in self.proxy[u.key].items()}} for u in self.units],
        }

    @classmethod
    def from_json(cls, d: dict) -> "Sensitivity":
        if d.get("version") != SENSITIVITY_VERSION:
            raise ValueError(f"sensitivity file version {d.get('version')!r}, this mamp reads {SENSITIVITY_VERSION}")
        units, error, proxy = [], {}, {}
        for r in d["units"]:
            u = Unit(int(r["layer"]), str(r["stage"]), tuple((int(k), int(n)) for k, n in r["shapes"]))
            units.append(u)
            error[u.key] = {int(w): float(e) for w, e in r["error"].items()}
            proxy[u.key] = {int(w): float(e) for w, e in r["proxy"].items()}
        return cls(units, error, proxy, int(d["tokens"]), float(d.get("seconds", 0.0)), dict(d.get("meta", {})))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, units: list[Unit]) -> "Sensitivity":
        """Read a saved table; it must describe exactly these units (same model shape)."""
        try:
            s = cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a readable sensitivity table ({' '.join(str(e).split())[:200]})") from None
        if s.units != units:
            raise ValueError(f"{path}: its units do not match this model's ({len(s.units)} vs {len(units)} units, "
                             "or different shapes)")
        missing = [u.key for u in units if set(s.error[u.key]) != set(BITS)]
        if missing:
            raise ValueError(f"{path}: unit {missing[0]} lacks widths (needs {BITS})")
        return s


def eval_windows(windows: torch.Tensor, tokens: int) -> torch.Tensor:
    """The first `tokens` calibration tokens as windows of at most 512 (a short tail forward stays cheap)."""
    n, t = windows.shape
    length = min(t, 512, tokens)
    per = -(-tokens // length)
    rows = [windows[i, j * length:(j + 1) * length] for i in range(n) for j in range(t // length)][:per]
    return torch.stack(rows)


@torch.no_grad()
def log_probs(model: nn.Module, windows: torch.Tensor, device) -> torch.Tensor:
    """Float next-token log-probabilities [n, T, V] of the model on each window."""
    return torch.stack([torch.log_softmax(model(w[None].to(device), use_cache=False).logits[0].float(), -1)
                        for w in windows])


def kl_from(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """Summed KL(ref || softmax(logits)) over the rows (nats)."""
    logq = torch.log_softmax(logits.float(), -1)
    return float((ref_logp.exp() * (ref_logp - logq)).sum())


@torch.no_grad()
def model_kl(model: nn.Module, windows: torch.Tensor, ref_logp: torch.Tensor, device) -> float:
    """Mean KL per token of the model's next-token distribution from ref_logp (log_probs of the float model)."""
    total = 0.0
    for w, ref in zip(windows, ref_logp):
        total += kl_from(ref, model(w[None].to(device), use_cache=False).logits[0])
    return total / ref_logp[..., 0].numel()


def _layer_out(layer, x, kw):
    out = layer(x, **kw)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _tail_kl(model, layers, start, xe, kw, ref_logp) -> float:
    """Mean KL per token when the hidden states xe [m, T, d] enter layer `start` and run to the logits."""
    norm, head = model.model.norm, model.get_output_embeddings()
    total = 0.0
    for j in range(xe.shape[0]):
        h = xe[j:j + 1]
        for layer in layers[start:]:
            h = _layer_out(layer, h, kw)
        total += kl_from(ref_logp[j], head(norm(h))[0])
    return total / ref_logp[..., 0].numel()


def _init_worker() -> None:
    torch.set_num_threads(1)


def _solve_job(weights: list[torch.Tensor], hessian: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, float]:
    """One unit at one width, alone: (its dequantized weight [N, K], the proxy error). Runs in a worker."""
    from mamp.quantizer.pipeline import solve_weights
    from mamp.quantizer.solver import proxy_loss

    with torch.no_grad():
        res = solve_weights(weights, hessian, spec)
        return res.weight, proxy_loss(torch.cat(weights), res.weight, hessian)


class _Inline:
    """A finished job, for workers <= 1 (no pool): the same .result() as a pool's future."""

    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value


@torch.no_grad()
def measure_sensitivity(model: nn.Module, spec: QuantSpec, windows: torch.Tensor, device="cpu",
                        progress: bool = True, widths=BITS, workers: int = SOLVE_WORKERS
                        ) -> tuple[Sensitivity, torch.Tensor, torch.Tensor]:
    """Score every unit at every width (module docstring). The model is left as it was (float).

    workers: solver processes (the solver runs on one thread, so two of them keep two cores busy while this
    process scores the finished solves); 1 solves in this process. The table is the same either way.
    Returns (table, eval windows, their float log-probs): the quantizer scores the finished model on the same
    tokens."""
    from mamp.quantizer.pipeline import (STAGES, HessianAccumulator, LayerStages, capture_inputs, decoder_layers,
                                         units_of)

    if spec.budget is None:
        raise ValueError("sensitivity is measured for a budgeted spec (QuantSpec.build(budget=...))")
    t0 = time.time()
    model.eval().to(device)
    layers = decoder_layers(model)
    units = units_of(model)
    ev = eval_windows(windows, spec.sensitivity_tokens)
    ref = log_probs(model, ev, device)
    calib = windows[:max(1, HESSIAN_TOKENS // windows.shape[1])]
    x, kw = capture_inputs(model, calib, device)
    xe, kwe = capture_inputs(model, ev, device)
    error: dict = {}
    proxy: dict = {}
    ws = sorted(widths)
    measured = ws[:-1]
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)
            if workers > 1 else None)
    bar = tqdm(total=len(units) * len(ws), desc="sensitivity", unit="solve", disable=not progress)
    try:
        for li, layer in enumerate(layers):
            st = LayerStages(layer, kw)
            accs = None
            for s in range(x.shape[0]):
                ins = st.linear_inputs(x[s:s + 1])
                if accs is None:
                    accs = [HessianAccumulator(t.shape[-1], x.device, spec.sink_weight if i == 0 else 1.0)
                            for i, t in enumerate(ins[:-1])]
                for acc, t in zip(accs, ins[:-1]):
                    acc.add(t)
                x[s:s + 1] = ins[-1]
            jobs = {}
            for names, acc in zip(STAGES, accs):
                # Copies: a pool pickles the arguments later, when the scoring below may have put quantized
                # weights into the modules.
                weights = [layer.get_submodule(n).weight.detach().float().cpu().clone() for n in names]
                h = acc.h.cpu()
                for b in ws:
                    args = (weights, h, spec.at_bits(b))
                    jobs[names, b] = pool.submit(_solve_job, *args) if pool else _Inline(_solve_job(*args))
            for names in STAGES:
                key = (li, STAGE_KEYS[STAGES.index(names)])
                mods = [layer.get_submodule(n) for n in names]
                error[key], proxy[key] = {}, {}
                for b in ws:
                    bar.set_postfix_str(f"layer {li} {key[1]} {b}-bit")
                    weight, proxy[key][b] = jobs[names, b].result()
                    if b in measured:
                        saved = [m.weight.data.clone() for m in mods]
                        row = 0
                        for m in mods:
                            m.weight.data.copy_(weight[row:row + m.out_features].to(m.weight.dtype))
                            row += m.out_features
                        error[key][b] = _tail_kl(model, layers, li, xe, kwe, ref)
                        for m, v in zip(mods, saved):
                            m.weight.data.copy_(v)
                    bar.update(1)
                for lo, hi in zip(ws[:-1], ws[1:]):  # unmeasured widths: scale the next smaller one's KL
                    if hi not in measured:
                        ratio = proxy[key][hi] / proxy[key][lo] if proxy[key][lo] > 0 else 0.0
                        error[key][hi] = error[key][lo] * ratio
            xe = torch.cat([_layer_out(layer, xe[j:j + 1], kwe) for j in range(xe.shape[0])])
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    table = Sensitivity(units, error, proxy, int(ev.numel()), time.time() - t0,
                        meta={"hessian_windows": int(calib.shape[0]), "calib": spec.calib, "seqlen": spec.seqlen,
                              "method": spec.method})
    return table, ev, ref


def format_table(s: Sensitivity) -> str:
    """The KL of each unit at each width, one line per layer (nats per token, x 1e3)."""
    ws = sorted(next(iter(s.error.values())))
    lines = [f"unit KL x 1e3 at widths {'/'.join(map(str, ws))} ({s.tokens} tokens)"]
    layers = sorted({u.layer for u in s.units})
    for li in layers:
        parts = []
        for st in STAGE_KEYS:
            e = s.error.get((li, st))
            if e is not None:
                parts.append(f"{st} " + "/".join(f"{1e3 * e[w]:.3g}" for w in ws))
        lines.append(f"layer {li:>{len(str(layers[-1]))}}: " + "  ".join(parts))
    return "\n".join(lines)


__all__ = ["HESSIAN_TOKENS", "SOLVE_WORKERS", "Sensitivity", "eval_windows", "format_table", "log_probs", "measure_sensitivity",
           "model_kl"]
