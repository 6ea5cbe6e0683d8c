"""A packed mamp checkpoint (RTN, 4-bit) of the tiny Llama: loaded through load_for_serving, served, and
generating exactly what the loaded PackedLinear model's own HF forward gives."""
from __future__ import annotations

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families


def assert_serves_like_hf(server, name: str, model, tok, prompt: str = "Once upon a time") -> None:
    """The server's greedy completion equals the loaded model's own HF forward, greedy, no cache."""
    ids = tok(prompt).input_ids
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    out = server.client().completions.create(model=name, prompt=prompt, max_tokens=4, temperature=0,
                                             extra_body={"ignore_eos": True})
    assert out.choices[0].text == tok.decode(ids, skip_special_tokens=True)[len(prompt):]


def kernel_layers(metrics_text: str) -> dict[str, float]:
    """mamp:kernel_layers by kernel label, from a /metrics page."""
    return {s.labels["kernel"]: s.value for f in text_string_to_metric_families(metrics_text) for s in f.samples
            if s.name == "mamp:kernel_layers"}


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mamp.quantizer.config import QuantSpec
    from mamp.quantizer.export import save_quantized
    from mamp.quantizer.pipeline import quantize_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    spec = QuantSpec.build(method="rtn", bits=4, group_size=64, salient_group_size=64)
    out = tmp_path_factory.mktemp("tiny-packed") / "ckpt"
    save_quantized(quantize_model(model, spec, None, progress=False), AutoTokenizer.from_pretrained(tiny_llama_dir), out)
    return out


def test_packed_checkpoint_serves_like_its_hf_forward(start_server, packed_dir):
    from mamp.kernels.packed_linear import PackedLinear
    from mamp.server.model_loader import load_for_serving

    model, tok, info = load_for_serving(packed_dir, "cpu", "float32")
    assert info.quantized and isinstance(model.model.layers[0].mlp.down_proj, PackedLinear)
    server = start_server(model=str(packed_dir), served_model_name="tiny-packed")
    assert_serves_like_hf(server, "tiny-packed", model, tok)
    text = httpx.get(server.url + "/metrics").text
    gauges = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert gauges["mamp:weight_memory_bytes"] == info.weight_bytes
    assert gauges["mamp:weight_memory_bf16_bytes"] == info.weight_bf16_bytes
    kernels = kernel_layers(text)
    # 2 layers x 7 linears, the C++ integer-dot kernel (h = b)
    assert kernels == {"cpu-int8": 14.0} and info.kernels == (("cpu-int8", 14),)
    # Loaded in fp32 the float embeddings outweigh what packing saves on this toy; in bf16 the saving shows.
    _, _, bf16_info = load_for_serving(packed_dir, "cpu", "bfloat16")
    assert bf16_info.weight_bf16_bytes == info.weight_bf16_bytes
    assert 0.0 < bf16_info.saving_ratio < 1.0 and bf16_info.weight_bytes < info.weight_bytes


def test_cpu_activations_flag_picks_the_float_kernel(start_server, packed_dir, monkeypatch):
    from mamp.kernels import cpu_matmul
    from mamp.server.__main__ import parse_args

    assert parse_args(["--model", "m", "--cpu-activations", "float"]).cpu_activations == "float"
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--cpu-activations", "fp8"])
    monkeypatch.setenv(cpu_matmul.ACTIVATIONS_ENV, "int8")  # restored after the test: the flag sets it
    server = start_server(model=str(packed_dir), served_model_name="tiny-float", cpu_activations="float")
    text = httpx.get(server.url + "/metrics").text
    kernels = kernel_layers(text)
    assert kernels == {"cpu": 14.0}
    out = server.client().completions.create(model="tiny-float", prompt="Once upon a time", max_tokens=3)
    assert out.usage.completion_tokens == 3


def test_packed_head_checkpoint_serves_like_its_hf_forward(start_server, tiny_llama_dir, tmp_path_factory):
    """mamp's default packs the lm_head at 8 bits; with the tiny Llama's tied table the embedding reads the same
    packed copy (PackedEmbedding): the server generates what the loaded model's HF forward gives."""
    from transformers import AutoTokenizer

    from mamp.kernels.packed_linear import PackedEmbedding, PackedLinear
    from mamp.quantizer.config import QuantSpec
    from mamp.quantizer.export import save_quantized
    from mamp.quantizer.pipeline import quantize_model
    from mamp.server.model_loader import load_for_serving

    from tests.helpers import tiny_llama

    model = tiny_llama(128, tie=True)  # a tied table, like SmolLM2's
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    spec = QuantSpec.build(method="rtn", bits=4, group_size=64, salient_group_size=64, head_bits=8)
    out = tmp_path_factory.mktemp("tiny-head") / "ckpt"
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    save_quantized(quantize_model(model, spec, None, progress=False), tok, out)
    loaded, tok, info = load_for_serving(out, "cpu", "float32")
    assert isinstance(loaded.lm_head, PackedLinear) and isinstance(loaded.model.embed_tokens, PackedEmbedding)
    server = start_server(model=str(out), served_model_name="tiny-head")
    assert_serves_like_hf(server, "tiny-head", loaded, tok)
    text = httpx.get(server.url + "/metrics").text
    kernels = kernel_layers(text)
    assert kernels == {"cpu-int8": 15.0}  # 14 decoder linears + the lm_head


def test_mixed_width_checkpoint_serves_like_its_hf_forward(start_server, tiny_llama_dir, tmp_path_factory):
    """A checkpoint made under a bit budget holds 2-, 4- and 8-bit layers side by side: it loads, every layer
    keeps its own width, and the server generates what the loaded model's HF forward gives."""
    from transformers import AutoTokenizer

    from mamp.kernels.packed_linear import PackedLinear
    from mamp.quantizer.allocation import stored_bits
    from mamp.quantizer.config import QuantSpec
    from mamp.quantizer.export import save_quantized
    from mamp.quantizer.pipeline import quantize_model, units_of
    from mamp.server.model_loader import load_for_serving

    from tests.helpers import tiny_llama

    model = tiny_llama(128, tie=True)
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    units = units_of(model)
    widths = {u.key: (2, 4, 8)[i % 3] for i, u in enumerate(units)}
    budget = stored_bits(units, widths) / sum(u.weights for u in units)
    spec = QuantSpec.build(budget=budget, group_size=64, salient_group_size=64)
    windows = torch.randint(3, 503, (4, 32), generator=torch.Generator().manual_seed(1))
    out = tmp_path_factory.mktemp("tiny-mixed") / "ckpt"
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    save_quantized(quantize_model(model, spec, windows, progress=False, widths=widths), tok, out)
    loaded, tok, info = load_for_serving(out, "cpu", "float32")
    got = {(int(n.split(".")[2]), n.split(".")[-1]): m.spec.bits for n, m in loaded.named_modules()
           if isinstance(m, PackedLinear) and n.startswith("model.layers.")}
    stage = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
             "up_proj": "gate_up", "down_proj": "down"}
    assert got == {(li, name): widths[(li, stage[name])] for li, name in got} and set(got.values()) == {2, 4, 8}
    server = start_server(model=str(out), served_model_name="tiny-mixed")
    assert_serves_like_hf(server, "tiny-mixed", loaded, tok)
