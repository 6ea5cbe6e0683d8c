"""The per-GPU autotune cache: tuned once, written to disk, read back by a fresh tuner without re-timing."""
import json

import torch

from mamp.kernels import triton_autotune
from mamp.kernels.triton_autotune import DiskAutotuner, KernelConfig


def test_autotune_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMP_AUTOTUNE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_autotune, "_device_tag", lambda device: "Fake_GPU_80GB")
    configs = [KernelConfig({"BLOCK_N": 64}), KernelConfig({"BLOCK_N": 128}, num_warps=8)]
    cost = {64: 2.0, 128: 1.0}
    timed = []

    def run(cfg):
        timed.append(cfg.blocks["BLOCK_N"])
        return cost[cfg.blocks["BLOCK_N"]]

    tuner = DiskAutotuner("k", configs, timer=lambda fn: fn())
    cuda = torch.device("cuda")
    assert tuner.pick("m1_n64", cuda, run) == configs[1]
    assert sorted(timed) == [64, 128]
    assert tuner.pick("m1_n64", cuda, run) == configs[1] and len(timed) == 2  # in memory
    data = json.loads((tmp_path / "Fake_GPU_80GB.json").read_text())
    assert data["k"]["m1_n64"]["blocks"] == {"BLOCK_N": 128}
    fresh = DiskAutotuner("k", configs, timer=lambda fn: fn())  # a restart
    assert fresh.pick("m1_n64", cuda, run) == configs[1] and len(timed) == 2  # read from disk, not re-timed
    # A failing config is skipped, the other chosen.
    def flaky(cfg):
        if cfg.blocks["BLOCK_N"] == 128:
            raise RuntimeError("out of resources")
        return 1.0
    assert fresh.pick("m16_n64", cuda, flaky) == configs[0]


def test_no_tuning_off_gpu_or_interpreted(monkeypatch):
    tuner = DiskAutotuner("k", [KernelConfig({"A": 1}), KernelConfig({"A": 2})], timer=lambda fn: 1 / 0)
    assert tuner.pick("x", torch.device("cpu"), lambda c: None).blocks == {"A": 1}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tuner.pick("x", torch.device("cuda"), lambda c: None).blocks == {"A": 1}
