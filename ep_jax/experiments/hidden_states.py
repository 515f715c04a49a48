"""Hidden-state analysis of the dendritic-EP paper (§3.4): EP against DEP.

For one batch of test images, record every layer's state at every free-phase step and
report per step the mean |activation| and the fraction of neurons active
(|s| > threshold). Writes a figure (one column per hidden layer; EP and DEP curves) and
the data as JSON.

    python -m experiments.hidden_states --ep runs/mnist-ep-seed0 --dep runs/mnist-dep-seed0 \
        --out runs/hidden_states

Each of `--ep` / `--dep` is a run folder (its checkpoint and config are used).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import ep_jax
from ep_jax.experiments import cli, engine, figures


def trajectory_stats(model, params, buffers, x, rx, t_free, threshold=0.01):
    """Per layer: `{"mean_abs": (T,), "frac_active": (T,)}` over a free phase."""
    eff = model.prepare(params, buffers)
    _, traj = ep_jax.dynamics.free_phase(model, eff, model.input_drive(eff, x), rx.dt, t_free, record=True)
    return [{"mean_abs": np.asarray(jnp.mean(jnp.abs(t), axis=(1, 2))).tolist(),
             "frac_active": np.asarray(jnp.mean(jnp.abs(t) > threshold, axis=(1, 2))).tolist()}
            for t in traj]


def analyse_run(run_dir, n_examples=256, threshold=0.01):
    """Statistics of one run folder's network on its first `n_examples` test images."""
    cfg, model, est, params, buffers, rx, meta = engine.load_run(run_dir)
    _, _, xte, _ = engine.load_data(cfg)
    x = jnp.asarray(xte[:n_examples], ep_jax.models.base.default_float())
    return {"run": str(run_dir), "epoch": meta["epoch"], "model": cfg.model,
            "layers": trajectory_stats(model, params, buffers, x, rx, cfg.t_free, threshold)}


def plot(results: dict, path: Path):
    """One column per hidden layer: mean |s| and fraction active against the step."""
    plt = figures.pyplot()
    n_hidden = min(len(r["layers"]) for r in results.values()) - 1
    fig, axes = plt.subplots(2, n_hidden, figsize=(4.2 * n_hidden, 6), squeeze=False)
    for name, r in results.items():
        for l in range(n_hidden):
            st = r["layers"][l]
            axes[0, l].plot(st["mean_abs"], label=name)
            axes[1, l].plot(st["frac_active"], label=name)
    for l in range(n_hidden):
        axes[0, l].set_title(f"hidden layer {l + 1}")
        axes[0, l].set_ylabel("mean |activation|")
        axes[1, l].set_ylabel("fraction active")
        axes[1, l].set_xlabel("free-phase step")
        for ax in axes[:, l]:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog=cli.prog("hidden_states"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", required=True, help="run folder of an EP run")
    p.add_argument("--dep", required=True, help="run folder of a DEP run")
    p.add_argument("--out", default="runs/hidden_states", help="output folder (default runs/hidden_states)")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.01)
    cli.add_common(p)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"EP": analyse_run(a.ep, a.examples, a.threshold), "DEP": analyse_run(a.dep, a.examples, a.threshold)}
    (out / "hidden_states.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "hidden_states.png")
    for name, r in results.items():
        for l, st in enumerate(r["layers"][:-1], start=1):
            print(f"{name} layer {l}: final mean|s| {st['mean_abs'][-1]:.4f}, active {100 * st['frac_active'][-1]:.1f}%")
    print(f"wrote {out}/hidden_states.png and .json")



def entry(argv=None) -> int:
    """The command line: `main` behind the one-line error handling; its exit status."""
    return cli.main_wrapper(main, argv)


if __name__ == "__main__":
    sys.exit(entry())
