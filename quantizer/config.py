"""QuantSpec: every quantization setting with its default, in one place.

The CLI builds one (QuantSpec.build resolves the width-dependent defaults), the pipeline reads it, and
quantizer/export.py records it in the checkpoint's QuantizationConfig (kernels/checkpoint.py). The allowed
values are declared once, in kernels/packing.py (widths) and kernels/checkpoint.py (methods, assignments,
dtypes).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from mamp.kernels.checkpoint import ASSIGNS, KEEP_DTYPES, METHODS
from mamp.kernels.packing import BITS, SALIENT_BITS

__all__ = ["ALLOCATIONS", "ASSIGNS", "BITS", "BUDGET_SCOPES", "KEEP_DTYPES", "MAX_BUDGET", "METHODS", "SALIENT_BITS",
           "QuantSpec", "SpecError", "parse_bits"]
# --bits BUDGET: per-layer widths chosen under a budget in bits per weight (quantizer/allocation.py).
BUDGET_SCOPES = ("linears", "model")  # what the budget counts: the decoder's linear layers, or the whole file
ALLOCATIONS = ("measured", "rule")  # measured sensitivity (quantizer/sensitivity.py) or a llama.cpp-like rule
MAX_BUDGET = 8.5
# Default salient-code width per base width, chosen by measurement (benchmarks/quality.py, SmolLM2-135M, reference
# protocol): h = b, i.e. salient groups keep full resolution on a grid of their own. The paper's mean-of-4 8-bit
# codes (h = 8 at b = 2) lose to plain GPTQ by orders of magnitude there; it stays available as --salient-bits 8.
DEFAULT_SALIENT_BITS = {2: 2, 4: 4, 8: 8}
# Default salient fraction per base width (same measurements): 25% of the groups at b = 2 (10%: 176, 25%: 172,
# 50%: 203 perplexity, GPTQ 303), 5% at b = 4 (5%: 29.0, 25%: 30.1, GPTQ 30.0), with the saliency assignment.
# With the error assignment (the mamp default) the fraction only seeds the joint fit: 10% and 25% starts gave
# 164.5 and 163.9 at b = 2.
# b = 8 (256 levels per grid) takes b = 4's fraction, not measured separately.
DEFAULT_SALIENT_FRACTION = {2: 0.25, 4: 0.05, 8: 0.05}
# Measured (docs/RESULTS.md, SmolLM2 b = 4, reference protocol): an 8-bit lm_head costs nothing (28.60 vs 28.61
# with the 16-bit table), shrinks the checkpoint from 116 to 90 MB and the lm_head's decode time about 5x; 4 bits
# cost 20 % perplexity (34.26).
DEFAULT_HEAD_BITS = 8
PAPER_SALIENT_BITS = 8  # the paper's encoding: four 8-bit means of 4 weights per 16-weight group


class SpecError(ValueError):
    """A setting or combination of settings that cannot be quantized."""


@dataclass(frozen=True)
class QuantSpec:
    """Resolved settings (no None left but top_k): build with QuantSpec.build(...), which fills the defaults that
    depend on the method and width; the constructor itself only validates."""

    method: str = "mamp"
    bits: int = 2
    salient_bits: int = DEFAULT_SALIENT_BITS[2]
    # K = round(fraction * out_features) salient groups per 16-row block (0 for the baselines).
    # The footprint does not depend on K (the second grid is stored densely whatever K is).
    salient_fraction: float = DEFAULT_SALIENT_FRACTION[2]
    top_k: int | None = None  # absolute K per 16-row block; overrides salient_fraction
    # "saliency": the paper's fixed top-K per 16-row block; "error": the top-K mask only starts a joint fit of
    # both grids and the group-to-grid assignment by Hessian-weighted rounding error (the fraction then floats).
    assign: str = "error"
    group_size: int = 128  # input rows sharing one b-bit scale/zero
    salient_group_size: int = 128  # input rows sharing one salient scale/zero
    percdamp: float = 0.01  # lambda = percdamp * mean(diag H)
    # Weight of each calibration window's first token (the attention sink) in the q/k/v Hessian, against 1 for
    # every other token (pipeline.HessianAccumulator). build() gives mamp one window's worth (seqlen): the first
    # token's value is what every later token's attention reads most, so its v_proj error reaches the whole window
    # (measured, SmolLM2 reference protocol: b = 4 perplexity 28.60 -> 27.09 with 512 in every Hessian; summed unit
    # KL at 4 bits q/k/v 122 -> 18 x 1e-3, but down_proj 18 -> 43, hence q/k/v only). The baselines keep 1.
    sink_weight: float = 1.0
    block_size: int = 128  # GPTQ lazy-update block (columns of the input dimension)
    mse_clip: bool = True  # search a shrunk [min, max] per grid that minimises the rounding error
    true_sequential: bool = True  # q,k,v -> o -> gate,up -> down, each seeing quantized earlier outputs
    refit: bool = True  # least-squares refit of the scales after the loop (codes fixed)
    # Embeddings, lm_head, norms (everything not quantized) are stored in this dtype; the fake-quantized model is
    # rounded to it too, so evaluation sees exactly what the checkpoint holds.
    keep_dtype: str = "bfloat16"
    # Pack the lm_head too (round-to-nearest with the clipping search; with tied embeddings the one packed copy
    # serves the embedding lookup as well): 0 keeps it in keep_dtype; 8 or 4 bits (h = b). build() defaults to
    # DEFAULT_HEAD_BITS for mamp and 0 for the baselines (as GPTQ is usually reported).
    head_bits: int = 0
    # A budget in bits per weight (None: every layer at `bits`): each unit (a layer's q/k/v, o, gate/up or down)
    # gets its own width from BITS, chosen by `allocation` so that the stored bits never exceed the budget;
    # `bits` is then the smallest width and every width takes its own salient defaults (h = b).
    budget: float | None = None
    budget_scope: str = "linears"
    allocation: str = "measured"
    sensitivity_tokens: int = 1024  # calibration tokens the measured allocation scores each unit's KL on
    calib: str = "c4"  # a text file or "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    @classmethod
    def build(cls, method: str = "mamp", bits: int = 2, salient_bits: int | None = None,
              salient_fraction: float | None = None, top_k: int | None = None, assign: str | None = None,
              refit: bool | None = None, head_bits: int | None = None, budget: float | None = None,
              sink_weight: float | None = None, **rest) -> "QuantSpec":
        """A QuantSpec with the defaults that depend on the others filled in: salient_bits
        DEFAULT_SALIENT_BITS[bits] (mamp) or bits (baselines); salient_fraction DEFAULT_SALIENT_FRACTION[bits];
        assign "error" for mamp with salient groups and equal group sizes (measured best), else "saliency";
        refit on for mamp, off for the baselines; head_bits DEFAULT_HEAD_BITS for mamp, 0 (16-bit lm_head) for the
        baselines; sink_weight seqlen for mamp, 1 for the baselines. The baselines store no salient groups."""
        if method not in METHODS:
            raise SpecError(f"method must be one of {METHODS}, got {method!r}")
        if bits not in BITS:
            raise SpecError(f"bits must be one of {BITS}, got {bits}")
        if budget is not None:
            if salient_bits is not None or salient_fraction is not None or top_k is not None:
                raise SpecError("a bit budget gives every width its own salient defaults: drop --salient-bits, "
                                "--salient-fraction and --top-k")
            bits = min(BITS)
        if salient_bits is None:
            salient_bits = DEFAULT_SALIENT_BITS[bits] if method == "mamp" else bits
        if salient_fraction is None:
            salient_fraction = DEFAULT_SALIENT_FRACTION[bits]
        if refit is None:
            refit = method == "mamp"
        if head_bits is None:
            head_bits = DEFAULT_HEAD_BITS if method == "mamp" else 0
        if sink_weight is None:
            sink_weight = float(rest.get("seqlen", cls.seqlen)) if method == "mamp" else 1.0
        if method != "mamp":  # baselines: the format still carries the bitmap and the second grid, unused
            salient_fraction, top_k, assign = 0.0, None, "saliency"
        if assign is None:
            uses_salient = (top_k if top_k is not None else salient_fraction) > 0
            equal_groups = rest.get("group_size", 128) == rest.get("salient_group_size", 128)
            assign = "error" if method == "mamp" and uses_salient and equal_groups else "saliency"
        return cls(method=method, bits=bits, salient_bits=salient_bits, salient_fraction=salient_fraction,
                   top_k=top_k, assign=assign, refit=refit, head_bits=head_bits, budget=budget,
                   sink_weight=sink_weight, **rest)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SpecError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.bits not in BITS:
            raise SpecError(f"bits must be one of {BITS}, got {self.bits}")
        if self.salient_bits not in SALIENT_BITS:
            raise SpecError(f"salient bits must be one of {SALIENT_BITS}, got {self.salient_bits}")
        if self.salient_bits < self.bits:
            raise SpecError(f"salient bits ({self.salient_bits}) must be >= bits ({self.bits})")
        if self.head_bits not in (0, *BITS):
            raise SpecError(f"head bits must be 0 (keep 16-bit) or one of {BITS}, got {self.head_bits}")
        if self.keep_dtype not in KEEP_DTYPES:
            raise SpecError(f"keep dtype must be one of {KEEP_DTYPES}, got {self.keep_dtype!r}")
        if self.assign not in ASSIGNS:
            raise SpecError(f"assign must be one of {ASSIGNS}, got {self.assign!r}")
        if self.method != "mamp" and (self.salient_fraction or self.top_k or self.assign != "saliency"):
            raise SpecError(f"method {self.method} stores no salient groups (use QuantSpec.build)")
        if self.assign == "error":
            if self.group_size != self.salient_group_size:
                raise SpecError("--assign error needs the same group size for both grids "
                                f"(got {self.group_size} and {self.salient_group_size})")
            if not self.uses_salient:
                raise SpecError("--assign error starts from the saliency mask: give a salient fraction or top-k > 0")
        if not 0.0 <= self.salient_fraction <= 1.0:
            raise SpecError(f"salient fraction must be in [0, 1], got {self.salient_fraction}")
        if self.top_k is not None and self.top_k < 0:
            raise SpecError(f"top-k must be >= 0, got {self.top_k}")
        for name in ("group_size", "salient_group_size"):
            v = getattr(self, name)
            if v < 16 or v % 16:
                raise SpecError(f"{name.replace('_', ' ')} must be a positive multiple of 16, got {v}")
        if self.block_size < 16 or self.block_size % 16:
            raise SpecError(f"block size must be a positive multiple of 16, got {self.block_size}")
        if not self.sink_weight >= 1.0:
            raise SpecError(f"sink weight must be >= 1, got {self.sink_weight}")
        if not 0.0 < self.percdamp < 1.0:
            raise SpecError(f"percdamp must be in (0, 1), got {self.percdamp}")
        if self.budget is not None:
            if not 0 < self.budget <= MAX_BUDGET:
                raise SpecError(f"budget must be above 0 and at most {MAX_BUDGET} bits per weight, got {self.budget}")
            if self.bits != min(BITS):
                raise SpecError(f"with a budget, bits is the smallest width ({min(BITS)}), got {self.bits}")
        if self.budget_scope not in BUDGET_SCOPES:
            raise SpecError(f"budget scope must be one of {BUDGET_SCOPES}, got {self.budget_scope!r}")
        if self.allocation not in ALLOCATIONS:
            raise SpecError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.sensitivity_tokens < 16:
            raise SpecError(f"sensitivity tokens must be >= 16, got {self.sensitivity_tokens}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise SpecError(f"need nsamples >= 1 and seqlen >= 2, got {self.nsamples} and {self.seqlen}")

    @property
    def uses_salient(self) -> bool:
        return self.method == "mamp" and (self.top_k if self.top_k is not None else self.salient_fraction) > 0

    def salient_k(self, out_features: int) -> int:
        """Salient groups per 16-row block for a layer with `out_features` output channels."""
        if self.method != "mamp":
            return 0
        k = self.top_k if self.top_k is not None else round(self.salient_fraction * out_features)
        return max(0, min(int(k), out_features))

    def at_bits(self, bits: int) -> "QuantSpec":
        """The settings one unit of a budgeted model is quantized with: width `bits` with that width's salient
        defaults. Without a budget, the spec itself (every unit at spec.bits)."""
        if self.budget is None:
            if bits != self.bits:
                raise SpecError(f"a uniform spec quantizes at {self.bits} bits, not {bits}")
            return self
        frac = DEFAULT_SALIENT_FRACTION[bits] if self.method == "mamp" else 0.0
        return replace(self, bits=bits, salient_bits=DEFAULT_SALIENT_BITS[bits] if self.method == "mamp" else bits,
                       salient_fraction=frac, budget=None)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        names = {f.name for f in fields(cls)}
        if d.get("budget") is not None:  # the per-width salient settings follow from the budget
            names -= {"bits", "salient_bits", "salient_fraction", "top_k"}
        return cls.build(**{k: v for k, v in d.items() if k in names})


def parse_bits(text: str) -> tuple[int, float | None]:
    """--bits: an integer width from BITS ("2", "4", "8": every layer at that width) or any other number, a
    budget in bits per weight ("3", "2.5", "4.0"): (bits, None) or (smallest width, budget)."""
    t = str(text).strip()
    if t in {str(b) for b in BITS}:
        return int(t), None
    try:
        budget = float(t)
    except ValueError:
        raise SpecError(f"--bits takes a width ({', '.join(map(str, BITS))}) or a budget in bits per weight "
                        f"(for example 3.0), got {text!r}") from None
    if not 0 < budget <= MAX_BUDGET:  # also nan and inf
        raise SpecError(f"a bit budget must be above 0 and at most {MAX_BUDGET} bits per weight, got {text}")
    return min(BITS), budget
