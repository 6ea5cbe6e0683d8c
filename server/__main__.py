"""mamp serve / python -m mamp.server --model CHECKPOINT [...]: a thin shell over ServerConfig -> build_runtime -> uvicorn."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import threading

import torch
import uvicorn

from .app import create_app
from .config import KV_CACHE_DTYPES, ServerConfig, parse_bytes
from .loading import LoadingApp
from .runtime import build_runtime


def parse_args(argv=None, prog: str = "python -m mamp.server") -> ServerConfig:
    d = ServerConfig(model="")
    p = argparse.ArgumentParser(prog=prog, description="OpenAI-compatible mamp server")
    p.add_argument("--model", required=True, help="packed mamp checkpoint or Hugging Face Llama-family folder")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-key", default=d.api_key, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", default=d.served_model_name, help="default: the folder's name")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting sequences before 429")
    p.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens,
                   help="prompt tokens prefilled per engine step, before each decode step (chunked prefill: a long "
                        "prompt delays running streams by one chunk per step)")
    p.add_argument("--prefill-beside", action=argparse.BooleanOptionalAction, default=d.prefill_beside,
                   help="prefill a prompt longer than --max-prefill-tokens on a helper thread beside the running "
                        "streams' decode steps, the cores split between them (native CPU step, 2+ threads), rather "
                        "than in chunks inside the steps")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len, help="default: the model's limit")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=d.dtype)
    p.add_argument("--log-level", default=d.log_level)
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads for the model's steps under 8 rows (default: all cores; on 2 cores one streaming "
                        "client got 1.3x the tokens/s with 2 threads than with 1, docs/RESULTS.md)")
    p.add_argument("--threads-batch", type=int, default=d.threads_batch,
                   help="CPU threads for engine steps of 8 or more rows (decode batches, prefill chunks; default: "
                        "all cores when --threads is left to its default, else --threads)")
    p.add_argument("--cpu-activations", choices=["auto", "int8", "float"], default=d.cpu_activations,
                   help="CPU decode kernel for h = b layers: int8 activations with integer dot products, or fp32 "
                        "(auto: $MAMP_CPU_ACTIVATIONS, else int8)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=d.kv_cache_dtype,
                   help="KV cache entries: 16-bit (auto: the compute dtype where it is 16-bit, else fp16), fp32, fp16, "
                        "or int8 / int4 quantized per token and head on write (1.9x / 3.6x the tokens of a 16-bit "
                        "cache in the same memory)")
    p.add_argument("--kv-cache-memory", type=_size, default=d.kv_cache_memory, metavar="SIZE",
                   help="KV cache pool, e.g. 2GiB (default: max-num-seqs x max-model-len tokens, at most 4GiB; "
                        "memory is committed as blocks are first used)")
    p.add_argument("--kv-block-size", type=int, default=d.kv_block_size, metavar="TOKENS",
                   help="tokens per KV-cache block (allocation unit; larger blocks decode long contexts faster and "
                        "reserve up to one block per sequence unused)")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help="request bodies larger than this get 413 before they are read (0: no limit)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the checkpoint's files against its manifest (sizes, sha256) at load")
    try:
        return ServerConfig(**vars(p.parse_args(argv)))
    except ValueError as exc:
        p.error(str(exc))


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def resolve_threads(config: ServerConfig, cores: int) -> ServerConfig:
    """The config with both thread counts set: --threads for steps under Engine.BATCH_ROWS rows (default all
    cores: since the decode step runs as one native call per layer, the HTTP side's work between steps costs the
    model threads less than a core; on 2 cores one streaming client got 1.32x and four 1.22x the tokens/s with 2
    threads than with 1, where it was 0.65x before the native step) and --threads-batch for steps of
    Engine.BATCH_ROWS rows or more (default all cores when --threads is left to its default, else --threads, like
    llama.cpp's -tb; docs/RESULTS.md)."""
    threads = config.threads or cores
    batch = config.threads_batch or (cores if config.threads is None else threads)
    return dataclasses.replace(config, threads=threads, threads_batch=batch)


def main(argv=None, prog: str = "python -m mamp.server") -> None:
    config = parse_args(argv, prog)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = resolve_threads(config, torch.get_num_threads())
    torch.set_num_threads(config.threads)
    log = logging.getLogger(__name__)
    # The port is bound at once and answers 503 "loading" while the model and kernels load on a thread (a big
    # checkpoint takes a while to read and verify); then the real app serves.
    app = LoadingApp()
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level))
    # uvicorn's start-up lines wait until the model serves: a checkpoint refused while loading ends in one error line.
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_level = uvicorn_log.level
    uvicorn_log.setLevel(max(uvicorn_level, logging.WARNING))
    failure: list[str] = []

    def load() -> None:
        try:
            app.ready(create_app(build_runtime(config)))
            uvicorn_log.setLevel(uvicorn_level)
            log.info("serving %s on http://%s:%d", config.model_name, config.host, config.port)
        except (OSError, ValueError) as e:  # CheckpointError is a ValueError: a checkpoint we will not serve
            log.debug("start-up failed", exc_info=True)
            failure.append(" ".join(str(e).split()))
            server.should_exit = True
        except BaseException as e:
            log.exception("start-up failed")
            failure.append(f"start-up failed: {type(e).__name__}: {e}")
            server.should_exit = True

    threading.Thread(target=load, name="mamp-load", daemon=True).start()
    server.run()
    if failure:
        print(f"error: {failure[0]}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    main()
