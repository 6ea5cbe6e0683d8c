"""The `mamp` command (mamp quantize | eval | serve) and the installed package layout: the repository's folders
are mamp.kernels / mamp.quantizer / mamp.server, and no top-level `kernels` of ours shadows PyPI's."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _mamp(args, cwd):
    """Run the console script when installed on PATH beside this interpreter, else `python -m mamp`."""
    script = shutil.which("mamp", path=str(Path(sys.executable).parent))
    cmd = [script] if script else [sys.executable, "-m", "mamp"]
    return subprocess.run(cmd + args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_lists_the_three_commands(tmp_path):
    r = _mamp(["--help"], tmp_path)
    assert r.returncode == 0
    for command in ("mamp quantize", "mamp eval", "mamp serve"):
        assert command in r.stdout
    r = _mamp(["serve", "--help"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: mamp serve") and "--max-num-seqs" in r.stdout


@pytest.mark.parametrize("args", [["bogus"], ["eval", str(REPO / "no-such-checkpoint"), "--text", "x.txt"],
                                  ["quantize", "m"]])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, args):
    r = _mamp(args, tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr


def test_no_top_level_kernels_package_of_ours(tmp_path):
    """Outside the repository (so the checkout itself is not on sys.path) `kernels` is not ours to import."""
    code = ("import importlib.util, mamp.kernels.checkpoint, mamp.server.app, mamp.quantizer.export; "
            "s = importlib.util.find_spec('kernels'); print('none' if s is None else s.origin)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-2000:]
    origin = r.stdout.strip()
    assert origin == "none" or not origin.startswith(str(REPO / "kernels")), origin  # PyPI's may sit in .venv



def test_runs_from_the_checkout_root_load_transformers_llama():
    """`python -m mamp...` in the checkout puts its root on sys.path, where `kernels/` would shadow PyPI's
    `kernels`, which transformers 5.x imports with every Llama model; importing mamp first drops the root."""
    code = "import mamp, transformers.models.llama.modeling_llama, sys; print(sys.path)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(REPO) + "'" not in r.stdout and "''" not in r.stdout, r.stdout


def test_benchmark_scripts_load_transformers_llama():
    """`python benchmarks/x.py` puts benchmarks/ first on sys.path, where benchmarks/kernels.py would shadow PyPI's
    `kernels` too (and scripts put that folder back for their sibling imports): importing mamp imports PyPI's."""
    script = REPO / "benchmarks" / "_shadow_probe.py"
    script.write_text("import sys\nimport mamp\nsys.path.insert(0, sys.path[0])\n"
                      "import kernels, transformers.models.llama.modeling_llama\nprint(kernels.__file__)\n")
    try:
        r = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    finally:
        script.unlink()
    assert r.returncode == 0, r.stderr[-2000:]
    assert "benchmarks" not in r.stdout, r.stdout


def test_serve_flags_reach_the_config():
    from mamp.server.__main__ import parse_args

    config = parse_args(["--model", "m", "--threads", "1", "--max-request-bytes", "1000", "--no-verify"])
    assert (config.threads, config.max_request_bytes, config.verify) == (1, 1000, False)
    assert parse_args(["--model", "m"]).threads is None
    assert parse_args(["--model", "m"]).prefill_beside is True
    assert parse_args(["--model", "m", "--no-prefill-beside"]).prefill_beside is False
    for bad in (["--threads", "0"], ["--max-request-bytes", "-1"]):
        with pytest.raises(SystemExit) as info:
            parse_args(["--model", "m", *bad])
        assert info.value.code == 2


def test_serve_threads_default_to_every_core_and_can_be_split():
    from mamp.server.__main__ import parse_args, resolve_threads

    for cores, want in ((2, (2, 2)), (1, (1, 1)), (16, (16, 16))):
        config = resolve_threads(parse_args(["--model", "m"]), cores)
        assert (config.threads, config.threads_batch) == want
    config = resolve_threads(parse_args(["--model", "m", "--threads", "3"]), 16)  # like llama.cpp's -tb
    assert (config.threads, config.threads_batch) == (3, 3)
    config = resolve_threads(parse_args(["--model", "m", "--threads-batch", "4"]), 2)
    assert (config.threads, config.threads_batch) == (2, 4)
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--threads-batch", "0"])
