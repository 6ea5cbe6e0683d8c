"""Every error the server answers: status code and the OpenAI shape; none of them disturbs later requests."""
from __future__ import annotations

import httpx
import openai
import pytest

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]

BAD_REQUESTS = [
    (CMPL, {"prompt": "Once", "max_tokens": 0}, "max_tokens"),
    (CMPL, {"prompt": "Once", "max_tokens": -3}, "max_tokens"),
    (CMPL, {"prompt": "Once", "temperature": -0.5}, "temperature"),
    (CMPL, {"prompt": "Once", "top_p": 0}, "top_p"),
    (CMPL, {"prompt": "Once", "top_p": 1.5}, "top_p"),
    (CMPL, {"prompt": "Once", "n": 0}, "n"),
    (CMPL, {"prompt": "Once", "logprobs": 21}, "logprobs"),
    (CMPL, {"prompt": "Once", "temperature": "hot"}, "temperature"),
    (CMPL, {"max_tokens": 3}, "prompt"),
    (CMPL, {"prompt": []}, "prompt"),
    (CMPL, {"prompt": [1, 99999]}, "prompt"),
    (CMPL, {"prompt": "Once", "stream_options": {"include_usage": True}}, None),
    (CMPL, {"prompt": "Once", "logit_bias": {"abc": 1}}, "logit_bias"),
    (CHAT, {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, None),
    # Nothing is accepted and ignored: unsupported fields and values are refused, naming the field.
    (CMPL, {"prompt": "Once", "frobnicate": 1}, "frobnicate"),
    (CMPL, {"prompt": "Once", "suffix": "The end."}, "suffix"),
    (CMPL, {"prompt": "Once", "best_of": 3}, "best_of"),
    (CMPL, {"prompt": "Once", "temperature": 2.5}, "temperature"),
    (CMPL, {"prompt": "Once", "logit_bias": {"5": 150}}, "logit_bias"),
    (CMPL, {"prompt": "Once", "logprobs": False}, "logprobs"),
    (CMPL, {"prompt": "Once", "n": True}, "n"),
    (CMPL, {"prompt": "Once", "max_tokens": "3"}, "max_tokens"),
    (CMPL, {"prompt": [1, True]}, "prompt"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHAT, {"messages": USER, "tool_choice": "required"}, "tool_choice"),
    (CHAT, {"messages": USER + [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages"),
    (CHAT, {"messages": USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages"),
    (CMPL, {"prompt": "Once", "stream": True, "stream_options": {"include_usage": True, "bogus": 1}},
     "stream_options"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "bogus": 1}]}]}, "messages"),
    (CHAT, {"messages": USER, "functions": [{"name": "f"}]}, "functions"),
]


def assert_error(response: httpx.Response, status: int, param: str | None = "skip") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if param != "skip":
        assert param is None or (error["param"] or "").startswith(param), error
    return error


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS)
def test_invalid_parameters_are_400(tiny_server, path, body, param):
    assert_error(httpx.post(tiny_server.url + path, json={"model": "tiny", **body}), 400, param)


def test_malformed_json_is_400(tiny_server):
    r = httpx.post(tiny_server.url + CMPL, content=b'{"prompt": "Once", ', headers={"content-type": "application/json"})
    assert "JSON" in assert_error(r, 400)["message"]


def test_context_overflow_names_both_numbers(tiny_server):
    error = assert_error(httpx.post(tiny_server.url + CMPL,
                                    json={"model": "tiny", "prompt": [1, 403, 407], "max_tokens": 2046}), 400)
    assert "2048" in error["message"] and "2046" in error["message"] and "3 in the prompt" in error["message"]
    long_chat = [{"role": "user", "content": "Once upon a time " * 600}]
    assert_error(httpx.post(tiny_server.url + CHAT, json={"model": "tiny", "messages": long_chat}), 400, "messages")
    with pytest.raises(openai.BadRequestError):
        tiny_server.client().completions.create(model="tiny", prompt=[1, 403], max_tokens=5000)


def test_unknown_model_is_404(tiny_server):
    error = assert_error(httpx.post(tiny_server.url + CMPL, json={"model": "gpt-9", "prompt": "Once"}), 404)
    assert error["code"] == "model_not_found" and "gpt-9" in error["message"]
    with pytest.raises(openai.NotFoundError):
        tiny_server.client().chat.completions.create(model="gpt-9", messages=USER)
    assert_error(httpx.get(tiny_server.url + "/v1/nothing-here"), 404)


def test_errors_do_not_disturb_other_requests(tiny_server):
    client = tiny_server.client()
    before = client.completions.create(model="tiny", prompt="Once", max_tokens=5, temperature=0).choices[0].text
    for path, body, _ in BAD_REQUESTS:
        httpx.post(tiny_server.url + path, json={"model": "tiny", **body})
    assert client.completions.create(model="tiny", prompt="Once", max_tokens=5, temperature=0).choices[0].text == before


def test_api_key(start_server, tiny_llama_dir):
    server = start_server(model=str(tiny_llama_dir), served_model_name="tiny", api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        error = assert_error(httpx.get(server.url + "/v1/models", headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    invalid_body = httpx.post(server.url + CMPL, json={"model": "tiny", "prompt": "x", "n": 0},
                              headers={"Authorization": "Bearer wrong"})
    assert_error(invalid_body, 401)  # the key is checked before the body
    malformed = httpx.post(server.url + CMPL, content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert_error(malformed, 401)  # ... even before it is parsed
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").completions.create(model="tiny", prompt="Once", max_tokens=2)
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    out = server.client().completions.create(model="tiny", prompt="Once", max_tokens=2)
    assert out.usage.completion_tokens <= 2
    assert 'status_code="401"' in httpx.get(server.url + "/metrics").text


SURROGATE_BODIES = [
    (CMPL, '{"model": "tiny", "prompt": "Once \\ud800 upon"}', "prompt"),
    (CMPL, '{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "prompt.1"),
    (CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "Hi \\ud800"}]}', "messages.0.content"),
    (CMPL, '{"model": "tiny\\ud800", "prompt": "Once"}', "model"),
    (CMPL, '{"model": "tiny", "prompt": "Once", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
]


@pytest.mark.parametrize("path,raw,field", SURROGATE_BODIES)
def test_lone_surrogates_are_400_naming_the_field(tiny_server, path, raw, field):
    """JSON escapes can spell a lone UTF-16 surrogate, which no tokenizer or encoder takes: a 400, never a 500."""
    r = httpx.post(tiny_server.url + path, content=raw.encode(), headers={"content-type": "application/json"})
    error = assert_error(r, 400)
    assert error["message"].startswith(field) and "surrogate" in error["message"], error
    ok = httpx.post(tiny_server.url + CMPL, json={"model": "tiny", "prompt": "Once", "max_tokens": 2})
    assert ok.status_code == 200  # and the server carries on


def test_top_p_that_rounds_to_zero_keeps_the_likeliest_token(tiny_server):
    """top_p = 1e-46 passes > 0 in double but is 0 in float32: it must act as greedy, not empty the candidates."""
    body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 6, "seed": 1}
    tiny = httpx.post(tiny_server.url + CMPL, json={**body, "temperature": 1.0, "top_p": 1e-46})
    greedy = httpx.post(tiny_server.url + CMPL, json={**body, "temperature": 0})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_oversized_body_is_413_before_it_is_read(tiny_server):
    big = b'{"model": "tiny", "prompt": "' + b"a" * (5 << 20) + b'"}'
    r = httpx.post(tiny_server.url + CMPL, content=big, headers={"content-type": "application/json"}, timeout=60)
    assert_error(r, 413)

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(6):
            yield b"a" * (1 << 20)
        yield b'"}'
    r = httpx.post(tiny_server.url + CMPL, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert_error(r, 413)
    assert httpx.post(tiny_server.url + CMPL, json={"model": "tiny", "prompt": "Once", "max_tokens": 2}).status_code == 200


def test_tokenizing_a_long_prompt_does_not_stall_health(tiny_server):
    """A 3 MB prompt is tokenized off the event loop: /health answers meanwhile; the prompt gets its 400."""
    import threading
    import time

    result = {}

    def post():
        result["r"] = httpx.post(tiny_server.url + CMPL, json={"model": "tiny", "prompt": "Once upon a time " * 180_000},
                                 timeout=120)

    worker = threading.Thread(target=post)
    worker.start()
    latencies = []
    while worker.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(tiny_server.url + "/health", timeout=30).status_code == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.02)
    worker.join()
    assert_error(result["r"], 400, "prompt")
    assert max(latencies) < 1.0, latencies  # on the event loop, tokenizing took 1.6 s and /health waited for it
    assert len(latencies) >= 3, "the request finished too fast to tell"


@pytest.mark.parametrize("path,body", [
    (CHAT, {"messages": USER, "response_format": {"type": "text"}, "tool_choice": "none", "user": "u-1"}),
    (CHAT, {"messages": USER, "tools": [], "tool_choice": "auto", "parallel_tool_calls": False}),
    (CMPL, {"prompt": "Once", "suffix": "", "best_of": 1, "user": "u-1"}),
    (CHAT, {"messages": USER + [{"role": "assistant", "content": "Hello", "tool_calls": None, "refusal": None},
                                {"role": "user", "content": "And?"}]}),
])
def test_the_harmless_forms_of_those_fields_work(tiny_server, path, body):
    r = httpx.post(tiny_server.url + path, json={"model": "tiny", "max_tokens": 2, **body})
    assert r.status_code == 200, r.text


def test_nan_logit_bias_is_400(tiny_server):
    raw = b'{"model": "tiny", "prompt": "Once", "logit_bias": {"5": NaN}}'
    r = httpx.post(tiny_server.url + CMPL, content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, "logit_bias")


def test_echo_with_max_tokens_0_scores_the_prompt(tiny_server):
    """OpenAI's prompt scoring: echo, logprobs, max_tokens 0 -> the prompt's logprobs and no new token."""
    r = httpx.post(tiny_server.url + CMPL, json={"model": "tiny", "prompt": "Once upon a time", "echo": True,
                                                "logprobs": 2, "max_tokens": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["choices"][0]
    assert choice["text"] == "Once upon a time" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert len(lp["tokens"]) == out["usage"]["prompt_tokens"] and out["usage"]["completion_tokens"] == 0
    # The same numbers as the prompt part of an ordinary echo request.
    full = httpx.post(tiny_server.url + CMPL, json={"model": "tiny", "prompt": "Once upon a time", "echo": True,
                                                   "logprobs": 2, "max_tokens": 1, "temperature": 0}).json()
    n = len(lp["tokens"])
    assert full["choices"][0]["logprobs"]["token_logprobs"][:n] == lp["token_logprobs"]


@pytest.mark.parametrize("depth", [500, 900, 950, 980, 5000])
def test_deeply_nested_body_is_400_not_500(tiny_server, depth):
    raw = b'{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "tools": ' + b"[" * depth + b"]" * depth + b"}"
    r = httpx.post(tiny_server.url + CHAT, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("body", [{"prompt": [5] * 2048, "max_tokens": None},
                                  {"prompt": [5] * 2048, "max_tokens": 0, "echo": True},
                                  {"prompt": [[5] * 10, [5] * 2048], "max_tokens": None}])
def test_prompt_filling_the_whole_context_is_400(tiny_server, body):
    r = httpx.post(tiny_server.url + CMPL, json={"model": "tiny", **body})
    assert_error(r, 400, "prompt")
