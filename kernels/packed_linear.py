"""PackedLinear: an nn.Module holding the packed tensors as buffers and multiplying straight from them."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mamp.kernels import ops
from mamp.kernels.cpu_layout import TiledWeight, can_tile, tile_tensor, untile_tensor
from mamp.kernels.cpu_matmul import int8_linear
from mamp.kernels.dispatch import choose_kernel
from mamp.kernels.packing import TENSOR_NAMES, PackedTensors, PackedWeight, PackSpec, aligned
from mamp.kernels.reference import packed_matmul_reference

TILED_KERNELS = ("cpu-int8", "cpu")  # the C++ kernels, which read the column-tiled layout (kernels/cpu_layout.py)


def kernel_and_view(spec: PackSpec, tensors: dict[str, torch.Tensor], device: torch.device | str,
                    layer: str = "") -> tuple:
    """The kernel that serves a packed layer here (kernels/dispatch.py, chosen once) and the layer's tensors in the
    layout it reads: column-tiled (kernels/cpu_layout.py, new cache-line aligned tensors) for the C++ CPU kernels
    when out_features % 16 == 0, else the given row-major tensors as a PackedWeight (checked, not copied)."""
    view = PackedWeight(spec, **tensors)
    kernel = choose_kernel(spec, device, layer=layer)
    if kernel.name in TILED_KERNELS and can_tile(spec):
        view = TiledWeight(spec, **{n: aligned(tile_tensor(t)) for n, t in view.tensors().items()})
    return kernel, view


class PackedLinear(nn.Module):
    """Drop-in replacement for nn.Linear(in_features, out_features) with packed weights.

    Buffers (see docs/FORMAT.md): qweight, bitmap, scales, zeros, hscales, hzeros, and bias (or None).
    forward multiplies straight from them with the kernel chosen once by process_after_loading
    (kernels/dispatch.py: Triton on CUDA, the CPU kernel on CPU, the reference elsewhere) and keeps no
    dequantized weight.
    """

    def __init__(self, spec: PackSpec, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        for name, (shape, dt) in spec.shapes().items():
            self.register_buffer(name, torch.zeros(shape, dtype=dt, device=device))
        self.register_buffer("bias", torch.zeros(spec.out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None = None) -> "PackedLinear":
        dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(packed.spec, bias=bias is not None, dtype=dtype, device=packed.qweight.device)
        for name, t in packed.tensors().items():
            getattr(layer, name).copy_(t)
        if bias is not None:
            layer.bias.copy_(bias)
        layer.process_after_loading()
        return layer

    @property
    def packed(self) -> PackedWeight:
        """The packed tensors in the checkpoint's row-major layout (a copy while the layer is column-tiled)."""
        if self.tiled:
            return TiledWeight(self.spec, **{name: getattr(self, name) for name in TENSOR_NAMES}).untile()
        return PackedWeight(self.spec, **{name: getattr(self, name) for name in TENSOR_NAMES})

    @property
    def tiled(self) -> bool:
        """Whether the buffers hold the column-tiled layout of the CPU kernels (set at load)."""
        return bool(self.__dict__.get("_tiled"))

    def _untile(self) -> None:
        if self.tiled:
            for name in TENSOR_NAMES:
                self._buffers[name] = untile_tensor(self._buffers[name])
            self.__dict__["_tiled"] = False
            self.__dict__.pop("_view", None)
            self.__dict__.pop("_plan", None)

    def process_after_loading(self) -> None:
        """Make the layer ready to serve where its buffers now are: align CPU buffers on cache lines (a tensor
        read from a safetensors file starts wherever the header left it, 8-byte steps; the CPU kernels ran 1.7x
        slower on packed words 8 bytes off a cache line: SmolLM2 MLP, M = 1, 1.43 vs 0.86 ms), then choose the
        kernel once (kernels/dispatch.py: refused kernels are logged with their reason); for the C++ CPU kernels
        rearrange the buffers into the column-tiled layout they stream fastest (in place of the row-major ones,
        when out_features % 16 == 0). Runs again after every .to() / .cuda() (see _apply), so forward never
        selects."""
        self._untile()
        for name in (*TENSOR_NAMES, "bias"):
            t = self._buffers.get(name)
            if t is not None and not t.is_meta:
                self._buffers[name] = aligned(t)
        if self.qweight.is_meta:
            for name in ("_kernel", "_view", "_plan"):
                self.__dict__.pop(name, None)
            return
        kernel, view = kernel_and_view(self.spec, {n: self._buffers[n] for n in TENSOR_NAMES}, self.qweight.device,
                                       layer=self.extra_repr())
        self._buffers.update(view.tensors())  # the tiled tensors in place of the row-major ones (else the same)
        self._set_view(kernel, view)

    def _set_view(self, kernel, view) -> None:
        """Serve from view (the buffers, as the kernel reads them) with kernel; the integer kernel's layer plan is
        prepared here, once (kernels.cpu_matmul.int8_linear), and dropped with the view it reads."""
        plan = int8_linear(view) if kernel.name == "cpu-int8" else None
        self.__dict__.update(_kernel=kernel, _view=view, _tiled=isinstance(view, TiledWeight), _plan=plan)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state.pop("_plan", None)  # a C++ object; __setstate__ prepares it again
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        kernel, view = self.__dict__.get("_kernel"), self.__dict__.get("_view")
        if kernel is not None and view is not None:
            self._set_view(kernel, view)

    def _apply(self, fn, recurse=True):
        self._untile()  # moves and casts see the checkpoint's layout; the kernel (and layout) are chosen again
        out = super()._apply(fn, recurse)
        self.process_after_loading()
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.tiled:  # a state_dict is the checkpoint's format, whatever the kernel reads
            for name in TENSOR_NAMES:
                destination[prefix + name] = untile_tensor(self._buffers[name])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._untile()  # row-major tensors load into row-major buffers; forward tiles again (identity check)
        self.__dict__.pop("_plan", None)  # its salient tiles were read from the bitmap, which this may overwrite
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def kernel_name(self) -> str:
        """The kernel chosen at load ("" before the buffers hold data)."""
        k = self.__dict__.get("_kernel")
        return k.name if k is not None else ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # the kernels are not differentiable: the reference is
            return packed_matmul_reference(x, self.packed, self.bias)
        view = self.__dict__.get("_view")
        bufs = self._buffers
        if view is None or any(getattr(view, name) is not bufs[name] for name in TENSOR_NAMES):
            self.process_after_loading()  # buffers replaced without .to() (e.g. load_state_dict(assign=True))
            view = self.__dict__.get("_view")
            if view is None:
                raise RuntimeError("PackedLinear has no data yet (its buffers are on the meta device)")
        plan = self.__dict__.get("_plan")
        if plan is not None and not torch.compiler.is_compiling():  # compiled code sees the registered op
            return plan.forward(x, self.bias)
        return self.__dict__["_kernel"].fn(x, view, self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={s.in_features}, out_features={s.out_features}, bits={s.bits}, "
                f"salient_bits={s.salient_bits}, group_size={s.group_size}, bias={self.bias is not None}")


class FusedPackedLinears:
    """Packed layers that read the same input (q/k/v, gate/up) as one kernel call over their weights side by
    side: one call per decode step instead of three (or two), each costing several microseconds of dispatch.

    Built from column-tiled PackedLinears with the same input width, widths, group sizes and kernel, and no
    bias; the fused tensors are the layers' tiled tensors concatenated along the tile axis, and each layer's
    buffers become views into them (one copy in memory). Calling it returns one output per layer.
    fuse(mods) returns None where the layers cannot be fused (then call them one by one).
    """

    def __init__(self, mods: list[PackedLinear]) -> None:
        fused = {n: torch.cat([m._buffers[n] for m in mods], dim=0) for n in TENSOR_NAMES}
        start = 0
        for m in mods:  # the layers keep serving alone too, from views of the fused tensors
            tiles = m.out_features // 16
            for n in TENSOR_NAMES:
                m._buffers[n] = fused[n][start:start + tiles]
            m._set_view(m.__dict__["_kernel"], TiledWeight(m.spec, **{n: m._buffers[n] for n in TENSOR_NAMES}))
            start += tiles
        self.spec = dataclasses.replace(mods[0].spec, out_features=sum(m.out_features for m in mods))
        self.view = TiledWeight(self.spec, **fused)
        self.kernel = mods[0].__dict__["_kernel"]
        self.plan = int8_linear(self.view) if self.kernel.name == "cpu-int8" else None
        self.splits = [m.out_features for m in mods]

    @classmethod
    def fuse(cls, mods: list) -> "FusedPackedLinears | None":
        if not all(isinstance(m, PackedLinear) and m.tiled and m.bias is None for m in mods):
            return None
        same = {(m.spec.in_features, m.spec.bits, m.spec.salient_bits, m.spec.group_size, m.spec.salient_group_size,
                 m.kernel_name, m.qweight.device) for m in mods}
        return cls(mods) if len(same) == 1 else None  # tiled implies one of TILED_KERNELS

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.plan is not None and not torch.compiler.is_compiling():
            return self.plan.forward(x, None).split(self.splits, dim=-1)
        return self.kernel.fn(x, self.view, None).split(self.splits, dim=-1)


class PackedEmbedding(nn.Module):
    """The input embedding of a model whose lm_head is packed and tied to it: row t of the table is column t of
    the lm_head's packed weight, read straight from its words (one copy serves both; nothing stored here).

    PackedEmbedding(head, compute_dtype=torch.float32, padding_idx=None); forward(ids) -> [*ids.shape, dim] in
    compute_dtype, exactly the dequantized rows (kernels.packing.dequantize on the gathered columns).
    """

    def __init__(self, head: PackedLinear, compute_dtype: torch.dtype = torch.float32,
                 padding_idx: int | None = None) -> None:
        super().__init__()
        self.__dict__["head"] = head  # not a submodule: the model owns it as its lm_head (state_dict once)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx = padding_idx
        self.compute_dtype = compute_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head
        flat = ids.reshape(-1)
        if flat.numel() == 0:
            return torch.zeros(*ids.shape, self.embedding_dim, dtype=self.compute_dtype, device=ids.device)
        if int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings:
            raise IndexError(f"token ids must be in [0, {self.num_embeddings}), got {int(flat.min())}.."
                             f"{int(flat.max())}")
        view = PackedTensors(head.spec, **{name: getattr(head, name) for name in TENSOR_NAMES})  # either layout
        rows = ops.rows(flat, view)  # [len(ids), dim] fp32, the dequantized columns
        return rows.to(self.compute_dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, reads the packed lm_head "
                f"(bits={self.head.spec.bits}), compute_dtype={self.compute_dtype}")


def weight_memory(model: nn.Module) -> tuple[int, int]:
    """(bytes the model's weights occupy as loaded, bytes the same weights take in bf16).

    Stored bytes count every parameter and buffer once (tied embeddings share storage). The bf16 figure counts
    2 bytes per logical weight: in*out (+bias) for a PackedLinear, numel for everything else.
    """
    seen: set[tuple[int, int]] = set()
    stored = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.numel())
        if t.numel() == 0 or key in seen:
            continue
        seen.add(key)
        stored += t.numel() * t.element_size()
    logical = 0
    seen_logical: set[tuple[int, int]] = set()
    packed_buffers = set()
    for m in model.modules():
        if isinstance(m, PackedLinear):
            logical += m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
            packed_buffers.update(id(getattr(m, n)) for n in TENSOR_NAMES)
            if m.bias is not None:
                packed_buffers.add(id(m.bias))
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.numel())
        if id(t) in packed_buffers or t.numel() == 0 or key in seen_logical:
            continue
        seen_logical.add(key)
        if t.is_floating_point():
            logical += t.numel()
    return stored, 2 * logical
