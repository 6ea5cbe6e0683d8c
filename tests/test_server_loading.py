"""The server binds its port at once and answers 503 "loading" until the model is ready (server/loading.py), then
serves; a checkpoint it will not serve ends `mamp serve` with an error line and exit 2."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import httpx


def test_loading_then_ready(tiny_llama_dir):
    import uvicorn

    from mamp.server.app import create_app
    from mamp.server.config import ServerConfig
    from mamp.server.loading import LoadingApp
    from mamp.server.runtime import build_runtime

    app = LoadingApp()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.01)
        health = httpx.get(url + "/health")
        assert (health.status_code, health.json()) == (503, {"status": "loading"})
        assert health.headers["retry-after"] == "5"
        models = httpx.get(url + "/v1/models")
        assert models.status_code == 503 and "loading" in models.json()["error"]["message"]
        assert models.json()["error"]["type"] == "server_error"

        runtime = build_runtime(ServerConfig(model=str(tiny_llama_dir), served_model_name="tiny"))
        app.ready(create_app(runtime))  # starts the engine (the real app's lifespan)
        assert httpx.get(url + "/health").status_code == 200
        out = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "Once", "max_tokens": 3,
                                                        "ignore_eos": True}, timeout=60).json()
        assert out["usage"]["completion_tokens"] == 3
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive()
    assert runtime.engine._stopping  # the real app's lifespan shut the engine down


def test_serve_on_a_bad_checkpoint_is_an_error_line_and_exit_2(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "mamp.server", "--model", str(tmp_path), "--port", str(port)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "config.json" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
