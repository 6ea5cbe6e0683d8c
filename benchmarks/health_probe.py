"""/health latency while (a) 10 MB request bodies are refused and (b) a 3 MB prompt is tokenized and refused, on
a live server with a tiny random Llama (stories260K's tokenizer). Prints a markdown row per case: probes, p50,
p99 and max in ms.

    python benchmarks/health_probe.py
"""
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import LiveServer  # noqa: E402

d = Path(tempfile.mkdtemp()) / "probe-llama"
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048)).save_pretrained(d)
for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
    shutil.copy(ROOT.parent / "shared/assets/models/stories260K" / n, d / n)
srv = LiveServer(model=str(d), served_model_name="tiny")

def probe(worker):
    lat = []
    t = threading.Thread(target=worker); t.start()
    while t.is_alive():
        t0 = time.perf_counter(); httpx.get(srv.url + "/health"); lat.append(time.perf_counter() - t0); time.sleep(0.005)
    t.join()
    lat.sort()
    return len(lat), statistics.median(lat) * 1e3, lat[int(0.99 * (len(lat) - 1))] * 1e3, lat[-1] * 1e3

big = b'{"model": "tiny", "prompt": "' + b"a" * (10 << 20) + b'"}'
def ten_mb():
    for _ in range(5):
        r = httpx.post(srv.url + "/v1/completions", content=big, headers={"content-type": "application/json"}, timeout=120)
        assert r.status_code == 413
def three_mb():
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "Once upon a time " * 180_000}, timeout=120)
    assert r.status_code == 400
print("| case | /health probes | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|")
for name, w in (("idle (baseline, 1 s)", lambda: time.sleep(1.0)), ("5 x 10 MB bodies refused (413)", ten_mb),
                ("3 MB prompt tokenized, then refused (400)", three_mb)):
    n, p50, p99, mx = probe(w)
    print(f"| {name} | {n} | {p50:.1f} | {p99:.1f} | {mx:.1f} |")
srv.stop()
shutil.rmtree(d.parent, ignore_errors=True)
