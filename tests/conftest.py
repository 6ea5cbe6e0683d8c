"""Shared fixtures: a tiny random Llama checkpoint and live servers on loopback sockets."""
from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

import mamp  # noqa: F401  (first: drops the checkout root from sys.path, where `kernels/` shadows PyPI's)

try:  # PyPI's `kernels` (transformers 5.x imports it), cached now: pytest puts the root back for `tests.*` imports
    import kernels  # noqa: F401
except ImportError:
    pass

STORIES_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets" / "models" / "stories260K"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from torch's global generator seeded to 0, whatever ran before it: tests that draw unseeded
    inputs against a reference with a tight tolerance are then the same test on every run (an int8 kernel test drew
    an activation on a rounding boundary about once in 100 runs before its inputs were seeded)."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _autotune_cache_in_tmp(tmp_path_factory):
    """Kernel configs tuned during tests (on a GPU) go to a temporary folder, never to ~/.cache/mamp."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MAMP_AUTOTUNE_DIR", str(tmp_path_factory.mktemp("autotune")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core box: torch's thread pool only adds barrier waits. Restored afterwards.
    Kernel test modules use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def float_activations(monkeypatch):
    """The CPU kernel with fp32 activations: where a loaded model must equal a float computation to fp32 rounding
    (the integer kernel's int8 activations are tested against their own reference in test_kernels_cpu_int8)."""
    from mamp.kernels import cpu_matmul

    monkeypatch.setenv(cpu_matmul.ACTIVATIONS_ENV, "float")


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES_DIR / "config.json").is_file():
        pytest.skip(f"{STORIES_DIR} is not present")
    return STORIES_DIR.resolve()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, stories_dir) -> Path:
    """A random 2-layer Llama (hidden 64, 4 heads, 2 KV heads, vocab 512) with stories260K's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
                         initializer_range=0.1,  # peaked logits: greedy ties between runs are unlikely
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    for name in _TOKENIZER_FILES:
        shutil.copy(stories_dir / name, path / name)
    return path


class LiveServer:
    """uvicorn serving a mamp app in a thread, on a socket bound before start (no port race)."""

    def __init__(self, **config):
        import uvicorn

        from mamp.server.app import create_app
        from mamp.server.config import ServerConfig
        from mamp.server.runtime import build_runtime

        self.config = ServerConfig(**config)
        self.runtime = build_runtime(self.config)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        app = create_app(self.runtime)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)

    @property
    def model_name(self) -> str:
        return self.config.model_name

    def client(self, **kwargs):
        import openai

        kwargs.setdefault("api_key", self.config.api_key or "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kwargs)

    def async_client(self, **kwargs):
        import openai

        kwargs.setdefault("api_key", self.config.api_key or "unused")
        return openai.AsyncOpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="session")
def start_server():
    """start_server(model=PATH, **ServerConfig fields) -> LiveServer, stopped at the end of the session."""
    servers: list[LiveServer] = []

    def start(**config) -> LiveServer:
        servers.append(LiveServer(**config))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def tiny_server(start_server, tiny_llama_dir) -> LiveServer:
    return start_server(model=str(tiny_llama_dir), served_model_name="tiny")
