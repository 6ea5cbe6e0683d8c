"""The OpenAI endpoints over a real socket, driven by the official openai client."""
from __future__ import annotations

import httpx
import pytest

NO_EOS = {"ignore_eos": True}


def test_models_and_health(tiny_server):
    client = tiny_server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(tiny_server.url + "/health").status_code == 200


def test_completion_shape_and_usage(tiny_server):
    client = tiny_server.client()
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=7, temperature=0,
                                    extra_body=NO_EOS)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == "tiny"
    assert out.created > 0 and len(out.choices) == 1
    choice = out.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 7 and out.usage.total_tokens == 12


def test_prompt_forms_and_n(tiny_server):
    client = tiny_server.client()
    text = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0,
                                     extra_body=NO_EOS).choices[0].text
    ids = client.completions.create(model="tiny", prompt=[1, 403, 407], max_tokens=5, temperature=0,
                                    extra_body=NO_EOS)
    assert ids.choices[0].text == text and ids.usage.prompt_tokens == 3
    many = client.completions.create(model="tiny", prompt=["Once upon", "The cat"], max_tokens=4, n=2,
                                     temperature=0, extra_body=NO_EOS)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == text[: len(many.choices[0].text)]
    assert many.usage.completion_tokens == 16
    lists = client.completions.create(model="tiny", prompt=[[1, 403, 407], [1, 403]], max_tokens=2,
                                      temperature=0, extra_body=NO_EOS)
    assert len(lists.choices) == 2 and lists.usage.prompt_tokens == 5


def test_completion_stream_with_usage(tiny_server):
    client = tiny_server.client()
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                     extra_body=NO_EOS)
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=NO_EOS))
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == 5


def test_sse_wire_format(tiny_server):
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 3, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", tiny_server.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_chat_completion_and_stream(tiny_server):
    client = tiny_server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell a story."}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=6,
                                         temperature=0, extra_body=NO_EOS)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=NO_EOS))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.total_tokens == out.usage.total_tokens


def test_stop_sequences(tiny_server):
    client = tiny_server.client()
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0,
                                     extra_body=NO_EOS).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = full[: full.find(stop)]
    for stream in (False, True):
        res = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0,
                                        stop=[stop, "never-there"], stream=stream, extra_body=NO_EOS)
        chunks = list(res) if stream else [res]
        assert "".join(c.choices[0].text for c in chunks) == cut
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducibility(tiny_server):
    client = tiny_server.client()

    def draw(seed):
        return [c.text for c in client.completions.create(model="tiny", prompt="Once", max_tokens=16, n=2,
                                                          temperature=1.0, seed=seed, extra_body=NO_EOS).choices]
    first = draw(1234)
    assert draw(1234) == first
    assert draw(99) != first
    assert first[0] != first[1]  # choice i samples with seed + i


def test_streamed_logprobs_match_the_whole_response(tiny_server):
    """The stream's chunks, concatenated, carry the same tokens, logprobs and offsets as one response."""
    client = tiny_server.client()
    args = dict(model="tiny", prompt="Once upon", max_tokens=5, temperature=0, logprobs=2, echo=True,
                extra_body=NO_EOS)
    whole = client.completions.create(**args).choices[0].logprobs
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **args) if c.choices]
    tokens = [t for c in chunks for t in c.logprobs.tokens]
    lps = [v for c in chunks for v in c.logprobs.token_logprobs]
    offsets = [o for c in chunks for o in c.logprobs.text_offset]
    assert tokens == whole.tokens and offsets == whole.text_offset and len(tokens) == 3 + 5  # <s> Once upon + 5
    assert lps[0] is None and lps[1:] == pytest.approx(whole.token_logprobs[1:], abs=1e-4)


def test_logprobs_and_echo(tiny_server):
    client = tiny_server.client()
    out = client.completions.create(model="tiny", prompt="Once upon", max_tokens=4, temperature=0, logprobs=3,
                                    echo=True, extra_body=NO_EOS)
    lp = out.choices[0].logprobs
    assert out.choices[0].text.startswith("Once upon")
    assert len(lp.tokens) == 3 + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(1 <= len(d) <= 4 for d in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body=NO_EOS)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert content[0].logprob == content[0].top_logprobs[0].logprob  # greedy takes the best token


def test_message_name_reaches_the_prompt():
    from mamp.server.protocol import ChatMessage
    from mamp.server.serving_chat import fallback_prompt

    msgs = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi", name="bob")]
    assert fallback_prompt(msgs) == "system: Be brief.\nuser (bob): Hi\nassistant:"
