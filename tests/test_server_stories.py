"""The real stories260K checkpoint: the server's greedy text equals Hugging Face's own greedy generate."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def stories_server(start_server, stories_dir):
    return start_server(model=str(stories_dir))


def test_greedy_text_matches_hf_generate(stories_server, stories_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    prompts = ["Once upon a time", "Lily and Ben"]
    client = stories_server.client()
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            full = model.generate(ids, max_new_tokens=24, do_sample=False)[0]
        text = tok.decode(full, skip_special_tokens=True)[len(tok.decode(ids[0], skip_special_tokens=True)):]
        out = client.completions.create(model="stories260K", prompt=prompt, max_tokens=24, temperature=0)
        assert out.choices[0].text == text  # with its leading space: ' were playing ...'
        assert out.usage.completion_tokens == len(full) - ids.shape[1]


def test_weight_memory_logged_as_metrics(stories_server):
    import httpx

    text = httpx.get(stories_server.url + "/metrics").text
    assert 'mamp:weight_memory_bf16_bytes{model_name="stories260K"} 520080.0' in text  # 2 x 260,040 params
    assert 'mamp:weight_memory_saving_ratio{model_name="stories260K"} 0.0' in text  # fp32 is no saving
    chat = stories_server.client().chat.completions.create(
        model="stories260K", messages=[{"role": "user", "content": "Tell me a story about a cat."}],
        max_tokens=16, temperature=0.7, seed=3)
    assert chat.choices[0].message.content and chat.choices[0].finish_reason in ("stop", "length")
