"""Collect run folders into cells: mean ± std over seeds, against the papers' numbers.

    python -m experiments.aggregate runs/paper000_seeds_mnist_dep runs/mnist-dep-seed0 --out table2.md

Each argument is a run folder, a sweep folder, or any folder holding run folders (found
recursively by their `config.json`). Single runs and sweep members have the same layout,
so they mix freely.

A *cell* is every run with the same full config except the seed (and the data folder's
path): runs with other settings are other cells, never pooled. Per cell: n runs, the
seeds, final test accuracy mean ± std (sample std), best-epoch accuracy, the paper's
value where the config is one of its table cells (the preset's settings; only seed, epochs
and bookkeeping fields may differ), and the distance from it in published standard
deviations. A run of a cell's dataset, model and estimator with other settings (a smoke
run, another learning rate) shows the paper's number in parentheses, without a distance. Repeated seeds are reported and counted once (the run with more
epochs); diverged runs are counted and left out of the mean; runs that did not finish
(interrupted, failed, running) are listed, not used.

A run folder's files are checked against each other before it counts (docs/experiments.md,
"What is trusted"): a finished run's `summary.json` must say what its `metrics.jsonl` says,
and where a checkpoint is present, `config.json` must be the config it was written for and
`metrics.jsonl` must hold its history; anything else is one error naming the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ep_jax.experiments import checkpoint, cli, figures, files, runfolder
from ep_jax.experiments.config import ConfigError, RunConfig
from ep_jax.experiments.errors import RunError
from ep_jax.experiments.presets import PUBLISHED_TABLE2, published, table1_cell, table2_cell, table2_position

CELL_EXCLUDE = ("seed", "data_dir")


def find_runs(paths) -> list[Path]:
    """Run folders (holding config.json) at or below `paths`, sorted, without repeats."""
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(2, "no such run folder", str(p))
        if (p / "config.json").is_file():
            out.append(p)
        elif p.is_dir():
            out += sorted(c.parent for c in p.rglob("config.json"))
    return list(dict.fromkeys(out))


def load_run(path: Path) -> dict:
    """`{"dir", "config", "summary", "metrics"}` of a run folder (summary may be None),
    every file checked (`files`): a damaged file is an error naming it, never a cell. The
    files are checked against each other too (docs/experiments.md, "What is trusted"): a
    finished run's summary against its metrics, and where the run has a checkpoint, its
    config digest against config.json and its history against metrics.jsonl."""
    cfg, summary, rows = files.read_config(path), files.read_summary(path), files.read_metrics(path)
    files.check_summary_matches_metrics(summary, rows, path)
    files.check_checkpoint_record(
        path, cfg, files.read_json(Path(path) / "config.json", "table"), rows, summary["status"] if summary else None
    )
    return {"dir": str(path), "config": cfg, "summary": summary, "metrics": rows}


def cell_key(cfg: RunConfig) -> str:
    """The cell a config belongs to: its JSON without the seed and the data folder."""
    return json.dumps({k: v for k, v in cfg.to_json().items() if k not in CELL_EXCLUDE}, sort_keys=True)


def cells(runs: list[dict]) -> list[dict]:
    """Group runs into cells (module docstring), in order of first appearance."""
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(cell_key(r["config"]), []).append(r)
    out = []
    for rs in groups.values():
        cfg = rs[0]["config"]
        by_seed: dict[int, list] = {}
        for r in rs:
            by_seed.setdefault(r["config"].seed, []).append(r)
        repeated = sorted(s for s, v in by_seed.items() if len(v) > 1)
        chosen = [max(v, key=lambda r: len(r["metrics"])) for v in by_seed.values()]
        status = lambda r: (r["summary"] or {}).get("status", "no summary")
        done = [r for r in chosen if status(r) == "ok" and r["summary"]["final_test_acc"] is not None]
        out.append(
            {
                "config": cfg,
                "runs": rs,
                "seeds": sorted(by_seed),
                "repeated_seeds": repeated,
                "final": [r["summary"]["final_test_acc"] for r in done],
                "best": [r["summary"]["best_test_acc"] for r in done],
                "epochs": sorted({r["summary"]["epochs_done"] for r in done}),
                "diverged": [r["dir"] for r in chosen if status(r) == "diverged"],
                "unfinished": [(r["dir"], status(r)) for r in chosen if status(r) not in ("ok", "diverged")],
                "paper": published(cfg),
            }
        )
    return out


def mean_std(v):
    """`(mean, sample std)` of `v`; nan for what is undefined (no values; one value's std)."""
    v = np.asarray(v, float)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def _fmt_ms(v):
    m, s = mean_std(v)
    if not np.isfinite(m):
        return "–"
    return f"{m:.2f} ± {s:.2f}" if np.isfinite(s) else f"{m:.2f}"


def cell_label(cfg: RunConfig) -> str:
    """A cell's name in tables and figures (its Table 1/2 cell where it is one)."""
    t2, t1 = table2_cell(cfg), table1_cell(cfg)
    if t2:
        return f"Table 2 {t2[0].upper()} {t2[1].upper()}"
    if t1:
        return f"Table 1 {t1[0]} {t1[1]} dt_out={t1[2]:.2f}"
    pos = table2_position(cfg)
    if pos:
        return f"{pos[0].upper()} {pos[1].upper()}, other settings than Table 2"
    return f"{cfg.dataset} {cfg.model}/{cfg.estimator} {'-'.join(map(str, cfg.sizes))}"


def varying_fields(cs: list[dict]) -> list[str]:
    """Config fields (other than the seed) that differ between cells."""
    if len(cs) < 2:
        return []
    dicts = [c["config"].to_json() for c in cs]
    return [k for k in dicts[0] if k not in CELL_EXCLUDE and len({json.dumps(d[k], sort_keys=True) for d in dicts}) > 1]


def table(cs: list[dict]) -> str:
    """Markdown: one row per cell."""
    vary = varying_fields(cs)
    head = (
        ["cell"] + vary + ["n", "seeds", "final test %", "best test %", "epochs done", "paper", "Δ (paper σ)", "notes"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cs:
        cfg = c["config"].to_json()
        m, _ = mean_std(c["final"])
        if c["paper"] and np.isfinite(m):
            pm, ps = c["paper"]
            paper, delta = f"{pm:.2f} ± {ps:.2f}", f"{(m - pm) / ps:+.1f}"
        elif c["paper"]:
            paper, delta = f"{c['paper'][0]:.2f} ± {c['paper'][1]:.2f}", "–"
        elif table2_position(c["config"]):
            pm, ps = PUBLISHED_TABLE2[table2_position(c["config"])]
            paper, delta = f"({pm:.2f} ± {ps:.2f}: other settings)", "–"
        else:
            paper, delta = "–", "–"
        notes = []
        if c["repeated_seeds"]:
            notes.append(f"seed(s) {c['repeated_seeds']} repeated, counted once")
        if c["diverged"]:
            notes.append(f"{len(c['diverged'])} diverged (not in the mean)")
        if c["unfinished"]:
            kinds = sorted({s for _, s in c["unfinished"]})
            part = [r for r in c["runs"] if r["dir"] in {d for d, _ in c["unfinished"]} and r["metrics"]]
            where = ""
            if part:
                last = [r["metrics"][-1]["test_acc"] for r in part]
                eps = sorted({len(r["metrics"]) for r in part})
                where = f"; so far {_fmt_ms(last)} after {eps[0]}" + (f"–{eps[-1]}" if len(eps) > 1 else "") + " epochs"
            notes.append(f"{len(c['unfinished'])} not finished ({', '.join(kinds)}){where}")
        epochs = (
            "–"
            if not c["epochs"]
            else (str(c["epochs"][0]) if len(c["epochs"]) == 1 else f"{c['epochs'][0]}–{c['epochs'][-1]}")
        )
        row = (
            [cell_label(c["config"])]
            + [json.dumps(cfg[k]) for k in vary]
            + [
                str(len(c["final"])),
                ",".join(map(str, c["seeds"])),
                _fmt_ms(c["final"]),
                _fmt_ms(c["best"]),
                epochs,
                paper,
                delta,
                "; ".join(notes),
            ]
        )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def load_runs(paths) -> list[dict]:
    """Every run folder at or below `paths`, read and checked (`load_run`); at least one."""
    runs = [load_run(p) for p in find_runs(paths)]
    if not runs:
        raise ConfigError(f"no run folders (with config.json) under {', '.join(map(str, paths))}")
    return runs


def report(paths, runs: list[dict] | None = None) -> str:
    """The markdown report of the runs at or below `paths` (or of `runs`, already read)."""
    runs = load_runs(paths) if runs is None else runs
    return (
        "Test accuracy (%) per cell (same config, seeds pooled): final epoch mean ± std (sample), "
        "best epoch, and the paper's value with our distance from it in its standard deviations.\n\n"
        + table(cells(runs))
    )


def plot_figure(cs: list[dict]):
    """The figure of `plot` (a matplotlib Figure), or None when no run has an epoch."""
    plt = figures.pyplot()
    cs = [c for c in cs if any(r["metrics"] for r in c["runs"])]
    if not cs:
        return None
    cols = min(3, len(cs))
    rows = -(-len(cs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, c in zip(axes.flat, cs):
        curves = [[m["test_acc"] for m in r["metrics"]] for r in c["runs"] if r["metrics"]]
        T = max(len(v) for v in curves)
        a = np.full((len(curves), T), np.nan)
        for i, v in enumerate(curves):
            a[i, : len(v)] = v
        ep = np.arange(1, T + 1)
        ax.fill_between(ep, np.nanmin(a, 0), np.nanmax(a, 0), alpha=0.3, label=f"{len(curves)} seeds (min–max)")
        # markers: a run of one epoch is one point, which a line alone does not show
        ax.plot(ep, np.nanmean(a, 0), "o-", ms=3, lw=1.5, label="mean")
        if c["paper"]:
            pm, ps = c["paper"]
            ax.axhspan(pm - ps, pm + ps, color="0.5", alpha=0.3)
            ax.axhline(pm, color="0.3", ls="--", lw=1, label=f"paper {pm:.2f} ± {ps:.2f}")
        lo = np.nanpercentile(a[:, min(2, T - 1) :], 1) if T > 2 else np.nanmin(a)
        ax.set_ylim(max(lo - 0.5, 0), min(np.nanmax(a) + 0.5, 100))
        ax.set_title(cell_label(c["config"]), fontsize=9)
        figures.integer_epochs(ax, T)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(cs) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot(cs: list[dict], path) -> None:
    """Test accuracy against epoch, one panel per cell: the seeds' mean with their
    min–max band, and the paper's mean ± std as a grey band; written atomically.
    RunError when no run has a finished epoch (nothing to draw)."""
    fig = plot_figure(cs)
    if fig is None:
        raise RunError("--plot: no run has a finished epoch to draw")
    figures.save(fig, path, dpi=110)


def main(argv=None):
    """The command line: the report of the given run folders (and --out, --plot)."""
    p = cli.runs_parser(cli.prog("aggregate"), __doc__)
    p.add_argument("--out", help="also write the markdown table here")
    p.add_argument("--plot", help="also draw every cell's test accuracy per epoch into this PNG")
    cli.add_common(p)
    a = p.parse_args(argv)
    runs = load_runs(a.runs)
    text = report(a.runs, runs)
    fig = None
    if a.plot:
        fig = plot_figure(cells(runs))
        if fig is None:
            raise RunError("--plot: no run has a finished epoch to draw")
    # every input read and checked: now the outputs, each written whole or not at all, and
    # never over a file ep_jax did not write (runfolder.claim_output_file; both checked first)
    for target, flag in ((a.out, "--out"), (a.plot, "--plot")):
        if target:
            runfolder.check_output_file(target, f"aggregate {flag}")
    for target, flag in ((a.out, "--out"), (a.plot, "--plot")):
        if target:
            runfolder.claim_output_file(target, f"aggregate {flag}")
    if fig is not None:
        figures.save(fig, a.plot, dpi=110)
    print(text)
    if a.out:
        checkpoint.atomic_write_text(Path(a.out), text)


if __name__ == "__main__":
    sys.exit(cli.main_wrapper(main))
