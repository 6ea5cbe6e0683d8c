"""Calibration token windows: seeded random windows of `seqlen` tokens from a text file or C4."""
from __future__ import annotations

import random
from pathlib import Path

import torch


class CalibrationError(ValueError):
    """Calibration data that cannot be read or is too small."""


def load_text(path: str | Path) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"cannot read calibration file {p}: {e.__class__.__name__}: {e}") from None


def text_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples random windows [nsamples, seqlen] of a 1-D token tensor (GPTQ's wikitext2 loader)."""
    n = tokens.numel()
    if n < nsamples * seqlen:
        raise CalibrationError(
            f"calibration text has {n} tokens, need at least nsamples x seqlen = {nsamples} x {seqlen} = "
            f"{nsamples * seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen) for _ in range(nsamples)]
    return torch.stack([tokens[s:s + seqlen] for s in starts])


def c4_windows(tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ's C4 recipe: documents of the first train shard longer than seqlen, one random window each."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise CalibrationError("--calib c4 needs the `datasets` package (pip install datasets); "
                               "or pass --calib FILE with a text file") from None
    try:
        data = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    except Exception as e:  # noqa: BLE001 - any hub/network failure means the same thing to the user
        raise CalibrationError(f"C4 is not reachable ({e.__class__.__name__}); pass --calib FILE with a text file") from None
    rng = random.Random(seed)
    out = []
    for _ in range(50 * nsamples):
        ids = tokenizer(data[rng.randint(0, len(data) - 1)]["text"], return_tensors="pt",
                        add_special_tokens=False).input_ids[0]
        if ids.numel() > seqlen:
            s = rng.randint(0, ids.numel() - seqlen - 1)
            out.append(ids[s:s + seqlen])
            if len(out) == nsamples:
                return torch.stack(out)
    raise CalibrationError(f"found only {len(out)} C4 documents longer than {seqlen} tokens, need {nsamples}")


def calibration_windows(tokenizer, calib: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[nsamples, seqlen] int64 token ids from `calib` ("c4" or a text file). No BOS is added."""
    if calib == "c4":
        return c4_windows(tokenizer, nsamples, seqlen, seed)
    text = load_text(calib)
    tokens = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return text_windows(tokens, nsamples, seqlen, seed)
