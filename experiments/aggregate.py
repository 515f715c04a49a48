"""Collect run folders into paper 000's Table 2 layout (mean ± std over seeds).

    python -m experiments.aggregate runs/* --out experiments/results/table2.md

Each cell shows our final test accuracy `mean ± std (n runs)`, the best-epoch accuracy,
and the published number. Runs that diverged are counted and excluded from the mean.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from experiments.presets import PUBLISHED_TABLE2

DATASET_ROW = {"mnist": "mnist", "kmnist": "kmnist", "fashion_mnist": "fmnist", "fmnist": "fmnist"}
METHODS = ("ep", "dep", "dbptt")


def method_of(cfg: dict) -> str:
    if cfg["model"] == "ep" and cfg["estimator"] == "symmetric":
        return "ep"
    if cfg["model"] == "dendritic":
        return {"symmetric": "dep", "bptt": "dbptt"}.get(cfg["estimator"], f"dendritic/{cfg['estimator']}")
    return f"{cfg['model']}/{cfg['estimator']}"


def load_runs(paths):
    runs = []
    for p in map(Path, paths):
        if (p / "summary.json").exists() and (p / "config.json").exists():
            runs.append({"dir": str(p), "config": json.loads((p / "config.json").read_text()),
                         "summary": json.loads((p / "summary.json").read_text())})
    return runs


def cells(runs):
    """`{(dataset_row, method): {"final": [...], "best": [...], "epochs": [...], "diverged": n}}`."""
    out = defaultdict(lambda: {"final": [], "best": [], "epochs": [], "diverged": 0})
    for r in runs:
        key = (DATASET_ROW.get(r["config"]["dataset"], r["config"]["dataset"]), method_of(r["config"]))
        s = r["summary"]
        if s["status"] == "diverged" or s["final_test_acc"] is None:
            out[key]["diverged"] += 1
            continue
        out[key]["final"].append(s["final_test_acc"])
        out[key]["best"].append(s["best_test_acc"])
        out[key]["epochs"].append(s["epochs_done"])
    return dict(out)


def _ms(v):
    v = np.asarray(v, float)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def table2(runs) -> str:
    c = cells(runs)
    lines = ["| | " + " | ".join(m.upper() for m in METHODS) + " |",
             "|---|" + "---|" * len(METHODS)]
    for row in ("mnist", "kmnist", "fmnist"):
        entries = []
        for m in METHODS:
            pub = PUBLISHED_TABLE2[(row, m)]
            cell = c.get((row, m))
            if not cell or not (cell["final"] or cell["diverged"]):
                entries.append(f"– (paper {pub[0]:.2f} ± {pub[1]:.2f})")
                continue
            ours = (f"**{_ms(cell['final'])}** (n={len(cell['final'])}, best {_ms(cell['best'])}, "
                    f"{min(cell['epochs'])}–{max(cell['epochs'])} ep)" if cell["final"] else "all diverged")
            if cell["diverged"]:
                ours += f", {cell['diverged']} diverged"
            entries.append(f"{ours}; paper {pub[0]:.2f} ± {pub[1]:.2f}")
        lines.append(f"| {row.upper()} | " + " | ".join(entries) + " |")
    extra = sorted(k for k in c if k[1] not in METHODS)
    for k in extra:
        lines.append(f"\nother: {k[0]} {k[1]}: {_ms(c[k]['final']) if c[k]['final'] else 'diverged'}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.aggregate", description=__doc__)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", help="write the markdown table here")
    a = p.parse_args(argv)
    text = ("Test accuracy (%), final epoch, mean ± std over runs; paper 000 Table 2 beside.\n\n"
            + table2(load_runs(a.runs)))
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
