"""Bit budgets: per-layer widths chosen under a budget (quantizer/allocation.py, quantizer/sensitivity.py), written
as one mixed-width checkpoint that loads and serves; budgets that cannot be met are one-line errors."""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from mamp.kernels.checkpoint import load_checkpoint
from mamp.kernels.packing import BITS, dequantize
from mamp.quantizer.__main__ import main
from mamp.quantizer.allocation import (BudgetError, Unit, allocate, check_budget, more_bits_layer, rule_allocation,
                                       stored_bits)
from mamp.quantizer.config import QuantSpec, SpecError, parse_bits
from mamp.quantizer.pipeline import quantize_model, units_of
from mamp.quantizer.sensitivity import Sensitivity, measure_sensitivity
from tests.helpers import save_tiny, tiny_llama, write_text


def bpw(units, widths) -> float:
    return stored_bits(units, widths) / sum(u.weights for u in units)


def random_units(rng: random.Random, n: int) -> tuple[list[Unit], dict]:
    shapes = [(64, 64), (64, 192), (128, 64), (576, 960), (1536, 576), (100, 30)]
    units, error = [], {}
    for i in range(n):
        u = Unit(i // 4, ("qkv", "o", "gate_up", "down")[i % 4], (rng.choice(shapes),))
        e2 = rng.uniform(0.1, 10.0)
        e4 = e2 * rng.uniform(0.02, 0.2)
        units.append(u)
        error[u.key] = {2: e2, 4: e4, 8: e4 * rng.uniform(0.001, 0.01)}
    return units, error


def test_parse_bits():
    assert parse_bits("4") == (4, None) and parse_bits(" 2 ") == (2, None) and parse_bits("8") == (8, None)
    assert parse_bits("3") == (2, 3.0) and parse_bits("4.0") == (2, 4.0) and parse_bits("8.5") == (2, 8.5)
    for bad, match in (("abc", "takes a width"), ("9", "at most 8.5"), ("0", "above 0"), ("nan", "at most"),
                       ("-1", "above 0")):
        with pytest.raises(SpecError, match=match):
            parse_bits(bad)
    with pytest.raises(SpecError, match="own salient defaults"):
        QuantSpec.build(budget=3.0, salient_bits=4)
    s = QuantSpec.build(budget=5.0)
    assert s.bits == 2 and s.at_bits(8).bits == 8 and s.at_bits(8).salient_bits == 8 and s.at_bits(4).budget is None
    assert QuantSpec.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("seed", range(6))
def test_allocation_never_exceeds_the_budget_and_is_near_optimal(seed):
    """Brute force over all 3^6 allocations: the knapsack never goes over the budget, and its error is at most the
    optimum of a budget smaller by its rounding (units x one of its steps)."""
    rng = random.Random(seed)
    units, error = random_units(rng, 6)
    cost = {u.key: {w: u.stored_bits(w) for w in BITS} for u in units}
    combos = []
    for ws in itertools.product(BITS, repeat=len(units)):
        widths = dict(zip((u.key for u in units), ws))
        combos.append((sum(cost[k][w] for k, w in widths.items()), sum(error[k][w] for k, w in widths.items())))
    total = sum(u.weights for u in units)
    lo, hi = bpw(units, {u.key: 2 for u in units}), bpw(units, {u.key: 8 for u in units})
    for budget in [lo, lo + 0.01, 2.5, 3.0, 3.7, 4.5, 5.5, 6.5, 8.0, hi, 8.5]:
        if budget < lo:
            continue
        for resolution in (1 << 15, 64):
            widths = allocate(units, error, budget, resolution=resolution)
            used = stored_bits(units, widths)
            assert used <= budget * total
            got = sum(error[k][w] for k, w in widths.items())
            assert got >= min(e for b, e in combos if b <= budget * total) - 1e-9
            slack = budget * total - stored_bits(units, {u.key: 2 for u in units})
            smaller = budget * total - len(units) * slack / resolution
            assert got <= min(e for b, e in combos if b <= smaller) + 1e-9


def test_budget_below_the_smallest_is_an_error():
    units, error = random_units(random.Random(0), 8)
    least = bpw(units, {u.key: 2 for u in units})
    with pytest.raises(BudgetError, match=f"{least:.4f}"):
        allocate(units, error, least - 1e-3)
    with pytest.raises(BudgetError, match="below the smallest"):
        rule_allocation(units, least - 1e-3)
    check_budget(units, least)  # exactly the smallest: every unit at 2 bits
    assert set(allocate(units, error, least).values()) == {2}


def test_rule_allocation():
    """llama.cpp's use_more_bits layers, and the rule's order: their q/k/v and down_proj first."""
    assert [i for i in range(16) if more_bits_layer(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    units = [Unit(i, s, ((576, 576 if s != "gate_up" else 3072),)) for i in range(16)
             for s in ("qkv", "o", "gate_up", "down")]
    total = sum(u.weights for u in units)
    for budget in (2.5, 3.0, 4.44, 4.6, 6.0, 8.5):
        w = rule_allocation(units, budget)
        assert stored_bits(units, w) <= budget * total
    w = rule_allocation(units, 2.6)
    upgraded = sorted(k for k, v in w.items() if v > 2)
    assert upgraded and all(st in ("qkv", "down") and more_bits_layer(li, 16) for li, st in upgraded)


@pytest.fixture(scope="module")
def stories_table(stories_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    table, ev, ref = measure_sensitivity(model, *_stories_inputs(model), progress=False)  # two solver processes
    return model, table


def _stories_inputs(model):
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(3, model.config.vocab_size, (4, 128), generator=g)
    return QuantSpec.build(budget=3.0, sensitivity_tokens=256, nsamples=4, seqlen=128), windows


def test_sensitivity_in_one_process_equals_the_worker_pool(stories_table):
    """The solves run in worker processes by default; in this process (workers=1) the table is the same."""
    model, table = stories_table
    inline, _, _ = measure_sensitivity(model, *_stories_inputs(model), progress=False, workers=1)
    assert inline.units == table.units
    for u in table.units:
        for b in BITS:
            assert inline.error[u.key][b] == pytest.approx(table.error[u.key][b], rel=1e-6, abs=1e-12)
            assert inline.proxy[u.key][b] == pytest.approx(table.proxy[u.key][b], rel=1e-6, abs=1e-12)


def test_stories260k_budgets_are_met_exactly(stories_table):
    """Every budget between the smallest and 8.5 bits: the widths never exceed it, and what they leave unused is
    less than any upgrade of any unit (nothing that fits is left out)."""
    model, table = stories_table
    units = table.units
    assert units == units_of(model) and len(units) == 4 * model.config.num_hidden_layers
    for u in units:  # KL measured at 2 and 4 bits, 8 scaled from 4; finer widths never worse
        e = table.error[u.key]
        assert e[2] > e[4] > e[8] >= 0 and table.proxy[u.key][2] > table.proxy[u.key][4] > table.proxy[u.key][8]
    total = sum(u.weights for u in units)
    lo = bpw(units, {u.key: 2 for u in units})
    for budget in [lo] + [b for b in (2.5, 2.75, 3.0, 3.5, 4.5, 5.5, 6.5, 8.5) if b > lo]:
        w = allocate(units, table.error, budget)
        used = stored_bits(units, w)
        assert used <= budget * total
        left = budget * total - used
        assert all(u.stored_bits(w2) - u.stored_bits(w[u.key]) > left for u in units for w2 in BITS if w2 > w[u.key])
    assert table.predicted(allocate(units, table.error, 4.5)) < table.predicted(allocate(units, table.error, 3.0))


def test_sensitivity_file_round_trip(stories_table, tmp_path):
    model, table = stories_table
    path = tmp_path / "s.json"
    table.save(path)
    back = Sensitivity.load(path, table.units)
    assert back.error == table.error and back.proxy == table.proxy and back.units == table.units
    with pytest.raises(ValueError, match="do not match"):
        Sensitivity.load(path, table.units[:-1])
    path.write_text("{")
    with pytest.raises(ValueError, match="not a readable sensitivity table"):
        Sensitivity.load(path, table.units)


@pytest.mark.usefixtures("float_activations")
def test_mixed_width_checkpoint_round_trips(tmp_path):
    """A mixed-width model (every width present) saves, loads and gives the fake-quantized logits."""
    from mamp.kernels.packed_linear import PackedLinear
    from mamp.quantizer.export import save_quantized
    from tests.helpers import tiny_tokenizer

    model = tiny_llama(176)
    units = units_of(model)
    widths = {u.key: BITS[i % len(BITS)] for i, u in enumerate(units)}
    spec = QuantSpec.build(budget=bpw(units, widths) + 1e-6)
    windows = torch.randint(3, 503, (4, 32), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 503, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        qm = quantize_model(model, spec, windows, progress=False, widths=widths)
        for name, p in qm.packed.items():
            assert torch.equal(model.get_submodule(name).weight, dequantize(p))
        ref = model(ids).logits
    assert {s.bits for s in qm.stats if s.name != "lm_head"} == set(BITS)
    out = save_quantized(qm, tiny_tokenizer(), tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["budget"] == spec.budget and cfg["budget_scope"] == "linears" and cfg["bits"] == 2
    for (li, st), w in widths.items():
        names = {"qkv": ("self_attn.q_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
                 "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}[st]
        assert {cfg["layers"][f"model.layers.{li}.{n}"]["bits"] for n in names} == {w}
    loaded, _ = load_checkpoint(out)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, PackedLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget-assets")
    return d, save_tiny(d / "tiny"), write_text(d / "calib.txt", 4000)


def test_budget_cli_end_to_end(assets, tmp_path, capsys):
    """--bits 3.0: the summary lists widths and errors, the checkpoint stays within the budget, and a saved
    sensitivity table is read back by the next run (same widths at the same budget)."""
    _, model, calib = assets
    sens = tmp_path / "sens.json"
    argv = [str(model), "--calib", str(calib), "--nsamples", "4", "--seqlen", "64", "--sensitivity-tokens", "128",
            "--sensitivity", str(sens)]
    assert main(argv + ["--out", str(tmp_path / "a"), "--bits", "3.0"]) == 0
    out = capsys.readouterr().out
    assert "budget 3 bits per weight over the linears (measured allocation)" in out and "layer 1: qkv " in out
    assert "predicted" in out and "measured" in out and sens.is_file()
    assert "method mamp  widths per unit above" in out and "  bits 2  " not in out  # not the base width as the model's
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    dec = [s for n, s in cfg["layers"].items() if n != "lm_head"]

    def dec_bpw(specs):
        from mamp.kernels.packing import PackSpec
        ps = [PackSpec.from_dict(s) for s in specs]
        return sum(p.stored_bits() for p in ps) / sum(p.in_features * p.out_features for p in ps)

    assert dec_bpw(dec) <= 3.0 and len({s["bits"] for s in dec}) > 1
    assert main(argv + ["--out", str(tmp_path / "b"), "--bits", "3.0"]) == 0
    assert f"sensitivity: read {sens}" in capsys.readouterr().out
    cfg_b = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    assert {n: s["bits"] for n, s in cfg_b["layers"].items()} == {n: s["bits"] for n, s in cfg["layers"].items()}
    # The rule, and a whole-model budget (the tiny model's 8-bit lm_head and embedding count too).
    assert main(argv[:-2] + ["--out", str(tmp_path / "c"), "--bits", "4.5", "--allocation", "rule"]) == 0
    assert "(rule allocation)" in capsys.readouterr().out
    assert main(argv[:-2] + ["--out", str(tmp_path / "d"), "--bits", "6", "--budget-scope", "model"]) == 0
    text = capsys.readouterr().out
    line = next(l for l in text.splitlines() if l.startswith("whole model"))
    assert float(line.split(", ")[-1].split()[0]) <= 6.0


def run_bad(capsys, out: Path, argv, match):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert match in err, err
    assert not out.exists()


@pytest.mark.parametrize("flags,match", [
    (["--bits", "1.5"], "below the smallest this model can be stored in"),
    (["--bits", "9"], "at most 8.5"),
    (["--bits", "three"], "--bits takes a width"),
    (["--bits", "3.0", "--salient-fraction", "0.1"], "own salient defaults"),
    (["--bits", "4", "--allocation", "rule"], "need a budget"),
    (["--bits", "3.0", "--method", "rtn"], "needs calibration data"),
    (["--bits", "2.5", "--budget-scope", "model"], "over the whole model is below the smallest"),
])
def test_bad_budgets(assets, tmp_path, capsys, flags, match):
    _, model, calib = assets
    out = tmp_path / "q"
    run_bad(capsys, out, [str(model), "--out", str(out), "--calib", str(calib), "--nsamples", "4",
                          "--seqlen", "64"] + flags, match)
