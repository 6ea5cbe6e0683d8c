"""Layer-by-layer calibration and quantization of a Llama-family decoder (Llama, Mistral, Qwen2, SmolLM).

Inputs of decoder layer i come from the already quantized layers 0..i-1, and only one layer's activations are
held at a time. With true_sequential (default) the sublayers are quantized in the order q,k,v -> o -> gate,up ->
down, and each Hessian is collected from inputs produced by the already quantized sublayers before it. Every
linear runs exactly once per calibration token (attention too): the layer is evaluated stage by stage
(norm -> attention core -> o + residual -> norm -> gate/up -> down + residual) and the stage outputs kept.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from mamp.kernels.llama_block import LlamaBlock
from mamp.kernels.packing import PackedWeight, PackSpec
from mamp.quantizer.allocation import STAGE_KEYS, Unit
from mamp.quantizer.config import QuantSpec
from mamp.quantizer.saliency import group_saliency, top_k_mask
from mamp.quantizer.solver import hinv_diagonal, solve

ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
OUT = ("self_attn.o_proj",)
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
DOWN = ("mlp.down_proj",)
STAGES = (ATTN, OUT, GATE_UP, DOWN)  # quantization order
STAGE_KEY = dict(zip(STAGES, STAGE_KEYS))  # names -> the allocation unit's stage ("qkv", "o", "gate_up", "down")
LINEARS = ATTN + OUT + GATE_UP + DOWN
LAYERS_PATH = "model.layers"


class UnsupportedModel(ValueError):
    """The model has no decoder layers of the supported (Llama-family) shape, or unusable weights."""


@dataclass
class LinearStats:
    layer: int
    name: str
    salient_groups: int
    groups: int
    seconds: float
    bits: int = 0


@dataclass
class QuantizedModel:
    """What the pipeline produced: the fake-quantized model (weights = dequantize(packed)) and the packed layers."""

    model: nn.Module
    spec: QuantSpec
    packed: dict[str, PackedWeight]  # full module name -> packed weight
    biases: dict[str, torch.Tensor | None]
    stats: list[LinearStats] = field(default_factory=list)
    seconds: float = 0.0


class _Stop(Exception):
    def __init__(self, args, kwargs):
        self.args_, self.kwargs_ = args, kwargs


def _run_until(module: nn.Module, fn):
    """Run fn() and return (args, kwargs) of module's forward call, stopping the computation there."""
    def hook(_m, args, kwargs):
        raise _Stop(args, kwargs)
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        fn()
    except _Stop as s:
        return s.args_, s.kwargs_
    finally:
        handle.remove()
    raise UnsupportedModel(f"{module.__class__.__name__} was never called")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    try:
        layers = model.get_submodule(LAYERS_PATH)
    except AttributeError:
        raise UnsupportedModel("no supported linear layers: the model has no `model.layers` decoder stack "
                               "(supported: Llama-family causal LMs)") from None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModel("no supported linear layers: `model.layers` is empty")
    return layers


def check_model(model: nn.Module) -> None:
    """Raise UnsupportedModel unless every decoder layer holds exactly the seven Llama linears and all weights
    are finite."""
    for i, layer in enumerate(decoder_layers(model)):
        found = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        missing = [n for n in LINEARS if n not in found]
        if missing:
            raise UnsupportedModel(f"no supported linear layers: decoder layer {i} lacks {', '.join(missing)}")
        extra = sorted(found - set(LINEARS))
        if extra:
            raise UnsupportedModel(f"decoder layer {i} has linear layers this quantizer does not know: {', '.join(extra)}")
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise UnsupportedModel(f"weight {name} contains NaN or inf")


class HessianAccumulator:
    """Running H = 2 X^T W X / sum(W) over the rows of the inputs seen so far (float32, [K, K]); every row weighs 1
    except the first position of each window [B, T, K], which weighs `sink_weight` (QuantSpec.sink_weight: the
    first token is the attention sink that every later token reads, so its errors reach the whole window).

    H is symmetric, so each add computes only its upper part, as row bands of `band` inputs times the inputs from
    the band's first one on (K = 1,536: 6 bands, 58 % of the full product's work); `h` mirrors it on reading."""

    BAND = 256  # rows per band; narrower bands save more work but run smaller, slower products

    def __init__(self, k: int, device, sink_weight: float = 1.0) -> None:
        self._h = torch.zeros(k, k, device=device)
        self._full: torch.Tensor | None = None
        self.n = 0.0
        self.sink_weight = float(sink_weight)

    @property
    def h(self) -> torch.Tensor:
        if self._full is None:
            upper = torch.triu(self._h)
            self._full = upper + torch.triu(self._h, 1).t()
        return self._full

    @h.setter
    def h(self, value) -> None:  # `acc.h = None` frees the matrix
        self._h, self._full = value, value

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.sink_weight != 1.0 and x.dim() == 3:
            w = torch.ones(x.shape[:2], device=x.device)
            w[:, 0] = self.sink_weight
            w = w.reshape(-1, 1)
        else:
            w = None
        x = x.reshape(-1, x.shape[-1])
        t = float(w.sum()) if w is not None else x.shape[0]
        self._h *= self.n / (self.n + t)
        self._full = None
        self.n += t
        x = x * (torch.sqrt(w * (2 / self.n)) if w is not None else math.sqrt(2 / self.n))
        xt = x.t()
        k = x.shape[-1]
        bands = -(-k // self.BAND)
        step = -(-k // bands)
        for i in range(0, k, step):
            self._h[i:i + step, i:].addmm_(xt[i:i + step], x[:, i:])


class LayerStages(LlamaBlock):
    """One decoder layer evaluated stage by stage (mamp.kernels.llama_block) with the model's own attention:
    attn_core runs the HF attention module up to o_proj's input, so calibration sees exactly the model's
    numbers. Equals layer(x, **kwargs) (checked by `verify`)."""

    def __init__(self, layer: nn.Module, kwargs: dict) -> None:
        super().__init__(layer)
        self.kwargs = kwargs

    def attn_core(self, x):
        """Input of o_proj: attention output before the output projection."""
        args, kwargs = _run_until(self.layer.self_attn.o_proj,
                                  lambda: self.layer.self_attn(hidden_states=self.attn_in(x), **self.kwargs))
        return args[0] if args else kwargs["input"]

    def linear_inputs(self, x):
        """(q/k/v input, o_proj input, gate/up input, down_proj input, layer output) for x: the input of each
        linear group (for its Hessian) and what the next layer receives."""
        core = self.attn_core(x)
        mid = self.mid(x, core)
        mlp_in = self.mlp_in(mid)
        act = self.mlp_act(mlp_in)
        return self.attn_in(x), core, mlp_in, act, self.out(mid, act)

    @torch.no_grad()
    def verify(self, x) -> None:
        want = self.layer(x, **self.kwargs)
        want = want[0] if isinstance(want, tuple) else want
        got = self.linear_inputs(x)[-1]
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-6):
            raise UnsupportedModel("decoder layer does not follow the Llama structure (norm -> attention -> "
                                   "residual -> norm -> gated MLP -> residual)")


@torch.no_grad()
def capture_inputs(model: nn.Module, windows: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
    """Hidden states entering decoder layer 0 [n, T, d] and the keyword arguments the model passes its layers."""
    layer0 = decoder_layers(model)[0]
    inps, kw = [], None
    for row in windows:
        args, kwargs = _run_until(layer0, lambda: model(row[None].to(device), use_cache=False))
        inps.append((args[0] if args else kwargs.pop("hidden_states"))[0])
        if kw is None:
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            # No cache: newer transformers name it `cache` (and warn when the old name is passed too).
            kw["cache" if "cache" in kw else "past_key_values"] = None
            if "cache" in kw:
                kw.pop("past_key_values", None)
            kw["use_cache"] = False
    return torch.stack(inps), kw


def solve_unit(layer: nn.Module, names: tuple[str, ...], hessian: torch.Tensor | None, spec: QuantSpec):
    """Quantize linears sharing one input (and one Hessian) together, leaving the layer as it is: the solver's
    result for their rows stacked (SolverResult) and the PackSpec of the stack."""
    return solve_weights([layer.get_submodule(n).weight.detach().float() for n in names], hessian, spec)


def solve_weights(weights: list[torch.Tensor], hessian: torch.Tensor | None, spec: QuantSpec):
    """solve_unit on the weights [N_i, K] themselves (no module: what a worker process receives)."""
    k = weights[0].shape[1]
    n_total = sum(w.shape[0] for w in weights)
    pspec = PackSpec(k, n_total, bits=spec.bits, salient_bits=spec.salient_bits, group_size=spec.group_size,
                     salient_group_size=spec.salient_group_size)
    masks = []
    hdiag = hinv_diagonal(hessian, spec.percdamp) if (spec.uses_salient and hessian is not None) else None
    for w in weights:
        kk = spec.salient_k(w.shape[0])
        if kk and hdiag is not None:
            masks.append(top_k_mask(group_saliency(w, hdiag), kk))
        else:
            masks.append(torch.zeros(w.shape[0], pspec.n_groups, dtype=torch.bool, device=w.device))
    return solve(torch.cat(weights), hessian, pspec, torch.cat(masks), percdamp=spec.percdamp,
                 block_size=spec.block_size, mse_clip=spec.mse_clip, assign=spec.assign, refit=spec.refit)


def quantize_linears(layer: nn.Module, names: tuple[str, ...], hessian: torch.Tensor | None, spec: QuantSpec
                     ) -> dict[str, tuple[PackedWeight, int]]:
    """Quantize linears sharing one input (and one Hessian) together; replace their weights by the dequantized
    ones. Returns name -> (packed, salient groups)."""
    res = solve_unit(layer, names, hessian, spec)
    out, row = {}, 0
    for name in names:
        m = layer.get_submodule(name)
        n = m.out_features
        sub = PackSpec(m.in_features, n, bits=spec.bits, salient_bits=spec.salient_bits, group_size=spec.group_size,
                       salient_group_size=spec.salient_group_size)
        tensors = {t: v[:, row:row + n].contiguous() for t, v in res.packed.tensors().items()}
        m.weight.data.copy_(res.weight[row:row + n].to(m.weight.dtype))
        out[name] = (PackedWeight(sub, **tensors), int(res.salient[row:row + m.out_features].sum()))
        row += n
    return out


def units_of(model: nn.Module) -> list[Unit]:
    """The allocation units of a (checked) model: per decoder layer q/k/v, o, gate/up, down."""
    out = []
    for li, layer in enumerate(decoder_layers(model)):
        for names in STAGES:
            mods = [layer.get_submodule(n) for n in names]
            out.append(Unit(li, STAGE_KEY[names], tuple((m.in_features, m.out_features) for m in mods)))
    return out


@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec, windows: torch.Tensor | None, device="cpu",
                   progress: bool = True, widths: dict[tuple[int, str], int] | None = None) -> QuantizedModel:
    """Quantize every linear of every decoder layer in place (fake-quant) and return the packed layers.

    windows: [nsamples, seqlen] calibration token ids (unused, may be None, for rtn).
    widths: (layer, stage) -> width for each unit (quantizer/allocation.py), needed when spec has a budget;
    each unit is then quantized with spec.at_bits(width).
    """
    t0 = time.time()
    check_model(model)
    if spec.budget is not None and widths is None:
        raise ValueError("a budgeted spec needs the widths of its units (quantizer.allocation)")
    model.eval()
    layers = decoder_layers(model)
    result = QuantizedModel(model=model, spec=spec, packed={}, biases={})
    calibrate = spec.method != "rtn"
    if calibrate:
        if windows is None:
            raise ValueError(f"method {spec.method} needs calibration windows")
        model.to(device)
        x, kw = capture_inputs(model, windows, device)
    what = f"{spec.budget:g} bits/weight" if spec.budget is not None else f"{spec.bits}-bit"
    bar = tqdm(total=len(layers), desc=f"{spec.method} {what}", unit="layer", disable=not progress)
    for li, layer in enumerate(layers):
        done: dict[str, tuple[PackedWeight, int]] = {}

        def quantize(names, hess):
            t1 = time.time()
            bar.set_postfix_str(f"layer {li} {'/'.join(n.split('.')[-1] for n in names)}")
            unit_spec = spec if widths is None else spec.at_bits(widths[(li, STAGE_KEY[names])])
            got = quantize_linears(layer, names, hess, unit_spec)
            dt = (time.time() - t1) / len(names)
            for n, (p, sal) in got.items():
                done[n] = (p, sal)
                result.stats.append(LinearStats(li, n, sal, p.spec.n_groups * p.spec.out_features, dt,
                                                unit_spec.bits))

        if not calibrate:
            for names in STAGES:
                quantize(names, None)
        else:
            st = LayerStages(layer, kw)
            if li == 0:
                st.verify(x[:1])
            x = _quantize_layer_calibrated(st, x, spec, quantize)
        prefix = f"{LAYERS_PATH}.{li}."
        for n, (p, _) in done.items():
            result.packed[prefix + n] = p
            b = layer.get_submodule(n).bias
            result.biases[prefix + n] = None if b is None else b.detach().clone()
        bar.update(1)
    bar.close()
    if spec.head_bits:
        t1 = time.time()
        p = quantize_head(model, spec)
        result.packed[HEAD_NAME] = p
        result.biases[HEAD_NAME] = None
        result.stats.append(LinearStats(len(layers), HEAD_NAME, 0, p.spec.n_groups * p.spec.out_features,
                                        time.time() - t1, spec.head_bits))
    round_untouched(model, result.packed, getattr(torch, spec.keep_dtype))
    result.seconds = time.time() - t0
    return result


HEAD_NAME = "lm_head"


def quantize_head(model: nn.Module, spec: QuantSpec) -> PackedWeight:
    """Pack the output projection at spec.head_bits (h = b, no salient groups, round-to-nearest with the clipping
    search: no Hessian of the final hidden states is collected) and replace its weight by the dequantized one;
    with tied embeddings that is the embedding table too, as the checkpoint then stores one packed copy."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise UnsupportedModel("--head-bits needs an lm_head without bias")
    w = head.weight.detach().float()
    pspec = PackSpec(w.shape[1], w.shape[0], bits=spec.head_bits, salient_bits=spec.head_bits,
                     group_size=spec.group_size, salient_group_size=spec.salient_group_size)
    res = solve(w, None, pspec, None, mse_clip=spec.mse_clip)
    head.weight.data.copy_(res.weight.to(head.weight.dtype))
    return res.packed


def round_untouched(model: nn.Module, packed: dict, dtype: torch.dtype) -> None:
    """Round every floating parameter not replaced by a packed layer to `dtype` (kept in its own dtype), so the
    fake-quantized model equals what the checkpoint stores (quantizer/export.py casts them to `dtype`)."""
    skip = {f"{name}.{t}" for name in packed for t in ("weight", "bias")}
    packed_ptrs = {model.get_submodule(name).weight.data_ptr() for name in packed}  # a tied embedding: packed too
    for name, p in model.named_parameters():
        if name not in skip and p.data_ptr() not in packed_ptrs and p.is_floating_point() and p.dtype != dtype:
            p.data.copy_(p.data.to(dtype))


def _hessians(fn_inputs, n, k, device, sink_weight: float = 1.0) -> torch.Tensor:
    acc = HessianAccumulator(k, device, sink_weight)
    for s in range(n):
        acc.add(fn_inputs(s))
    return acc.h


def _quantize_layer_calibrated(st: LayerStages, x: torch.Tensor, spec: QuantSpec, quantize) -> torch.Tensor:
    """Collect Hessians stage by stage, quantize, and return the layer's (quantized) outputs for all samples."""
    n, dev = x.shape[0], x.device
    d = x.shape[-1]
    lay = st.layer
    if not spec.true_sequential:  # all Hessians from the unquantized layer, then quantize everything
        hs = [HessianAccumulator(lay.get_submodule(s[0]).in_features, dev, spec.sink_weight if s == ATTN else 1.0)
              for s in STAGES]
        for s in range(n):
            for acc, inp in zip(hs, st.linear_inputs(x[s:s + 1])):
                acc.add(inp)
        for names, acc in zip(STAGES, hs):
            quantize(names, acc.h)
            acc.h = None
        for s in range(n):
            x[s:s + 1] = st.linear_inputs(x[s:s + 1])[-1]
        return x
    quantize(ATTN, _hessians(lambda s: st.attn_in(x[s:s + 1]), n, d, dev, spec.sink_weight))
    core = torch.empty_like(x[..., :lay.self_attn.o_proj.in_features])
    acc = HessianAccumulator(core.shape[-1], dev)
    for s in range(n):
        core[s:s + 1] = st.attn_core(x[s:s + 1])
        acc.add(core[s:s + 1])
    quantize(OUT, acc.h)
    del acc
    mid = core if core.shape[-1] == d else torch.empty_like(x)  # reuse the buffer when widths agree
    acc = HessianAccumulator(d, dev)
    for s in range(n):
        mid[s:s + 1] = st.mid(x[s:s + 1], core[s:s + 1])
        acc.add(st.mlp_in(mid[s:s + 1]))
    del core
    quantize(GATE_UP, acc.h)
    ffn = lay.mlp.down_proj.in_features
    act = torch.empty(*x.shape[:-1], ffn, device=dev, dtype=x.dtype)
    acc = HessianAccumulator(ffn, dev)
    for s in range(n):
        act[s:s + 1] = st.mlp_act(st.mlp_in(mid[s:s + 1]))
        acc.add(act[s:s + 1])
    quantize(DOWN, acc.h)
    del acc
    for s in range(n):
        x[s:s + 1] = st.out(mid[s:s + 1], act[s:s + 1])
    return x
