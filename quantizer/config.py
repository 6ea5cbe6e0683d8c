"""QuantSpec: every quantization setting with its default, in one place.

The CLI builds one, the pipeline reads it, and the checkpoint stores it as `quantization_config` in config.json.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

METHODS = ("mamp", "gptq", "rtn")
BITS = (2, 4)
SALIENT_BITS = (2, 4, 8)
# Default salient-code width per base width, chosen by measurement (benchmarks/quality.py, SmolLM2-135M, reference
# protocol): h = b, i.e. salient groups keep full resolution on a grid of their own. The paper's mean-of-4 8-bit
# codes (h = 8 at b = 2) lose to plain GPTQ by orders of magnitude there; it stays available as --salient-bits 8.
DEFAULT_SALIENT_BITS = {2: 2, 4: 4}
# Default salient fraction per base width (same measurements): 25% of the groups at b = 2 (10%: 176, 25%: 172,
# 50%: 203 perplexity, GPTQ 303), 5% at b = 4 (5%: 29.0, 25%: 30.1, GPTQ 30.0), with the saliency assignment.
# With the error assignment (the mamp default) the fraction only seeds the joint fit: 10% and 25% starts gave
# 164.5 and 163.9 at b = 2.
DEFAULT_SALIENT_FRACTION = {2: 0.25, 4: 0.05}
ASSIGNS = ("saliency", "error")  # how groups are given to the salient grid: see quantizer/solver.py
KEEP_DTYPES = ("bfloat16", "float16", "float32")  # storage of the tensors left unquantized
PAPER_SALIENT_BITS = 8  # the paper's encoding: four 8-bit means of 4 weights per 16-weight group


class SpecError(ValueError):
    """A setting or combination of settings that cannot be quantized."""


@dataclass(frozen=True)
class QuantSpec:
    method: str = "mamp"
    bits: int = 2
    salient_bits: int | None = None  # None: DEFAULT_SALIENT_BITS[bits] (mamp) or bits (gptq, rtn)
    # K = round(fraction * out_features) salient groups per 16-row block; None: DEFAULT_SALIENT_FRACTION[bits].
    # The footprint does not depend on K (the second grid is stored densely whatever K is).
    salient_fraction: float | None = None
    top_k: int | None = None  # absolute K per 16-row block; overrides salient_fraction
    # "saliency": the paper's fixed top-K per 16-row block; "error": the top-K mask only starts a joint fit of
    # both grids and the group-to-grid assignment by Hessian-weighted rounding error (the fraction then floats).
    # None: "error" for mamp with salient groups and equal group sizes (measured best), else "saliency".
    assign: str | None = None
    group_size: int = 128  # input rows sharing one b-bit scale/zero
    salient_group_size: int = 128  # input rows sharing one salient scale/zero
    percdamp: float = 0.01  # lambda = percdamp * mean(diag H)
    block_size: int = 128  # GPTQ lazy-update block (columns of the input dimension)
    mse_clip: bool = True  # search a shrunk [min, max] per grid that minimises the rounding error
    true_sequential: bool = True  # q,k,v -> o -> gate,up -> down, each seeing quantized earlier outputs
    # Least-squares refit of the scales after the loop (codes fixed); None: on for mamp, off for the baselines.
    refit: bool | None = None
    # Embeddings, lm_head, norms (everything not quantized) are stored in this dtype; the fake-quantized model is
    # rounded to it too, so evaluation sees exactly what the checkpoint holds.
    keep_dtype: str = "bfloat16"
    calib: str = "c4"  # a text file or "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SpecError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.bits not in BITS:
            raise SpecError(f"bits must be one of {BITS}, got {self.bits}")
        if self.salient_bits is None:
            object.__setattr__(self, "salient_bits", DEFAULT_SALIENT_BITS[self.bits] if self.method == "mamp" else self.bits)
        if self.salient_bits not in SALIENT_BITS:
            raise SpecError(f"salient bits must be one of {SALIENT_BITS}, got {self.salient_bits}")
        if self.salient_bits < self.bits:
            raise SpecError(f"salient bits ({self.salient_bits}) must be >= bits ({self.bits})")
        if self.salient_fraction is None:
            object.__setattr__(self, "salient_fraction", DEFAULT_SALIENT_FRACTION[self.bits])
        if self.assign is None:
            by_error = self.uses_salient and self.group_size == self.salient_group_size
            object.__setattr__(self, "assign", "error" if by_error else "saliency")
        if self.refit is None:
            object.__setattr__(self, "refit", self.method == "mamp")
        if self.method != "mamp":
            # Baselines store no salient groups (the format still carries the bitmap and the second grid).
            object.__setattr__(self, "salient_fraction", 0.0)
            object.__setattr__(self, "top_k", None)
            object.__setattr__(self, "assign", "saliency")
        if self.keep_dtype not in KEEP_DTYPES:
            raise SpecError(f"keep dtype must be one of {KEEP_DTYPES}, got {self.keep_dtype!r}")
        if self.assign not in ASSIGNS:
            raise SpecError(f"assign must be one of {ASSIGNS}, got {self.assign!r}")
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
        if not 0.0 < self.percdamp < 1.0:
            raise SpecError(f"percdamp must be in (0, 1), got {self.percdamp}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise SpecError(f"need nsamples >= 1 and seqlen >= 2, got {self.nsamples} and {self.seqlen}")

    @property
    def uses_salient(self) -> bool:
        return self.method == "mamp" and (self.top_k if self.top_k is not None else self.salient_fraction) > 0

    def salient_k(self, out_features: int) -> int:
        """Salient groups per 16-row block for a layer with `out_features` output channels."""
        if self.salient_fraction is None:
            object.__setattr__(self, "salient_fraction", DEFAULT_SALIENT_FRACTION[self.bits])
        if self.method != "mamp":
            return 0
        k = self.top_k if self.top_k is not None else round(self.salient_fraction * out_features)
        return max(0, min(int(k), out_features))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def with_(self, **changes) -> "QuantSpec":
        return replace(self, **changes)
