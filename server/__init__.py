"""OpenAI-compatible server for packed mamp checkpoints and plain Hugging Face Llama-family checkpoints.

    mamp serve --model CHECKPOINT [--port 8000] [--api-key KEY] [--max-num-seqs 16] [--max-queue 256]

Layout, from the wire inwards:
    __main__.py   argparse -> ServerConfig (config.py) -> build_runtime (runtime.py) -> uvicorn
    app.py        thin FastAPI routes, auth, OpenAI-shaped errors (errors.py), /metrics (metrics.py)
    protocol.py   pydantic request/response models
    serving_*.py  completions and chat: validation, prompts, response and SSE assembly
    async_engine.py, engine.py   asyncio bridge; continuous-batching engine thread (knows nothing of HTTP)
    batched_llama.py, kv_cache.py, sampling.py, detokenizer.py   the model runner and per-token work
    model_loader.py   load_for_serving(path, device, dtype) -> (model, tokenizer, ModelInfo)
"""
