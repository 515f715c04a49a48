"""EP-vs-BPTT alignment over training, pooled over seeds: a figure and a table.

    python -m experiments.alignment_report runs/alignment_study_mnist --out runs/alignment_study_mnist

Reads run folders trained with `align_every` (their `metrics.jsonl` rows carry the
alignment records) and groups them into cells like `experiments.aggregate` (same config
except the seed). The figure has one column per cell: the per-parameter cosine between
the run's estimator and truncated BPTT against the training step (seeds' mean, min–max
band), and the angle between the full gradient vectors. The table gives, per cell and
parameter, the cosine at the first measurement, after 100 steps, and the mean over the
last 10 measurements, with the measuring cost (alignment time ÷ training time).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ep_jax.experiments import aggregate, checkpoint, cli, figures, runfolder
from ep_jax.experiments.config import ConfigError
from ep_jax.experiments.errors import RunError


def records(run: dict) -> list[dict]:
    """A run's alignment records, in order (checked by `files.read_metrics`)."""
    return [r for row in run["metrics"] for r in row.get("alignment", [])]


def series(runs: list[dict]):
    """`(steps, {name: (seeds, T) cosines}, (seeds, T) angles)` on the steps all runs share;
    RunError when they share none or name other parameters."""
    with_recs = [r for r in runs if records(r)]
    recs = [records(r) for r in with_recs]
    if not recs:
        return None
    common = sorted(set.intersection(*[{x["step"] for x in r} for r in recs]))
    if not common:
        raise RunError(
            f"{', '.join(r['dir'] for r in with_recs)}: the runs of one cell share no alignment step "
            "(other align_every or damaged metrics)"
        )
    by = [{x["step"]: x for x in r} for r in recs]
    names = list(recs[0][0]["cosine"])
    for run, b in zip(with_recs, by):
        for st in common:
            if sorted(b[st]["cosine"]) != sorted(names):
                raise RunError(
                    f"{run['dir']}/metrics.jsonl: alignment at step {st} names parameters "
                    f"{sorted(b[st]['cosine'])}, the cell's others {sorted(names)}"
                )
    cos = {n: np.array([[b[s]["cosine"][n] for s in common] for b in by]) for n in names}
    ang = np.array([[b[s]["angle"] for s in common] for b in by])
    return np.array(common), cos, ang


def report(paths, out: Path | None) -> str:
    """The table (markdown) of the runs at or below `paths`; with `out`, also the figure
    and the table written there (atomically)."""
    runs = [aggregate.load_run(p) for p in aggregate.find_runs(paths)]
    cs = [c for c in aggregate.cells(runs) if any(records(r) for r in c["runs"])]
    if not cs:
        raise ConfigError("no run with alignment records (train with --set align_every=N)")
    lines = [
        "| cell | parameter | cosine at step 0 | at step ~100 | mean of the last 10 | seeds |",
        "|---|---|---|---|---|---|",
    ]
    costs = []
    for c in cs:
        steps, cos, ang = series(c["runs"])
        i100 = int(np.argmin(np.abs(steps - 100)))
        for n, v in cos.items():
            lines.append(
                f"| {aggregate.cell_label(c['config'])} {c['config'].model} | `{n}` | {v[:, 0].mean():.3f} | "
                f"{v[:, i100].mean():.3f} | {v[:, -10:].mean():.3f} | {v.shape[0]} |"
            )
        lines.append(
            f"| {aggregate.cell_label(c['config'])} {c['config'].model} | angle (°) | {ang[:, 0].mean():.1f} | "
            f"{ang[:, i100].mean():.1f} | {ang[:, -10:].mean():.1f} | {ang.shape[0]} |"
        )
        t_train = sum(row["time_s"] for r in c["runs"] for row in r["metrics"])
        t_align = sum(row.get("align_time_s", 0.0) for r in c["runs"] for row in r["metrics"])
        every = c["config"].align_every
        costs.append(
            f"{aggregate.cell_label(c['config'])} {c['config'].model}: measuring every {every} steps "
            f"cost {t_align:.1f} s for {t_train:.0f} s of training"
            + (f" ({100 * t_align / t_train:.1f} %)" if t_train > 0 else "")
        )
    text = "\n".join(lines) + "\n\n" + "\n".join(f"- {s}" for s in costs) + "\n"
    if out is not None:
        fig = plot_figure(cs)
        runfolder.claim_outputs(
            out, ["alignment_over_training.png", "alignment_over_training.md"], "alignment_report"
        )  # never over a file ep_jax did not write
        figures.save(fig, out / "alignment_over_training.png", dpi=110)
        checkpoint.atomic_write_text(out / "alignment_over_training.md", text)
    return text


def plot(cs, path: Path):
    """`plot_figure` written to `path` (atomically)."""
    figures.save(plot_figure(cs), path, dpi=110)


def plot_figure(cs):
    """Per cell: cosine per parameter and the angle between the full gradients against
    the training step (seeds' mean and min–max band); a matplotlib Figure."""
    plt = figures.pyplot()
    fig, axes = plt.subplots(2, len(cs), figsize=(5.2 * len(cs), 6.4), squeeze=False)
    for j, c in enumerate(cs):
        steps, cos, ang = series(c["runs"])
        ax = axes[0, j]
        for k, (n, v) in enumerate(cos.items()):
            ax.fill_between(steps, v.min(0), v.max(0), color=f"C{k}", alpha=0.25)
            ax.plot(steps, v.mean(0), color=f"C{k}", label=n)
        ax.set_ylim(-0.2, 1.05)
        ax.set_title(f"{aggregate.cell_label(c['config'])}: {c['config'].model} / {c['config'].estimator}", fontsize=9)
        ax.set_ylabel("cosine(EP, truncated BPTT)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1, j]
        ax.fill_between(steps, ang.min(0), ang.max(0), color="k", alpha=0.2)
        ax.plot(steps, ang.mean(0), "k-")
        ax.set_xlabel("training step")
        ax.set_ylabel("angle between full gradients (°)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv=None):
    """The command line: the alignment table (and with --out the figure)."""
    p = cli.runs_parser(cli.prog("alignment_report"), __doc__)
    p.add_argument("--out", help="write alignment_over_training.png and .md here")
    cli.add_common(p)
    a = p.parse_args(argv)
    print(report(a.runs, Path(a.out) if a.out else None))


if __name__ == "__main__":
    sys.exit(cli.main_wrapper(main))
