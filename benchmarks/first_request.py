"""Time from `mamp serve` to /health answering, and the first completion after it, with a given extension build
folder (an empty one forces the C++ kernel to be compiled, as on a fresh install).

    python benchmarks/first_request.py CHECKPOINT EXTENSIONS_DIR
"""
import os
import subprocess
import sys
import time

import httpx

env = dict(os.environ, TORCH_EXTENSIONS_DIR=sys.argv[2])
t0 = time.time()
p = subprocess.Popen([sys.executable, "-m", "mamp", "serve", "--model", sys.argv[1], "--port", "8123", "--served-model-name", "m"],
                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while True:
    try:
        if httpx.get("http://127.0.0.1:8123/health", timeout=1).status_code == 200: break
    except Exception: pass
    time.sleep(0.2)
t1 = time.time()
r = httpx.post("http://127.0.0.1:8123/v1/completions", json={"model": "m", "prompt": "Once upon a time", "max_tokens": 16}, timeout=300)
t2 = time.time()
print(f"ready after {t1 - t0:.1f} s; first completion {t2 - t1:.2f} s (status {r.status_code})")
p.terminate(); p.wait()
