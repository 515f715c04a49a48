"""Stability analysis of HTS runs (paper 003's claim) in the layout of its Table 1.

    python -m experiments.stability runs/hts-* --out experiments/results/hts/table1.md

Per (dataset, dt distribution, output dt), over seeds:
- final test accuracy, mean ± std (sample std, ddof = 1);
- fluctuation: the standard deviation of the epoch-to-epoch changes of test accuracy over
  the last `last` epochs of each run (in percentage points), averaged over runs: a run
  whose accuracy keeps jumping has a large value even if its final number is good;
- diverged: how many runs stopped on a non-finite or exploding state.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from experiments.presets import HTS_DISTS, HTS_DT_OUT, PUBLISHED_TABLE1


def load_runs(paths):
    runs = []
    for p in map(Path, paths):
        if not (p / "config.json").exists() or not (p / "summary.json").exists():
            continue
        metrics = [json.loads(l) for l in (p / "metrics.jsonl").read_text().splitlines() if l.strip()] \
            if (p / "metrics.jsonl").exists() else []
        runs.append({"dir": str(p), "config": json.loads((p / "config.json").read_text()),
                     "summary": json.loads((p / "summary.json").read_text()), "metrics": metrics})
    return runs


def fluctuation(test_acc, last: int = 10) -> float:
    """Std of successive differences of the last `last` epochs' test accuracy (nan if < 3)."""
    a = np.asarray(test_acc[-last:], float)
    return float(np.std(np.diff(a), ddof=1)) if len(a) >= 3 else float("nan")


def group_key(cfg):
    dist = cfg.get("dt_dist") or "none"
    dt_out = cfg.get("dt_out") if cfg.get("dt_out") is not None else cfg.get("dt")
    return cfg["dataset"], dist, round(float(dt_out), 4)


def stability_table(runs, last: int = 10):
    groups = defaultdict(list)
    for r in runs:
        groups[group_key(r["config"])].append(r)
    out = {}
    for key, rs in sorted(groups.items()):
        ok = [r for r in rs if r["summary"]["status"] != "diverged" and r["summary"]["final_test_acc"] is not None]
        finals = [r["summary"]["final_test_acc"] for r in ok]
        flucts = [fluctuation([m["test_acc"] for m in r["metrics"]], last) for r in ok]
        flucts = [f for f in flucts if np.isfinite(f)]
        out[key] = {
            "n": len(rs), "diverged": len(rs) - len(ok),
            "mean": float(np.mean(finals)) if finals else float("nan"),
            "std": float(np.std(finals, ddof=1)) if len(finals) > 1 else float("nan"),
            "fluctuation": float(np.mean(flucts)) if flucts else float("nan"),
            "epochs": sorted({len(r["metrics"]) for r in rs}),
        }
    return out


def _fmt(x, spec=".2f"):
    return "–" if x is None or not np.isfinite(x) else format(x, spec)


def format_table1(table) -> str:
    """One markdown table per dataset: rows = output dt, columns = distributions; each cell
    `ours mean ± std (n, fluct, diverged) / paper mean ± std`."""
    lines = []
    for ds in sorted({k[0] for k in table}):
        lines += [f"\n### {ds}\n", "| dt_out | " + " | ".join(HTS_DISTS) + " |", "|---|" + "---|" * len(HTS_DISTS)]
        dts = sorted({k[2] for k in table if k[0] == ds} | set(HTS_DT_OUT))
        for dt in dts:
            cells = []
            for dist in HTS_DISTS:
                c = table.get((ds, dist, round(dt, 4)))
                pub = PUBLISHED_TABLE1.get((ds, dist, round(dt, 2)))
                ours = (f"**{_fmt(c['mean'])} ± {_fmt(c['std'])}** (n={c['n']}, fluct {_fmt(c['fluctuation'])}"
                        + (f", {c['diverged']} diverged" if c["diverged"] else "") + ")") if c else "–"
                cells.append(ours + (f" / {pub[0]:.2f} ± {pub[1]:.2f}" if pub else ""))
            lines.append(f"| {dt:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.stability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--last", type=int, default=10, help="epochs used for the fluctuation")
    p.add_argument("--out")
    a = p.parse_args(argv)
    text = ("Test accuracy (%): ours **mean ± std** over seeds (n runs, fluctuation = std of "
            f"epoch-to-epoch changes over the last {a.last} epochs, diverged runs) / paper 003 Table 1.\n"
            + format_table1(stability_table(load_runs(a.runs), a.last)))
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
