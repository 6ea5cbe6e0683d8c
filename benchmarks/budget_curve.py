"""Perplexity against bits per weight: mamp's budgets, GPTQ/RTN at uniform widths, llama.cpp's types (issue 17).

    python benchmarks/budget_curve.py --quality benchmarks/results/budget_curve_quality.jsonl \
        --llama benchmarks/results/budget_curve_llama_cpp.jsonl --out benchmarks/results/budget_curve

Reads the rows benchmarks/quality.py --curve and benchmarks/llama_cpp_quality.py wrote (same windows, same
protocol), writes OUT.md (the table, and each target checked: at every mamp budget from 2.5 bits, perplexity
below GPTQ's interpolated between its uniform points and below the best llama.cpp type at the same or fewer
bits, on both bit counts) and OUT.png (matplotlib: the curves over the linears' bits and over the whole file's).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def rows_of(path: Path, protocol: str | None) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    last = {}
    for r in rows:  # the latest row of each name
        if protocol is None or r.get("protocol") == protocol:
            last[r["name"]] = r
    return list(last.values())


def interp(points: list[tuple[float, float]], x: float) -> float | None:
    """log-perplexity interpolated linearly in bits between the two neighbouring points (None outside)."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            t = (x - x0) / (x1 - x0)
            return math.exp((1 - t) * math.log(y0) + t * math.log(y1))
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quality", type=Path, required=True)
    p.add_argument("--llama", type=Path, required=True)
    p.add_argument("--protocol", default="reference")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    q = rows_of(a.quality, a.protocol)
    ll = rows_of(a.llama, a.protocol)
    fl = next((r["perplexity"] for r in q if r["name"] == "float"), None)
    pts = []  # (family, label, bpw linears, bpw file, ppl)
    for r in q:
        if r["name"] == "float":
            continue
        fam = r["name"].split("-")[0]
        pts.append((fam, r["name"], r["decoder_bits_per_weight"], r["model_bits_per_weight"], r["perplexity"]))
    for r in ll:
        if r["type"] != "F32":
            pts.append(("llama.cpp", r["name"], r["bpw_linears"], r["bpw_file"], r["perplexity"]))
    pts.sort(key=lambda t: (t[0], t[2]))
    lines = [f"Protocol: {a.protocol}. Float perplexity {fl:.4f}." if fl else f"Protocol: {a.protocol}.", "",
             "| configuration | bits/weight, linears | bits/weight, whole file | perplexity | x float |",
             "|---|---|---|---|---|"]
    for fam, name, bl, bf, ppl in pts:
        lines.append(f"| {name} | {bl:.3f} | {bf:.3f} | {ppl:.4f} | {ppl / fl:.3f} |" if fl else
                     f"| {name} | {bl:.3f} | {bf:.3f} | {ppl:.4f} | |")
    lines += ["", "Targets, at each mamp budget from 2.5 bits (GPTQ interpolated in log-perplexity between its uniform "
              "points; llama.cpp: the best type with no more bits):", "",
              "| mamp | perplexity | GPTQ at same linears bits | GPTQ at same file bits | best llama.cpp <= linears bits "
              "| best llama.cpp <= file bits | beats all |", "|---|---|---|---|---|---|---|"]
    gq = [(t[2], t[4]) for t in pts if t[0] == "gptq"]
    gqf = [(t[3], t[4]) for t in pts if t[0] == "gptq"]
    lc = [t for t in pts if t[0] == "llama.cpp"]
    for fam, name, bl, bf, ppl in pts:
        if fam != "mamp" or bl < 2.45:  # the 2.5 budget lands at 2.497
            continue
        g1, g2 = interp(gq, bl), interp(gqf, bf)
        l1 = min((t for t in lc if t[2] <= bl + 1e-9), key=lambda t: t[4], default=None)
        l2 = min((t for t in lc if t[3] <= bf + 1e-9), key=lambda t: t[4], default=None)
        beats = all(ppl < c for c in (g1, g2, l1 and l1[4], l2 and l2[4]) if c)

        def fmt(v, t=None):
            return "n/a" if v is None else (f"{v:.4f}" if t is None else f"{v:.4f} ({t[1].split()[-1]})")
        lines.append(f"| {name} | {ppl:.4f} | {fmt(g1)} | {fmt(g2)} | {fmt(l1 and l1[4], l1)} | "
                     f"{fmt(l2 and l2[4], l2)} | {'yes' if beats else 'no'} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'mamp[bench]'): no plot")
        return 0
    # The scale ends above everything but round-to-nearest's collapse; those points are marked at its top.
    cap = 1.3 * max(t[4] for t in pts if t[0] != "rtn")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    style = {"mamp": ("o-", "C0"), "rule": ("s--", "C4"), "gptq": ("^-", "C1"), "rtn": ("v:", "C2"),
             "llama.cpp": ("D-", "C3")}
    for ax, col, label in ((axes[0], 2, "bits per weight, decoder linear layers"),
                           (axes[1], 3, "bits per weight, whole file")):
        for fam, (mk, c) in style.items():
            sel = sorted((t for t in pts if t[0] == fam), key=lambda t: t[col])
            if sel:
                ax.plot([t[col] for t in sel], [t[4] for t in sel], mk, color=c, label=fam)
                if fam == "llama.cpp":
                    for t in sel:
                        ax.annotate(t[1].split()[-1], (t[col], t[4]), fontsize=7, xytext=(3, 3),
                                    textcoords="offset points")
        if fl:
            ax.axhline(fl, color="k", lw=0.8, ls="--", label="float")
        for t in pts:
            if t[4] > cap:
                ax.annotate(f"{t[1]} {t[4]:,.0f}", (t[col], cap), fontsize=7, ha="left", va="top",
                            xytext=(3, -3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_yscale("log")
        ax.set_ylim(0.95 * min(t[4] for t in pts) if not fl else 0.95 * fl, cap)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"WikiText-2 perplexity ({a.protocol} protocol)")
    axes[0].legend()
    fig.suptitle("SmolLM2-135M-Instruct: quality against bits")
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=120)
    print(f"wrote {a.out.with_suffix('.md')} and {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
