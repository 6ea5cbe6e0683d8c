"""The packed mamp format: the ONLY writer and reader of packed weights (see docs/FORMAT.md).

A linear layer y = x W^T with W of shape [N, K] (PyTorch's [out_features, in_features]) is stored as

    qweight  [K_pad * b / 32, N]  int32   word r of column n holds input rows r*(32/b) .. r*(32/b) + 32/b - 1
    bitmap   [ceil(G / 8), N]     uint8   bit g % 8 of byte g // 8: 16-row group g of column n is salient
    scales   [ceil(K_pad / gs), N]  fp16  b-bit grid:     w = (q - zero) * scale
    zeros    [ceil(K_pad / gs), N]  uint8
    hscales  [ceil(K_pad / sgs), N] fp16  salient grid:  w = (q - hzero) * hscale
    hzeros   [ceil(K_pad / sgs), N] uint8

with K_pad = K rounded up to a multiple of 16 and G = K_pad / 16 groups per column. Every 16-weight group
takes b/2 words whatever its kind. A normal group holds sixteen b-bit codes; a salient group holds 16*b/h codes
of h bits, each the (quantized) mean of h/b consecutive weights. b = 2, h = 8 is exactly the paper's layout.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

GROUP = 16  # weights per group: one SIMD unit, one bitmap bit
WORD_BITS = 32
SCALE_DTYPE = torch.float16
ZERO_DTYPE = torch.uint8
# Smallest scale we store: keeps fp16 scales normal and finite for all-constant groups.
MIN_SCALE = float(torch.finfo(torch.float16).tiny)
BITS = (2, 4, 8)  # allowed base widths b (8: sixteen 8-bit codes in 4 words per group, h = 8)
SALIENT_BITS = (2, 4, 8)  # allowed salient widths h (h >= b)
ALIGN = 64  # bytes: a cache line / AVX-512 vector; the CPU kernels want their tensors to start on one


def is_aligned(t: torch.Tensor) -> bool:
    """Whether t needs no copy to start on an ALIGN-byte boundary (always true off the CPU)."""
    return t.device.type != "cpu" or t.data_ptr() % ALIGN == 0


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself, or (on the CPU) a copy starting on an ALIGN-byte boundary (torch's CPU allocator aligns to 64)."""
    return t if is_aligned(t) else t.clone()


@dataclass(frozen=True)
class PackSpec:
    """Shape and widths of one packed linear layer (stored per layer in the checkpoint config)."""

    in_features: int
    out_features: int
    bits: int = 2  # b: width of a normal code; a group occupies b/2 words
    salient_bits: int = 8  # h: width of a salient code; each covers h/b consecutive weights (their mean)
    group_size: int = 128  # input rows sharing one b-bit scale/zero
    salient_group_size: int = 128  # input rows sharing one salient scale/zero

    def __post_init__(self) -> None:
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError(f"bad shape {self.out_features}x{self.in_features}")
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.salient_bits not in SALIENT_BITS or self.salient_bits < self.bits:
            raise ValueError(f"salient_bits must be one of {SALIENT_BITS} and >= bits, got {self.salient_bits}")
        for name in ("group_size", "salient_group_size"):
            v = getattr(self, name)
            if v < GROUP or v % GROUP:
                raise ValueError(f"{name} must be a positive multiple of {GROUP}, got {v}")

    # Derived sizes -------------------------------------------------------------------------------------
    @property
    def padded_in(self) -> int:
        return -(-self.in_features // GROUP) * GROUP

    @property
    def n_groups(self) -> int:
        return self.padded_in // GROUP

    @property
    def words_per_group(self) -> int:
        return self.bits // 2

    @property
    def values_per_word(self) -> int:
        return WORD_BITS // self.bits

    @property
    def run(self) -> int:
        """Consecutive weights averaged into one salient code."""
        return self.salient_bits // self.bits

    @property
    def qweight_rows(self) -> int:
        return self.padded_in * self.bits // WORD_BITS

    @property
    def bitmap_rows(self) -> int:
        return -(-self.n_groups // 8)

    @property
    def n_scale_groups(self) -> int:
        return -(-self.padded_in // self.group_size)

    @property
    def n_salient_scale_groups(self) -> int:
        return -(-self.padded_in // self.salient_group_size)

    @property
    def n_high_codes(self) -> int:
        """Salient codes per column if every group were salient."""
        return self.padded_in // self.run

    def shapes(self) -> dict[str, tuple[tuple[int, int], torch.dtype]]:
        n = self.out_features
        return {
            "qweight": ((self.qweight_rows, n), torch.int32),
            "bitmap": ((self.bitmap_rows, n), torch.uint8),
            "scales": ((self.n_scale_groups, n), SCALE_DTYPE),
            "zeros": ((self.n_scale_groups, n), ZERO_DTYPE),
            "hscales": ((self.n_salient_scale_groups, n), SCALE_DTYPE),
            "hzeros": ((self.n_salient_scale_groups, n), ZERO_DTYPE),
        }

    def stored_bits(self) -> int:
        """Exact bits of every packed tensor (words, bitmap, both grids' scales and zeros); bias excluded."""
        return sum(math.prod(shape) * torch.tensor([], dtype=dt).element_size() * 8 for shape, dt in self.shapes().values())

    def bits_per_weight(self) -> float:
        return self.stored_bits() / (self.in_features * self.out_features)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PackSpec":
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in d.items() if k in names})


TENSOR_NAMES = ("qweight", "bitmap", "scales", "zeros", "hscales", "hzeros")


@dataclass
class PackedTensors:
    """The six packed tensors of one layer plus its spec, in some layout: PackedWeight (the format's row-major
    layout, checked) or kernels.cpu_layout.TiledWeight (the CPU kernels' column-tiled one)."""

    spec: PackSpec
    qweight: torch.Tensor
    bitmap: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    hscales: torch.Tensor
    hzeros: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TENSOR_NAMES}


@dataclass
class PackedWeight(PackedTensors):
    """The packed tensors of one layer plus its spec, row-major. Shapes and dtypes are checked on construction."""

    def __post_init__(self) -> None:
        for name, (shape, dtype) in self.spec.shapes().items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{name}: expected {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")

    def to(self, device: torch.device | str) -> "PackedWeight":
        return PackedWeight(self.spec, **{k: v.to(device) for k, v in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


# Affine grids -----------------------------------------------------------------------------------------
def affine_grid(xmin: torch.Tensor, xmax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering [xmin, xmax] with 2^bits levels.

    The scale is rounded to fp16 here (it is stored in fp16), so codes computed with it dequantize to exactly
    what the kernels compute. Returns (scale fp32, zero fp32 holding an integer in [0, 2^bits - 1]).
    """
    maxq = (1 << bits) - 1
    xmin = xmin.float()
    xmax = torch.maximum(xmax.float(), xmin)
    scale = ((xmax - xmin) / maxq).clamp_min(MIN_SCALE).to(SCALE_DTYPE).float()
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_affine(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes clamp(round(x / scale) + zero, 0, 2^bits - 1) as int64 (scale, zero broadcast against x)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, (1 << bits) - 1).to(torch.int64)


def dequantize_affine(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q - zero) * scale in fp32: the one formula the reference and every kernel use."""
    return (q.float() - zero.float()) * scale.float()


# Bit packing ------------------------------------------------------------------------------------------
def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding an unsigned 32-bit pattern -> int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _pack_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """[N, R * 32/width] codes -> [R, N] int32 words, code i of a word at bits [width*i, width*i + width)."""
    n, total = codes.shape
    per_word = WORD_BITS // width
    c = codes.to(torch.int64).reshape(n, total // per_word, per_word)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * width
    words = (c << shifts).sum(-1)
    return _to_int32(words).t().contiguous()


def _unpack_codes(words: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of _pack_codes: [R, N] int32 -> [N, R * 32/width] int64 codes."""
    per_word = WORD_BITS // width
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int32) * width
    c = (words.t().unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    return c.reshape(words.shape[1], -1).to(torch.int64)


def pack_bitmap(salient: torch.Tensor) -> torch.Tensor:
    """[N, G] bool -> [ceil(G/8), N] uint8, bit g % 8 of byte g // 8."""
    n, g = salient.shape
    rows = -(-g // 8)
    s = torch.zeros(n, rows * 8, dtype=torch.int64, device=salient.device)
    s[:, :g] = salient.to(torch.int64)
    shifts = torch.arange(8, device=salient.device, dtype=torch.int64)
    return (s.reshape(n, rows, 8) << shifts).sum(-1).to(torch.uint8).t().contiguous()


def unpack_bitmap(bitmap: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[ceil(G/8), N] uint8 -> [N, G] bool."""
    shifts = torch.arange(8, device=bitmap.device, dtype=torch.int32)
    bits = (bitmap.t().to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmap.shape[1], -1)[:, :n_groups].bool()


def pack(
    spec: PackSpec,
    low_codes: torch.Tensor,
    high_codes: torch.Tensor,
    salient: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    hscales: torch.Tensor,
    hzeros: torch.Tensor,
) -> PackedWeight:
    """Pack codes into the aligned format.

    low_codes:  [N, K_pad] ints in [0, 2^b)          (only read in non-salient groups)
    high_codes: [N, K_pad / (h/b)] ints in [0, 2^h)   (only read in salient groups; code c covers rows c*h/b..)
    salient:    [N, G] bool
    scales, hscales: [n_scale_groups, N] / [n_salient_scale_groups, N] float (stored as fp16)
    zeros, hzeros:   same shapes, integers (stored as uint8)
    """
    n, kp = spec.out_features, spec.padded_in
    expect = {"low_codes": (low_codes, (n, kp)), "high_codes": (high_codes, (n, spec.n_high_codes)),
              "salient": (salient, (n, spec.n_groups))}
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    for name, t, bits in (("low_codes", low_codes, spec.bits), ("high_codes", high_codes, spec.salient_bits)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= 1 << bits):
            raise ValueError(f"{name} out of range for {bits} bits")
    low_words = _pack_codes(low_codes, spec.bits)
    high_words = _pack_codes(high_codes, spec.salient_bits)
    word_salient = salient.t().repeat_interleave(spec.words_per_group, dim=0)  # [rows, N]
    qweight = torch.where(word_salient, high_words, low_words)
    return PackedWeight(
        spec,
        qweight=qweight.contiguous(),
        bitmap=pack_bitmap(salient),
        scales=scales.to(SCALE_DTYPE).contiguous(),
        zeros=zeros.round().to(ZERO_DTYPE).contiguous(),
        hscales=hscales.to(SCALE_DTYPE).contiguous(),
        hzeros=hzeros.round().to(ZERO_DTYPE).contiguous(),
    )


def unpack(p: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of pack: (low_codes [N, K_pad], high_codes [N, K_pad*b/h], salient [N, G]).

    Codes of the other kind are zero (a word holds one kind only).
    """
    spec = p.spec
    salient = unpack_bitmap(p.bitmap, spec.n_groups)
    low = _unpack_codes(p.qweight, spec.bits)
    high = _unpack_codes(p.qweight, spec.salient_bits)
    low = low.masked_fill(salient.repeat_interleave(GROUP, dim=1), 0)
    high = high.masked_fill(~salient.repeat_interleave(GROUP // spec.run, dim=1), 0)
    return low, high, salient


def dequantize(p: PackedWeight) -> torch.Tensor:
    """Pure-torch reference: the float32 weight W [N, K] the packed tensors stand for."""
    spec = p.spec
    low, high, salient = unpack(p)
    rows = torch.arange(spec.padded_in, device=p.qweight.device)
    sg = rows // spec.group_size
    hg = rows // spec.salient_group_size
    w_low = dequantize_affine(low, p.scales.t()[:, sg], p.zeros.t()[:, sg])
    w_high = dequantize_affine(high.repeat_interleave(spec.run, dim=1), p.hscales.t()[:, hg], p.hzeros.t()[:, hg])
    w = torch.where(salient.repeat_interleave(GROUP, dim=1), w_high, w_low)
    return w[:, : spec.in_features].contiguous()
