"""Bad input through the CLI: one `error: ...` line on stderr, exit code 2, and no output folder left behind."""
import torch
import pytest

from mamp.quantizer.__main__ import main
from tests.helpers import save_tiny, tiny_tokenizer, write_text


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    model = save_tiny(d / "tiny")
    calib = write_text(d / "calib.txt", 4000)
    return d, model, calib


def run_bad(capsys, out, argv, match):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    assert match in err, err
    assert not out.exists()
    assert not list(out.parent.glob(out.name + ".tmp-*"))
    return err


def test_ok_then_exists(assets, tmp_path, capsys):
    _, model, calib = assets
    out = tmp_path / "q"
    assert main([str(model), "--out", str(out), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32"]) == 0
    assert (out / "manifest.json").is_file()
    capsys.readouterr()
    rc = main([str(model), "--out", str(out), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "--overwrite" in err
    assert main([str(model), "--out", str(out), "--method", "rtn", "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_stale_temporaries_of_a_killed_run_are_removed(assets, tmp_path, capsys):
    """A writer killed mid-save leaves OUT.tmp-XXXX: the next run removes it and says so; OUT.old-* (a previous
    checkpoint being replaced) stays."""
    _, model, _ = assets
    out = tmp_path / "q"
    stale = tmp_path / "q.tmp-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    keep = tmp_path / "q.old-beef"
    keep.mkdir()
    capsys.readouterr()
    assert main([str(model), "--out", str(out), "--method", "rtn"]) == 0
    assert f"removed {stale}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "q.old-beef"]


def test_no_supported_linears(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512, n_positions=64)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    run_bad(capsys, tmp_path / "q", [str(folder), "--out", str(tmp_path / "q"), "--method", "rtn"],
            "no supported linear layers")


def test_nan_weights(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    folder = save_tiny(tmp_path / "m")
    m = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 4] = float("inf")
    m.save_pretrained(folder)
    run_bad(capsys, tmp_path / "q", [str(folder), "--out", str(tmp_path / "q"), "--method", "rtn"], "NaN or inf")


def test_missing_model(tmp_path, capsys):
    run_bad(capsys, tmp_path / "q", [str(tmp_path / "nope"), "--out", str(tmp_path / "q")], "cannot load model")


def test_unreadable_calibration(assets, tmp_path, capsys):
    _, model, _ = assets
    out = tmp_path / "q"
    run_bad(capsys, out, [str(model), "--out", str(out), "--calib", str(tmp_path / "missing.txt")],
            "cannot read calibration file")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    run_bad(capsys, out, [str(model), "--out", str(out), "--calib", str(binary)], "cannot read calibration file")


def test_too_little_calibration_text(assets, tmp_path, capsys):
    _, model, calib = assets
    out = tmp_path / "q"
    err = run_bad(capsys, out, [str(model), "--out", str(out), "--calib", str(calib), "--nsamples", "64",
                                "--seqlen", "128"], "calibration text has 4000 tokens")
    assert "8192" in err


@pytest.mark.parametrize("flags,match", [
    (["--bits", "4", "--salient-bits", "2"], "salient bits (2) must be >= bits (4)"),
    (["--method", "gptq", "--top-k", "3"], "only apply to --method mamp"),
    (["--method", "rtn", "--salient-bits", "8"], "only apply to --method mamp"),
    (["--top-k", "3", "--salient-fraction", "0.1"], "not both"),
    (["--salient-fraction", "1.5"], "salient fraction must be in [0, 1]"),
    (["--group-size", "20"], "group size must be a positive multiple of 16"),
    (["--bits", "3x"], "--bits takes a width"),
    (["--nsamples", "0"], "nsamples"),
    (["--assign", "error", "--salient-group-size", "64"], "same group size for both grids"),
    (["--assign", "error", "--salient-fraction", "0"], "starts from the saliency mask"),
    (["--keep-dtype", "int8"], "invalid choice"),
])
def test_bad_flags(assets, tmp_path, capsys, flags, match):
    _, model, calib = assets
    out = tmp_path / "q"
    run_bad(capsys, out, [str(model), "--out", str(out), "--calib", str(calib)] + flags, match)
