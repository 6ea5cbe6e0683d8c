"""llama.cpp's own quantization types, scored on the same HF-tokenized WikiText-2 windows as benchmarks/quality.py.

    python benchmarks/llama_cpp_quality.py --llama-cpp ~/peers/llama_cpp_python-0.3.36 \
        --gguf ~/peers/smollm2-F32.gguf --model /tmp/SmolLM2-135M-Instruct [--protocol reference|full] \
        [--types Q2_K Q3_K_S ...] [--out benchmarks/results/llama_cpp_quality.md]

--llama-cpp is the llama-cpp-python source distribution from PyPI (`pip download llama-cpp-python --no-binary
:all: --no-deps`, unpacked) with its vendor/llama.cpp built by cmake (llama-quantize and the shared libraries in
vendor/llama.cpp/build/bin; see docs/RESULTS.md). Its Python bindings load that build (LLAMA_CPP_LIB_PATH), so no
second compile is needed. Each type is made from the F32 GGUF with llama-quantize (no importance matrix: llama.cpp's
plain types), its tensors' real types are read back with gguf-py (SmolLM2's width 576 is not a multiple of 256, so
the k-quants fall back to other types on many tensors), and it scores the same token ids as mamp's evaluation:
the test text tokenized whole by the HF tokenizer without BOS, non-overlapping windows, every window's
seqlen - 1 next-token predictions. Bits per weight two ways: over the decoder's linear layers, and over the whole
file's tensors (embeddings and lm_head included; GGUF metadata excluded).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import PROTOCOLS, TEST  # noqa: E402

TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
LINEAR_SUFFIXES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
                   "ffn_up.weight", "ffn_down.weight")


def gguf_stats(path: Path, gguf_py: Path) -> dict:
    """Bits per weight over the decoder linears and over all tensors, and the types the linears really use."""
    sys.path.insert(0, str(gguf_py))
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    lin_bits = lin_n = all_bits = all_n = 0
    used: Counter = Counter()
    for t in r.tensors:
        n = int(t.n_elements)
        bits = 8 * int(t.n_bytes)
        all_bits += bits
        all_n += n
        if t.name.startswith("blk.") and t.name.endswith(LINEAR_SUFFIXES):
            lin_bits += bits
            lin_n += n
            used[t.tensor_type.name] += 1
        elif t.name in ("token_embd.weight", "output.weight"):
            used[f"{t.name.split('.')[0]}:{t.tensor_type.name}"] += 1
    return {"bpw_linears": lin_bits / lin_n, "bpw_file": all_bits / all_n, "types": dict(used)}


def perplexity(model_path: Path, windows: list[list[int]], threads: int) -> tuple[float, int]:
    import numpy as np
    from llama_cpp import Llama

    seqlen = len(windows[0])
    m = Llama(model_path=str(model_path), n_ctx=seqlen, n_batch=seqlen, n_ubatch=min(seqlen, 512), logits_all=True,
              n_threads=threads, verbose=False)
    nll, count = 0.0, 0
    for w in windows:
        m.reset()
        m.eval(w)
        logits = np.asarray(m.scores[:seqlen - 1], dtype=np.float64)
        mx = logits.max(1, keepdims=True)
        logz = mx[:, 0] + np.log(np.exp(logits - mx).sum(1))
        nll += float((logz - logits[np.arange(seqlen - 1), w[1:]]).sum())
        count += seqlen - 1
    return math.exp(nll / count), count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp", type=Path, required=True, help="unpacked llama-cpp-python sdist, vendor built")
    p.add_argument("--gguf", type=Path, required=True, help="the model's F32 GGUF")
    p.add_argument("--model", required=True, help="the HF model folder (its tokenizer makes the windows)")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="reference")
    p.add_argument("--types", nargs="*", default=list(TYPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (a smoke test)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llama_cpp_quality.md")
    a = p.parse_args(argv)
    bin_dir = a.llama_cpp / "vendor" / "llama.cpp" / "build" / "bin"
    gguf_py = a.llama_cpp / "vendor" / "llama.cpp" / "gguf-py"
    os.environ["LLAMA_CPP_LIB_PATH"] = str(bin_dir)
    sys.path.insert(0, str(a.llama_cpp))
    from transformers import AutoTokenizer

    proto = PROTOCOLS[a.protocol]
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = tok(TEST.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    if proto["max_tokens"]:
        ids = ids[:proto["max_tokens"]]
    seqlen = proto["eval_seqlen"]
    windows = [ids[i * seqlen:(i + 1) * seqlen] for i in range(len(ids) // seqlen)][:a.max_windows]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = a.out.with_suffix(".jsonl")
    rows = []
    for typ in ["F32"] + [t for t in a.types if t != "F32"]:
        path = a.gguf if typ == "F32" else a.gguf.with_name(a.gguf.stem.replace("-F32", "") + f"-{typ}.gguf")
        if not path.exists():
            subprocess.run([str(bin_dir / "llama-quantize"), str(a.gguf), str(path), typ], check=True,
                           capture_output=True)
        t0 = time.time()
        ppl, count = perplexity(path, windows, a.threads)
        row = {"name": f"llama.cpp {typ}", "type": typ, "protocol": a.protocol, "perplexity": ppl,
               "scored_tokens": count, "eval_seconds": time.time() - t0, "file_bytes": path.stat().st_size,
               **gguf_stats(path, gguf_py)}
        rows.append(row)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{typ}: ppl {ppl:.4f}  bpw linears {row['bpw_linears']:.3f}  file {row['bpw_file']:.3f}  "
              f"types {row['types']}", flush=True)
    head = ("| type | bits/weight, linears | bits/weight, whole file | perplexity | tensor types (linears; embedding) |\n"
            "|---|---|---|---|---|\n")
    a.out.write_text(head + "".join(
        f"| {r['type']} | {r['bpw_linears']:.3f} | {r['bpw_file']:.3f} | {r['perplexity']:.4f} | "
        f"{', '.join(f'{k} x{v}' for k, v in r['types'].items())} |\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
