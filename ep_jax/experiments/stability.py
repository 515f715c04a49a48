"""Heterogeneous-time-step runs in the layout of the HTS paper's Table 1, with stability.

    python -m experiments.stability runs/reproduce-table1 --out table1.md

Reads run folders like `experiments.aggregate` (single runs and sweep members alike;
cells = same config except the seed, never pooled across settings), with the same checks:
a run whose config.json is not the one its checkpoint was written for (edited after the
run, which would move it into another cell) is refused in one line. For every cell that
is a Table 1 cell (dataset, hidden dt distribution, output dt):
- final test accuracy, mean ± std over seeds (sample std), against the paper;
- fluctuation: the standard deviation of the epoch-to-epoch changes of test accuracy
  over the last `--last` epochs of each run (percentage points), averaged over runs — a
  run whose accuracy keeps jumping scores high even when its final number is good;
- diverged and unfinished runs, counted.
Runs at a Table 1 position with other settings than the paper's network (another
learning rate, a subset) are listed there separately and marked; other cells are listed
below the tables. Accuracies are percent, as in every run folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ep_jax.experiments import aggregate, checkpoint, cli, runfolder
from ep_jax.experiments.config import ConfigError
from ep_jax.experiments.presets import HTS_DISTS, HTS_DT_OUT, PUBLISHED_TABLE1, table1_cell, table1_position


def fluctuation(test_acc, last: int = 10) -> float:
    """Std of successive differences of the last `last` epochs' test accuracy (nan if < 3)."""
    a = np.asarray(test_acc[-last:], float)
    return float(np.std(np.diff(a), ddof=1)) if len(a) >= 3 else float("nan")


def _fmt(x, spec=".2f"):
    return "–" if x is None or not np.isfinite(x) else format(x, spec)


def stability_cells(cs: list[dict], last: int) -> dict:
    """`{(dataset, dist, dt_out): [cell stats, ...]}` — a list, since several configs
    (other settings) can map to the same Table 1 position; they are never pooled."""
    out: dict = {}
    for c in cs:
        key = table1_position(c["config"])
        if key is None:
            continue
        ok = [r for r in c["runs"] if (r["summary"] or {}).get("status") == "ok"]
        fl = [fluctuation([m["test_acc"] for m in r["metrics"]], last) for r in ok]
        fl = [f for f in fl if np.isfinite(f)]
        m, s = aggregate.mean_std(c["final"])
        out.setdefault(key, []).append(
            {
                "n": len(c["final"]),
                "mean": m,
                "std": s,
                "other_settings": table1_cell(c["config"]) is None,
                "fluct": float(np.mean(fl)) if fl else float("nan"),
                "diverged": len(c["diverged"]),
                "unfinished": len(c["unfinished"]),
            }
        )
    return out


def format_table1(table: dict) -> str:
    """Markdown: per dataset, one row per output dt, one column per hidden dt distribution."""
    lines = []
    for ds in sorted({k[0] for k in table}):
        lines += [f"\n### {ds}\n", "| dt_out | " + " | ".join(HTS_DISTS) + " |", "|---|" + "---|" * len(HTS_DISTS)]
        for dt in HTS_DT_OUT:
            cells = []
            for dist in HTS_DISTS:
                entries = table.get((ds, dist, round(dt, 2)), [])
                pub = PUBLISHED_TABLE1.get((ds, dist, round(dt, 2)))
                ours = (
                    " / ".join(
                        f"**{_fmt(e['mean'])} ± {_fmt(e['std'])}** (n={e['n']}, fluct {_fmt(e['fluct'])}"
                        + (f", {e['diverged']} diverged" if e["diverged"] else "")
                        + (f", {e['unfinished']} unfinished" if e["unfinished"] else "")
                        + (", other settings than the paper's" if e["other_settings"] else "")
                        + ")"
                        for e in entries
                    )
                    or "–"
                )
                cells.append(ours + (f"; paper {pub[0]:.2f} ± {pub[1]:.2f}" if pub else ""))
            lines.append(f"| {dt:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(paths, last: int = 10) -> str:
    """The Table 1 report of the runs at or below `paths` (module docstring)."""
    if last < 3:
        raise ConfigError(f"--last must be >= 3 (the std of epoch-to-epoch changes needs 3 epochs), got {last}")
    runs = aggregate.load_runs(paths)
    cs = aggregate.cells(runs)
    table = stability_cells(cs, last)
    text = (
        "Test accuracy (%): ours **mean ± std** over seeds (n, fluctuation = std of epoch-to-epoch "
        f"changes over the last {last} epochs) ; paper Table 1.\n" + format_table1(table)
    )
    others = [c for c in cs if table1_position(c["config"]) is None]
    if others:
        text += "\nOther cells:\n\n" + aggregate.table(others)
    return text


def main(argv=None):
    """The command line: the Table 1 report of the given run folders."""
    p = cli.runs_parser(cli.prog("stability"), __doc__)
    p.add_argument("--last", type=int, default=10, help="epochs used for the fluctuation")
    p.add_argument("--out")
    cli.add_common(p)
    a = p.parse_args(argv)
    text = report(a.runs, a.last)
    print(text)
    if a.out:
        runfolder.claim_output_file(a.out, "stability --out")  # never over a file ep_jax did not write
        checkpoint.atomic_write_text(Path(a.out), text)


if __name__ == "__main__":
    sys.exit(cli.main_wrapper(main))
