"""The batched runner against HF's own forward (on an fp32 KV cache: HF keeps keys and values as computed), and the
engine's pure-Python parts."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from mamp.server.batched_llama import BatchedLlama
from mamp.server.detokenizer import IncrementalDetokenizer
from mamp.server.model_loader import weight_memory
from mamp.server.sampling import SamplingParams, argmax, make_generator, sample

ATOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def hf_model(request):
    """Tiny random models; Qwen2 adds q/k/v biases, Qwen3 per-head q/k norms and an explicit head_dim."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {"head_dim": 24} if request.param == "qwen3" else {}
    config = AutoConfig.for_model(request.param, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                  max_position_embeddings=1024, rope_theta=500.0, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def _hf_last_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1].float()


def test_prefill_matches_hf_at_every_position(hf_model):
    runner = BatchedLlama(hf_model, max_num_seqs=2, max_model_len=512, kv_cache_dtype="fp32")
    ids = torch.randint(0, 512, (17,)).tolist()
    ours = runner.prefill(1, ids, all_logits=True)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(runner.prefill(0, ids), ref[-1], atol=ATOL, rtol=0)


def test_chunked_prefill_matches_one_shot(hf_model):
    """A prompt prefilled in chunks (each attending to the cached prefix) gives the one-shot logits and cache."""
    runner = BatchedLlama(hf_model, max_num_seqs=2, max_model_len=512, kv_cache_dtype="fp32")
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(3)).tolist()
    whole = runner.prefill(0, ids, all_logits=True)
    parts = [runner.prefill(1, ids[a:b], all_logits=True, start=a) for a, b in ((0, 7), (7, 100), (100, 300))]
    torch.testing.assert_close(torch.cat(parts), whole, atol=ATOL, rtol=0)
    for layer in range(len(runner.blocks)):
        (k1, v1), (k0, v0) = (runner.cache.read(layer, torch.tensor([r]), 300) for r in (1, 0))
        torch.testing.assert_close(k1, k0, atol=1e-5, rtol=0)
        torch.testing.assert_close(v1, v0, atol=1e-5, rtol=0)
    torch.testing.assert_close(runner.prefill(1, ids[-1:], start=299), whole[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout,leaves", [([(3, 1), (0, 7), (2, 300)], 0), ([(1, 1), (2, 7), (3, 300)], 1)],
                         ids=["scattered-rows", "dense-rows"])
def test_batched_decode_of_different_lengths_matches_hf(hf_model, layout, leaves):
    runner = BatchedLlama(hf_model, max_num_seqs=4, max_model_len=512, kv_cache_dtype="fp32")
    gen = torch.Generator().manual_seed(1)
    seqs = {slot: torch.randint(0, 512, (n,), generator=gen).tolist() for slot, n in layout}
    for slot, ids in seqs.items():
        runner.prefill(slot, ids)
    for step in range(4):
        slots = list(seqs)
        new = torch.randint(0, 512, (len(slots),), generator=gen).tolist()
        positions = [len(seqs[s]) for s in slots]
        for s, t in zip(slots, new):
            seqs[s].append(t)
        logits = runner.decode(slots, new, positions)
        assert logits.shape == (len(slots), 512)
        for row, s in zip(logits, slots):
            torch.testing.assert_close(row, _hf_last_logits(hf_model, seqs[s]), atol=ATOL, rtol=0)
        if step == 1:  # a sequence leaves the batch (dense: the first, so the rest stays dense)
            del seqs[leaves]


def test_argmax_is_torchs():
    """sampling.argmax (NumPy's on the CPU) answers as torch.argmax: the first of tied maxima, a NaN as the maximum,
    strided rows, 16-bit rows, and tensors NumPy cannot take (bf16, requiring grad) through torch itself."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(49152, generator=g), torch.tensor([1.0, 5.0, 2.0, 5.0, 5.0]),
            torch.tensor([0.0, float("nan"), 3.0, float("nan")]), torch.tensor([-float("inf"), -1.0, -float("inf")]),
            torch.randn(8, 300, generator=g)[:, 7], torch.randn(1000, generator=g).half(),
            torch.randn(1000, generator=g).bfloat16(), torch.randn(50, generator=g, requires_grad=True)]
    for row in rows:
        assert argmax(row) == int(torch.argmax(row)), row
    assert argmax(torch.tensor([2.0, 7.0, 7.0])) == 1


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9])
    greedy = SamplingParams(temperature=0.0, logprobs=2)
    tok = sample(logits, greedy, make_generator(0, torch.device("cpu")), [])
    assert tok.token_id == 1 and [t for t, _ in tok.top_logprobs] == [1, 3]
    assert tok.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[1]))
    assert sample(logits, SamplingParams(top_k=1), make_generator(5, torch.device("cpu")), []).token_id == 1
    hot = SamplingParams(temperature=5.0)
    draws = [[sample(logits, hot, g, []).token_id for _ in range(20)]
             for g in (make_generator(7, torch.device("cpu")), make_generator(7, torch.device("cpu")))]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1
    penalised = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    assert sample(logits, penalised, make_generator(0, torch.device("cpu")), [1]).token_id == 3
    biased = SamplingParams(temperature=0.0, logit_bias=((0, 10.0),), presence_penalty=1.0, logprobs=1)
    before = logits.clone()
    tok = sample(logits, biased, make_generator(0, torch.device("cpu")), [3])
    assert tok.token_id == 0 and torch.equal(logits, before)  # the caller's logits are never changed
    assert tok.logprob == pytest.approx(float(torch.log_softmax(before, -1)[0]))  # logprobs: the raw distribution


def test_detokenizer_cuts_at_stop_and_holds_back_prefixes(stories_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    prompt = tok("Once").input_ids
    ids = tok(" upon a time there was a cat", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tok, prompt, stop=("there",))
    streamed = ""
    for t in ids:
        detok.add(t)
        streamed += detok.take(final=detok.stopped)
        assert "the" not in streamed[len(" upon a time "):] or detok.stopped
        if detok.stopped:
            break
    assert streamed == " upon a time "
    plain = IncrementalDetokenizer(tok, prompt)
    assert "".join(plain.add(t) for t in ids) == " upon a time there was a cat"


def test_weight_memory_counts_tied_embeddings_once(stories_dir):
    model = LlamaForCausalLM.from_pretrained(stories_dir)
    stored, bf16 = weight_memory(model)
    n_params = sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates tied weights
    assert 2 * n_params <= bf16 <= 2 * n_params + 1024  # + the float RoPE buffers, if counted
    assert 4 * n_params <= stored <= 4 * n_params + 1024
