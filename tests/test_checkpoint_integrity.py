"""A checkpoint is verified before it is used: every tampering case is refused with one line naming the file or
tensor, by the loader, by `mamp eval` and by `mamp serve` (exit code 2, no traceback)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mamp.kernels.checkpoint import CheckpointError, load_checkpoint, load_plain_hf

LEGACY = Path(__file__).resolve().parent / "data" / "legacy-v1-b4"


@pytest.fixture
def ckpt(tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(LEGACY, folder)
    return folder


def _flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_tensors(folder: Path, change) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt", "quant_method": "mamp"})


def test_flipped_byte_is_caught_by_the_checksum(ckpt):
    _flip_byte(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: sha256 differs"):
        load_checkpoint(ckpt)
    model, _ = load_checkpoint(ckpt, verify=False)  # --no-verify: the caller vouches for the files
    assert model is not None


def test_truncated_file_is_caught_by_size_and_by_the_reader(ckpt):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])
    with pytest.raises(CheckpointError, match=r"model.safetensors: \d+ bytes, the manifest says"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable"):
        load_checkpoint(ckpt, verify=False)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["files"]["model.safetensors"].update(sha256="0" * 64), "sha256 differs"),
    (lambda m: m["files"].pop("config.json"), "does not list"),
    (lambda m: m.update(format_version=7), "format version 7"),
    (lambda m: m["files"].update({"../x": {"size": 1, "sha256": ""}}), "not a file of the folder"),
    (lambda m: m["files"].update({"config.json": 3}), "not an object with size and sha256"),
])
def test_edited_manifest_is_refused(ckpt, edit, message):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    edit(manifest)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt)


def test_missing_manifest_is_refused(ckpt):
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json: missing"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("model.layers.0.mlp.up_proj.scales"), "packed tensor model.layers.0.mlp.up_proj.scales is missing"),
    (lambda t: t.update({"model.layers.1.self_attn.q_proj.qweight": torch.zeros(3, 64, dtype=torch.int32)}),
     r"q_proj.qweight is torch.int32 \(3, 64\), the config says"),
    (lambda t: t.update({"model.layers.1.self_attn.q_proj.zeros": t["model.layers.1.self_attn.q_proj.zeros"].float()}),
     "q_proj.zeros is torch.float32"),
    (lambda t: t.update({"model.norm.weight": torch.ones(3, dtype=torch.bfloat16)}), "model.norm.weight"),
    (lambda t: t.update({"model.layers.9.extra": torch.ones(3)}), "unexpected tensors"),
    (lambda t: t.pop("model.norm.weight"), "tensors missing"),
])
def test_tensors_that_disagree_with_the_config_are_refused(ckpt, change, message):
    _rewrite_tensors(ckpt, change)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt, verify=False)  # past the checksum: the structural checks themselves


def test_packed_tensors_without_quantization_config_are_refused(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="holds packed mamp tensors .* no quantization_config"):
        load_plain_hf(ckpt)


def test_hf_folder_with_missing_weights_is_refused(tiny_llama_dir, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(tiny_llama_dir, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="weights missing from the checkpoint: model.layers.1.mlp.down_proj"):
        load_plain_hf(folder)


@pytest.mark.parametrize("command", [["eval", "{ckpt}", "--text", "{text}"], ["serve", "--model", "{ckpt}"]])
def test_cli_refuses_a_tampered_checkpoint_in_one_line(ckpt, tmp_path, command):
    _flip_byte(ckpt / "model.safetensors")
    text = tmp_path / "t.txt"
    text.write_text("hello " * 50)
    args = [a.format(ckpt=ckpt, text=text) for a in command]
    r = subprocess.run([sys.executable, "-m", "mamp", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:") and "sha256 differs" in lines[0], r.stderr[-2000:]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("model_type"), "not a model config transformers can build"),
    (lambda c: c.update(intermediate_size=96),
     "layer model.layers.0.mlp.down_proj is 64x96 in the model, 64x128 in quantization_config"),
])
def test_config_that_disagrees_with_the_model_is_refused(ckpt, edit, message):
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(ckpt, verify=False)
