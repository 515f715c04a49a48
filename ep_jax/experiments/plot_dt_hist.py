"""Histograms of sampled hidden-layer time steps (the HTS paper's Figure 1).

    python -m experiments.plot_dt_hist --out runs/hts

Samples 1024 hidden `dt` per distribution with the documented defaults of
`ep_jax.timesteps` (or `--mean/--std/--dt-min/--dt-max`) and writes `dt_hist.png` and
`dt_hist.json` (the samples' summary: mean, std, fraction at each bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

from ep_jax import timesteps
from ep_jax.experiments import checkpoint, cli, figures, runfolder


def sample(n: int, seed: int, given: dict) -> dict:
    """`{dist: (spec, sampled dt)}` for every distribution: `n` hidden time steps drawn
    with the documented defaults, overridden by `given` (mean, std, dt_min, dt_max)."""
    out = {}
    for i, dist in enumerate(timesteps.DISTRIBUTIONS):
        spec = dataclasses.replace(timesteps.default_spec(dist), **{k: v for k, v in given.items() if v is not None})
        out[dist] = spec, np.asarray(timesteps.sample_dt(jax.random.fold_in(jax.random.PRNGKey(seed), i), spec, n))
    return out


def title(dist: str, spec, dt) -> str:
    """A panel's title: what is drawn (the scalar baseline is one dt, without a spread)."""
    if dist == "scalar":
        return f"scalar: every neuron dt = {float(np.asarray(dt).flat[0]):g}"
    return f"{dist}: μ={spec.mean:g}, σ={spec.std:g}"


def figure(samples: dict, n: int):
    """One histogram per distribution, the clip bounds as dashed/dotted lines with a legend."""
    plt = figures.pyplot()
    fig, axes = plt.subplots(1, len(samples), figsize=(3.5 * len(samples), 3.2), squeeze=False)
    for i, (ax, (dist, (spec, dt))) in enumerate(zip(axes[0], samples.items())):
        ax.hist(dt, bins=np.linspace(0, spec.dt_max * 1.05, 43), color="C%d" % i, label="sampled dt")
        ax.axvline(spec.dt_max, color="k", ls="--", lw=0.8, label=f"clip dt_max = {spec.dt_max:g}")
        ax.axvline(spec.dt_min, color="k", ls=":", lw=0.8, label=f"clip dt_min = {spec.dt_min:g}")
        ax.set_title(title(dist, spec, dt), fontsize=9)
        ax.set_xlabel("hidden dt")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel(f"neurons (of {n})")
    fig.tight_layout()
    return fig


def main(argv=None):
    """The command line: sample, summarise and draw the hidden time steps."""
    p = argparse.ArgumentParser(
        prog=cli.prog("plot_dt_hist"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/hts", help="output folder (default runs/hts)")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mean", type=float)
    p.add_argument("--std", type=float)
    p.add_argument("--dt-min", type=float)
    p.add_argument("--dt-max", type=float)
    cli.add_common(p)
    a = p.parse_args(argv)
    if a.n < 1:
        raise ValueError(f"--n must be >= 1, got {a.n}")
    given = {"mean": a.mean, "std": a.std, "dt_min": a.dt_min, "dt_max": a.dt_max}
    samples = sample(a.n, a.seed, given)
    summary = {
        dist: {
            "spec": dataclasses.asdict(spec),
            "mean": float(dt.mean()),
            "std": float(dt.std()),
            "frac_at_dt_max": float(np.mean(dt == spec.dt_max)),
            "frac_at_dt_min": float(np.mean(dt == spec.dt_min)),
        }
        for dist, (spec, dt) in samples.items()
    }
    fig = figure(samples, a.n)
    out = Path(a.out)
    runfolder.claim_outputs(out, ["dt_hist.png", "dt_hist.json"], "plot-dt-hist")  # never over a user's file
    figures.save(fig, out / "dt_hist.png", dpi=120)
    checkpoint.atomic_write_text(out / "dt_hist.json", json.dumps(summary, indent=2) + "\n")
    for d, s in summary.items():
        print(
            f"{d:10s} mean {s['mean']:.4f} std {s['std']:.4f} at dt_max {100 * s['frac_at_dt_max']:.1f}% "
            f"at dt_min {100 * s['frac_at_dt_min']:.1f}%"
        )
    print(f"wrote {out}/dt_hist.png")


if __name__ == "__main__":
    sys.exit(cli.main_wrapper(main))
