"""/metrics: the exact series names the dashboard reads, parsed as Prometheus text, moving with traffic."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

GAUGES = ["weight_memory_bytes", "weight_memory_bf16_bytes", "weight_memory_saving_ratio",
          "process_resident_memory_bytes", "cuda_memory_allocated_bytes", "cuda_memory_reserved_bytes",
          "kv_cache_usage_bytes", "kv_cache_capacity_bytes", "num_requests_running", "num_requests_waiting"]
COUNTERS = ["requests_finished", "requests_failed", "prompt_tokens", "generation_tokens"]
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
              "request_queue_time_seconds", "request_prompt_tokens", "request_generation_tokens"]


def scrape(server) -> dict[tuple, float]:
    """{(sample name, sorted labels without model_name): value}; asserts every sample carries model_name."""
    response = httpx.get(server.url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            if s.name.startswith("mamp:"):
                assert s.labels.get("model_name") == server.model_name, s
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                out[(s.name, labels)] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_series_names_and_types(tiny_server):
    tiny_server.client().completions.create(model="tiny", prompt="Once", max_tokens=3)
    httpx.post(tiny_server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "n": 0})
    text = httpx.get(tiny_server.url + "/metrics").text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for g in GAUGES:
        assert families["mamp:" + g] == "gauge", g
    for c in COUNTERS:
        assert families["mamp:" + c] == "counter", c
        assert f"mamp:{c}_total{{" in text
    for h in HISTOGRAMS:
        assert families["mamp:" + h] == "histogram", h
        assert f'mamp:{h}_bucket{{le="+Inf"' in text


def test_values_move_as_requests_complete(tiny_server):
    before = scrape(tiny_server)
    client = tiny_server.client()
    client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=6, extra_body={"ignore_eos": True})
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                   extra_body={"ignore_eos": True})
    httpx.post(tiny_server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "top_p": 7})
    httpx.post(tiny_server.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    after = scrape(tiny_server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("mamp:requests_finished_total", finish_reason="length") == 2
    assert delta("mamp:generation_tokens_total") == 10
    assert delta("mamp:prompt_tokens_total") >= 5 + 1
    assert delta("mamp:requests_failed_total", status_code="400") == 1
    assert delta("mamp:requests_failed_total", status_code="404") == 1
    assert delta("mamp:time_to_first_token_seconds_count") == 2
    assert delta("mamp:inter_token_latency_seconds_count") == 5 + 3
    assert delta("mamp:e2e_request_latency_seconds_count") == 2
    assert delta("mamp:request_queue_time_seconds_count") == 2
    assert delta("mamp:request_generation_tokens_sum") == 10
    assert delta("mamp:request_prompt_tokens_bucket", le="5.0") == 1  # the 5-token prompt
    assert value(after, "mamp:weight_memory_bytes") > 0 and value(after, "mamp:weight_memory_bf16_bytes") > 0
    assert 0.0 <= value(after, "mamp:weight_memory_saving_ratio") <= 1.0
    assert value(after, "mamp:process_resident_memory_bytes") > 10 * 2**20
    assert value(after, "mamp:cuda_memory_allocated_bytes") == 0  # CPU run
    assert value(after, "mamp:kv_cache_capacity_bytes") > 0 and value(after, "mamp:kv_cache_usage_bytes") == 0
    assert value(after, "mamp:num_requests_running") == 0 and value(after, "mamp:num_requests_waiting") == 0
