"""kernels/checkpoint.py owns the format: old checkpoints still load to the same logits, the config is truly
frozen and round-trips, bad versions are refused, kernels are chosen at load, and the server reads checkpoints
without importing the quantizer."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mamp.kernels.checkpoint import (FORMAT_VERSION, CheckpointError, QuantizationConfig, load_checkpoint,
                                read_quantization_config)
from mamp.kernels.packed_linear import PackedLinear
from mamp.kernels.packing import PackSpec

DATA = Path(__file__).resolve().parent / "data"
LEGACY = DATA / "legacy-v1-b4"


def test_legacy_v1_checkpoint_loads_to_the_same_logits(monkeypatch):
    """Written by the code before the format had one owner (tests/data/README.md): same logits, bit for bit,
    with the kernel that produced them (fp32 activations; the integer kernel's int8 activations differ)."""
    from mamp.kernels import cpu_matmul

    monkeypatch.setenv(cpu_matmul.ACTIVATIONS_ENV, "float")
    expected = load_file(str(DATA / "legacy-v1-b4.expected.safetensors"))
    model, tok = load_checkpoint(LEGACY)
    assert tok is None
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert torch.equal(logits, expected["logits"])
    q = read_quantization_config(LEGACY)
    assert q.format_version == 1 and q.method == "mamp" and q.bits == 4 and len(q.layers) == 14
    assert q.calibration["nsamples"] == 8 and q.calibration["seqlen"] == 64  # from the legacy "spec" entry


def test_config_is_frozen_and_round_trips():
    q = read_quantization_config(LEGACY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.bits = 2
    with pytest.raises(TypeError):
        q.layers["model.layers.0.mlp.up_proj"] = PackSpec(16, 16)
    with pytest.raises(TypeError):
        q.calibration["seed"] = 3
    d = q.to_dict()
    assert "spec" not in d and d["calibration"]["calib"] == "random"  # each setting stored once
    again = QuantizationConfig.from_dict(json.loads(json.dumps(d)))
    assert again == q and again.layers == q.layers


@pytest.mark.parametrize("change, message", [
    ({"format_version": FORMAT_VERSION + 1}, "format version"),
    ({"bits": 3}, "widths"),
    ({"layers": {"x": {"in_features": 16}}}, "malformed"),
])
def test_unreadable_configs_are_refused(tmp_path, change, message):
    folder = tmp_path / "ckpt"
    shutil.copytree(LEGACY, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: (sha256 differs|.* bytes, the manifest says)"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match=message):  # and without it, the config is still read strictly
        load_checkpoint(folder, verify=False)


def test_plain_hf_folder_is_not_a_mamp_checkpoint(tiny_llama_dir):
    assert read_quantization_config(tiny_llama_dir) is None
    with pytest.raises(CheckpointError, match="not a mamp checkpoint"):
        load_checkpoint(tiny_llama_dir)


def test_kernel_chosen_once_at_load_with_refusals_logged(caplog):
    with caplog.at_level(logging.DEBUG, logger="mamp.kernels.dispatch"):
        model, _ = load_checkpoint(LEGACY)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 14 and {m.kernel_name for m in layers} <= {"cpu-int8", "cpu", "cpu-torch"}
    assert any("kernel triton refused" in r.getMessage() and "CUDA" in r.getMessage() for r in caplog.records)
    # Buffers start on cache lines wherever the file's header left them.
    assert all(b.data_ptr() % 64 == 0 for m in layers for b in m.buffers())


def test_server_reads_checkpoints_without_the_quantizer():
    code = ("import sys, mamp.server.__main__, mamp.server.app, mamp.server.runtime, mamp.server.model_loader, "
            "mamp.kernels.checkpoint; print(sorted(m for m in sys.modules if 'quantizer' in m.split('.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
