"""mamp checkpoints served by vLLM's engine: a quantization method named "mamp", registered through vLLM's plugin
entry point (pyproject.toml: [project.entry-points."vllm.general_plugins"] mamp = "mamp.vllm_plugin:register").

vLLM reads `quant_method: "mamp"` from a checkpoint's config.json and builds `MampConfig` from its
`quantization_config` with the format's own typed config (kernels/checkpoint.QuantizationConfig). Each linear
layer named in it gets the packed tensors of its PackSpec (kernels/packing.PackSpec.shapes, the one source of the
layout) as vLLM parameters whose output dimension is dim 1 and input (packed) dimension dim 0, like GPTQ's, so
vLLM's column-parallel, fused q/k/v and gate/up loaders slice them along the outputs; `apply` calls the kernel that
mamp's own dispatch chooses for the layer (the C++ CPU kernels on the CPU, Triton on CUDA: registered ops with
fake kernels, so vLLM's torch.compile traces them). Layers not in the config stay unquantized.

Tensor parallelism: column-parallel layers (q/k/v, gate/up) split along outputs; row-parallel ones (o_proj,
down_proj) along inputs where each rank's part is a whole number of the packed tensors' row blocks (shard_spec;
tests/test_vllm_plugin.py checks both splits against the whole layer).

A packed lm_head (mamp's default, `--head-bits 8`) is vLLM's ParallelLMHead with the packed tensors split along
the vocabulary like vLLM's own; where the model ties its embedding to it (the checkpoint then holds one packed
copy, under lm_head), the input embedding reads its rows from the lm_head's packed words (torch.ops.mamp.packed_rows)
and holds no weights of its own.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

NAME = "mamp"
_registered = False


def register() -> None:
    """vLLM's plugin hook, called in every vLLM process; idempotent."""
    global _registered
    if _registered:
        return
    _define_and_register()
    _registered = True


def fused_spec(specs: list, name: str):
    """One PackSpec for layers served as one fused vLLM layer (q/k/v, gate/up): the same input and widths, their
    outputs side by side. Raises ValueError where the parts differ (vLLM fuses them into one weight)."""
    same = {dataclasses.replace(s, out_features=1) for s in specs}
    if len(same) != 1:
        raise ValueError(f"mamp: the parts of {name} differ in input or widths ({specs}); vLLM fuses them into one "
                         f"layer, which needs one width")
    return dataclasses.replace(specs[0], out_features=sum(s.out_features for s in specs))


def shard_spec(spec, in_features: int, out_features: int, name: str = ""):
    """The PackSpec of one tensor-parallel rank's part of a layer: out_features columns (column-parallel: vLLM's
    loaders narrow every packed tensor along its columns) and in_features inputs (row-parallel: they narrow the
    rows, which splits each packed tensor exactly only when the part starts and ends on a boundary of every one of
    them, a multiple of row_shard_step(spec) inputs; refused otherwise)."""
    if in_features != spec.in_features and (spec.in_features % in_features or in_features % row_shard_step(spec)):
        raise NotImplementedError(f"mamp: {name}: {in_features} of {spec.in_features} inputs per rank; the packed "
                                  f"tensors split on rows only in multiples of {row_shard_step(spec)} inputs")
    return dataclasses.replace(spec, in_features=in_features, out_features=out_features)


def row_shard_step(spec) -> int:
    """Inputs per indivisible row block of a layer's packed tensors: a bitmap byte (8 groups of 16), a scale group,
    a salient scale group."""
    import math

    return math.lcm(8 * 16, spec.group_size, spec.salient_group_size)


HEAD = "lm_head"  # the packed output projection's name in the checkpoint (tied or not)


def _tied() -> bool:
    """Whether the model vLLM is building ties its input embedding to the lm_head (its text config says so)."""
    from vllm.config import get_current_vllm_config_or_none

    vc = get_current_vllm_config_or_none()
    if vc is None or vc.model_config is None:
        return False
    return bool(getattr(vc.model_config.hf_text_config, "tie_word_embeddings", False))


def _define_and_register() -> None:
    from vllm.model_executor.layers.linear import (LinearBase, LinearMethodBase, UnquantizedLinearMethod,
                                                   register_weight_loader_v2_supported_method)
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig as VllmQuantConfig
    from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
    from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter
    from vllm.model_executor.utils import set_weight_attrs

    from mamp.kernels import ops
    from mamp.kernels.checkpoint import QuantizationConfig
    from mamp.kernels.packed_linear import kernel_and_view
    from mamp.kernels.packing import TENSOR_NAMES

    def _attach_kernel(layer: torch.nn.Module, name: str) -> None:
        """After loading: the kernel mamp's dispatch chooses for the layer, and its packed tensors in the layout that
        kernel reads, in place of the loaded ones (layer.mamp_kernel, layer.mamp_view)."""
        tensors = {n: getattr(layer, n).data for n in TENSOR_NAMES}
        kernel, view = kernel_and_view(layer.mamp_spec, tensors, layer.qweight.device, layer=name)
        for n, t in view.tensors().items():
            getattr(layer, n).data = t
        layer.mamp_kernel, layer.mamp_view = kernel, view

    @register_quantization_config(NAME)
    class MampConfig(VllmQuantConfig):
        def __init__(self, config: QuantizationConfig) -> None:
            super().__init__()
            self.config = config

        def get_name(self) -> str:
            return NAME

        def get_supported_act_dtypes(self) -> list[torch.dtype]:
            return [torch.float32, torch.bfloat16, torch.float16]

        @classmethod
        def get_min_capability(cls) -> int:
            return 70  # Triton's floor on CUDA; not checked on the CPU

        @staticmethod
        def get_config_filenames() -> list[str]:
            return []  # quantization_config lives in config.json

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> "MampConfig":
            return cls(QuantizationConfig.from_dict(config))

        def spec_for(self, prefix: str):
            """The PackSpec of the vLLM layer `prefix` (fused names expanded), or None if it is not packed."""
            layers = self.config.layers
            if prefix in layers:
                return layers[prefix]
            head, _, fused = prefix.rpartition(".")
            parts = self.packed_modules_mapping.get(fused)
            if not parts:
                return None
            names = [f"{head}.{p}" if head else p for p in parts]
            found = [n in layers for n in names]
            if not any(found):
                return None
            if not all(found):
                raise ValueError(f"mamp: {prefix} is packed only in part ({names}); vLLM needs all or none")
            return fused_spec([layers[n] for n in names], prefix)

        def get_quant_method(self, layer: torch.nn.Module, prefix: str):
            head = self.config.layers.get(HEAD)
            if isinstance(layer, ParallelLMHead):
                return None if head is None else MampHeadMethod(head)
            if isinstance(layer, VocabParallelEmbedding):  # the input embedding: packed only as the tied lm_head
                return MampTiedEmbeddingMethod() if head is not None and _tied() else None
            if not isinstance(layer, LinearBase):
                return None  # attention and the rest: vLLM's own
            spec = self.spec_for(prefix)
            return UnquantizedLinearMethod() if spec is None else MampLinearMethod(spec, prefix)

    @register_weight_loader_v2_supported_method
    class MampLinearMethod(LinearMethodBase):
        def __init__(self, spec, prefix: str) -> None:
            self.spec, self.prefix = spec, prefix

        def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                           output_partition_sizes: list[int], input_size: int, output_size: int,
                           params_dtype: torch.dtype, **extra_weight_attrs) -> None:
            local = shard_spec(self.spec, input_size_per_partition, sum(output_partition_sizes), self.prefix)
            loader = extra_weight_attrs.get("weight_loader")
            for name, (shape, dtype) in local.shapes().items():
                data = torch.empty(shape, dtype=dtype)
                if name == "qweight":
                    param = PackedvLLMParameter(data=data, input_dim=0, output_dim=1, packed_dim=0,
                                                packed_factor=local.values_per_word, weight_loader=loader)
                else:
                    param = GroupQuantScaleParameter(data=data, input_dim=0, output_dim=1, weight_loader=loader)
                layer.register_parameter(name, param)
            layer.mamp_spec = local

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            _attach_kernel(layer, self.prefix)

        def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            return layer.mamp_kernel.fn(x, layer.mamp_view, bias)

    class MampHeadMethod(QuantizeMethodBase):
        """The packed lm_head: its columns (the vocabulary) split like vLLM's own head, padding columns zero."""

        def __init__(self, spec) -> None:
            self.spec = spec

        def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                           output_partition_sizes: list[int], input_size: int, output_size: int,
                           params_dtype: torch.dtype, **extra_weight_attrs) -> None:
            if input_size_per_partition != self.spec.in_features:
                raise ValueError(f"mamp: the packed lm_head has {self.spec.in_features} inputs, the model "
                                 f"{input_size_per_partition}")
            local = dataclasses.replace(self.spec, out_features=sum(output_partition_sizes))

            def load_columns(param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
                si = layer.shard_indices  # this rank's vocabulary, as vLLM's own head splits it
                start, size = si.org_vocab_start_index, si.org_vocab_end_index - si.org_vocab_start_index
                if loaded.shape[0] != param.shape[0] or loaded.shape[1] < start + size:
                    raise ValueError(f"mamp: lm_head tensor of shape {tuple(loaded.shape)} does not fit "
                                     f"{tuple(param.shape)} (vocabulary {start}..{start + size})")
                param.data[:, :size].copy_(loaded[:, start:start + size])
                param.data[:, size:].zero_()

            for name, (shape, dtype) in local.shapes().items():
                param = torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
                set_weight_attrs(param, {"output_dim": 1, "weight_loader": load_columns})
                layer.register_parameter(name, param)
            layer.mamp_spec = local

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            _attach_kernel(layer, HEAD)

        def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            return layer.mamp_kernel.fn(x, layer.mamp_view, bias)

        def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module) -> torch.nn.Module:
            # Not a submodule (no second name for the same tensors): the embedding reads this layer's words.
            embed_tokens.__dict__["_mamp_head"] = layer
            return layer

    class MampTiedEmbeddingMethod(QuantizeMethodBase):
        """The input embedding of a model whose packed lm_head is tied to it: no weights of its own; row t is
        column t of the lm_head's packed weight, dequantized (MampHeadMethod.tie_weights links the two)."""

        def create_weights(self, layer: torch.nn.Module, *args, **kwargs) -> None:
            pass

        def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            raise RuntimeError("mamp: the tied embedding is not a linear layer; the lm_head computes the logits")

        def embedding(self, layer: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
            head = layer.__dict__.get("_mamp_head")
            if head is None:
                raise RuntimeError("mamp: the packed lm_head was never tied to this embedding")
            rows = ops.rows(ids, head.mamp_view)
            return rows.to(layer.params_dtype).reshape(*ids.shape, rows.shape[-1])
