"""The gradient-descent-updates (GDU) check of Ernoult et al. (2019) as a figure.

    python -m experiments.gdu --preset mnist-ep                       # at initialisation
    python -m experiments.gdu --run runs/mnist-dep-seed0 --float64    # a trained network

For one batch, the EP update accumulated over the first k nudged steps against the BPTT
gradient truncated to the last k free steps, k = 1..T2 (`ep_jax.alignment.gdu`). The
figure shows, per parameter, three randomly chosen components of both curves (EP dashed,
BPTT solid, the same colour per component), and the relative RMSE of every parameter
against k. For the standard model the curves lie on top of each other (small β); for
the dendritic model only the output layer's do (docs/ep-vs-bptt.md).
Writes `gdu.png` and `gdu.json` to `--out` (default `runs/gdu-<preset or run>`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ep_jax
from ep_jax.experiments import checkpoint, cli, engine, figures, files, runfolder
from ep_jax.experiments.config import ConfigError, RunConfig, parse_sets, validate
from ep_jax.experiments.presets import PRESETS


def network(a):
    """`(cfg, model, est, params, buffers, rx, where)` from --run or --preset."""
    if a.run:
        cfg, model, est, params, buffers, rx, meta = engine.load_run(a.run)
        epoch = files.checkpoint_epoch(meta, Path(a.run) / engine.CHECKPOINT)
        return cfg, model, est, params, buffers, rx, f"{a.run} (epoch {epoch})"
    if a.preset not in PRESETS:
        raise ConfigError(f"unknown preset {a.preset!r}; choose one of {sorted(PRESETS)}")
    cfg = validate(RunConfig.from_dict({**PRESETS[a.preset], **parse_sets(a.set), "seed": a.seed}))
    g = engine.Group([engine.Member(cfg, "gdu", Path("."))])
    state, rx = g.initial()
    tr = ep_jax.sweep.take(state.train, 0)
    return cfg, g.model, g.est, tr.params, tr.buffers, ep_jax.sweep.take(rx, 0), f"{a.preset}, initialisation"


def references(model, est, params, buffers, x, y, rx, res) -> dict:
    """Angles (degrees) of the EP estimate (k = T2), truncated BPTT and full BPTT to the
    implicit equilibrium gradient, and the free phase's relative residual."""
    g_imp, _, info = ep_jax.estimators.implicit_grad(model, params, buffers, x, y, rx, est.t_free)
    g_full, _ = ep_jax.estimate(
        model, ep_jax.Estimator("bptt_full", est.t_free, est.t_nudge), None, params, buffers, x, y, rx
    )
    last = lambda t: jax.tree.map(lambda a: a[-1], t)
    grads = {f"EP ({est.kind})": last(res.ep), "BPTT (last T2 steps)": last(res.bptt), "BPTT (all T1 steps)": g_full}
    return {
        "residual_free": float(info.residual_free),
        "angle_to_implicit": {k: ep_jax.alignment.angle(g, g_imp) for k, g in grads.items()},
    }


def plot(res, names, table, title, path):
    """`plot_figure` written to `path` (atomically)."""
    figures.save(plot_figure(res, names, table, title), path, dpi=110)


def plot_figure(res, names, table, title):
    """Per parameter three components of the −update against k (BPTT solid, EP dashed),
    and every parameter's relative RMSE against k; a matplotlib Figure."""
    plt = figures.pyplot()
    ep_leaves, bp_leaves = jax.tree.leaves(res.ep), jax.tree.leaves(res.bptt)
    n = len(names) + 1
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, name, e, b in zip(axes.flat, names, ep_leaves, bp_leaves):
        e = np.asarray(e).reshape(e.shape[0], -1)
        b = np.asarray(b).reshape(b.shape[0], -1)
        nz = np.flatnonzero(np.abs(b[-1]) > 0)
        pick = rng.choice(nz, size=min(3, nz.size), replace=False) if nz.size else []
        k = np.arange(1, e.shape[0] + 1)
        for c, j in enumerate(pick):
            ax.plot(k, -b[:, j], "-", color=f"C{c}", lw=1.2)
            ax.plot(k, -e[:, j], "--", color=f"C{c}", lw=1.2)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("k")
        ax.set_ylabel("−update component", fontsize=8)
        figures.integer_ticks(ax.xaxis)
        ax.grid(alpha=0.3)
    ax = list(axes.flat)[len(names)]
    for name in names:
        ax.semilogy(
            np.arange(1, len(table[name]["rel_rmse"]) + 1),
            np.maximum(np.asarray(table[name]["rel_rmse"], float), 1e-12),
            label=name,
        )
    ax.set_title("relative RMSE(EP, BPTT)", fontsize=8)
    ax.set_xlabel("k")
    ax.set_ylabel("relative RMSE", fontsize=8)
    figures.integer_ticks(ax.xaxis)
    ax.legend(fontsize=5)
    ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title + "  (−update per component: BPTT solid, EP dashed)", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv=None):
    """The command line: the GDU check of a preset's or a run's network."""
    p = argparse.ArgumentParser(
        prog=cli.prog("gdu"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a network at initialisation from this preset")
    src.add_argument("--run", help="a run folder: its trained network")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --preset: override fields")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="examples in the batch (from the training set)")
    p.add_argument("--float64", action="store_true", help="compute in float64 (recommended)")
    p.add_argument("--out", help="output folder (default runs/gdu-<name>)")
    cli.add_common(p)
    a = p.parse_args(argv)
    if a.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {a.batch}")
    ctx = jax.enable_x64(True) if a.float64 else jax.enable_x64(False)
    with ctx:
        cfg, model, est, params, buffers, rx, where = network(a)
        if not est.is_ep:
            raise ConfigError(f"the GDU check compares an EP estimator with BPTT; this network uses {est.kind!r}")
        est = dataclasses.replace(est, nudge="fixed", solver=ep_jax.solvers.Scan(), nudge_solver=None)
        dtype = jnp.float64 if a.float64 else jnp.float32
        cast = lambda t: jax.tree.map(
            lambda v: jnp.asarray(v, dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, t
        )
        params, buffers, rx = cast(params), cast(buffers), cast(rx)
        xtr, ytr, _, _ = engine.load_data(cfg)
        x, y = jnp.asarray(xtr[: a.batch], dtype), jnp.asarray(ytr[: a.batch])
        res = ep_jax.alignment.gdu(model, est, params, buffers, x, y, rx)
        table = ep_jax.alignment.gdu_table(res)
        refs = references(model, est, params, buffers, x, y, rx, res)
    out = Path(a.out or f"runs/gdu-{Path(a.run).name if a.run else a.preset}")
    runfolder.claim_outputs(out, ["gdu.png", "gdu.json"], "gdu")  # never over a file ep_jax did not write
    title = f"GDU: {where}, {est.kind}, β={float(rx.beta):g}, T1={est.t_free}, T2={est.t_nudge}, batch {a.batch}"
    plot(res, res.names, table, title, out / "gdu.png")
    checkpoint.atomic_write_text(
        out / "gdu.json", json.dumps({"title": title, "per_k": table, "references": refs}, indent=1) + "\n"
    )
    print(title)
    print(f"{'parameter':32s} {'cosine at k=T2':>15s} {'rel RMSE at k=T2':>17s}")
    for name in res.names:
        print(f"{name:32s} {table[name]['cosine'][-1]:15.5f} {table[name]['rel_rmse'][-1]:17.4g}")
    print(
        f"against the equilibrium gradient (implicit; free-phase residual {refs['residual_free']:.2g}): "
        + ", ".join(f"{k} {v:.3g}°" for k, v in refs["angle_to_implicit"].items())
    )
    print(f"wrote {out / 'gdu.png'} and gdu.json")


if __name__ == "__main__":
    sys.exit(cli.main_wrapper(main))
