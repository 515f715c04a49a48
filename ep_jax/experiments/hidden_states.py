"""Hidden-state analysis of the dendritic-EP paper (§3.4): EP against DEP.

For one batch of test images, record every layer's state at every free-phase step and
report per step the mean |activation| and the fraction of neurons active
(|s| > threshold). Writes a figure (one column per hidden layer; EP and DEP curves) and
the data as JSON.

    python -m experiments.train --preset mnist-ep      # writes runs/mnist-ep-seed0
    python -m experiments.train --preset mnist-dep     # writes runs/mnist-dep-seed0
    python -m experiments.hidden_states --ep runs/mnist-ep-seed0 --dep runs/mnist-dep-seed0 \
        --out runs/hidden_states

`--ep` is the run folder of a standard-model run (model "ep"), `--dep` that of a
dendritic one; their checkpoints and configs are used. `--examples` (1 up to the test
set's size) test images are analysed; a checkpoint with non-finite parameters (a
diverged run) is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ep_jax
from ep_jax.experiments import checkpoint, cli, engine, figures, files, runfolder
from ep_jax.experiments.checkpoint import CheckpointError
from ep_jax.experiments.config import ConfigError


def trajectory_stats(model, params, buffers, x, rx, t_free, threshold=0.01):
    """Per layer: `{"mean_abs": (T,), "frac_active": (T,)}` over a free phase."""
    eff = model.prepare(params, buffers)
    _, traj = ep_jax.dynamics.free_phase(model, eff, model.input_drive(eff, x), rx.dt, t_free, record=True)
    return [
        {
            "mean_abs": np.asarray(jnp.mean(jnp.abs(t), axis=(1, 2))).tolist(),
            "frac_active": np.asarray(jnp.mean(jnp.abs(t) > threshold, axis=(1, 2))).tolist(),
        }
        for t in traj
    ]


ROLES = {
    "EP": ("ep", "--ep", "a standard-model run (model 'ep')"),
    "DEP": ("dendritic", "--dep", "a dendritic run (model 'dendritic')"),
}


def check_args(n_examples: int, threshold: float):
    """Refuse `--examples` < 1 and a `--threshold` that is not a finite number >= 0."""
    if n_examples < 1:
        raise ConfigError(f"--examples must be >= 1, got {n_examples}")
    if not math.isfinite(threshold) or threshold < 0:
        raise ConfigError(f"--threshold must be a finite number >= 0, got {threshold}")


def check_run(run_dir, role: str | None, n_examples: int):
    """The run folder's validated config, after checking it fits `role` ("EP" or "DEP":
    the model `--ep` / `--dep` needs; None: any) and has at least `n_examples` test images."""
    cfg = files.read_config(run_dir)
    if role is not None:
        model, flag, what = ROLES[role]
        if cfg.model != model:
            raise ConfigError(f"{flag} {run_dir}: is a model={cfg.model!r} run; {flag} needs {what}")
    if n_examples > cfg.n_test():
        raise ConfigError(f"--examples {n_examples}: {run_dir} has only {cfg.n_test()} test images")
    return cfg


def finite_parameters(params, buffers, source):
    """Refuse (`CheckpointError`, naming `source` and the first bad leaf) parameters or
    buffers holding NaN or infinity."""
    from ep_jax.alignment import leaf_names

    for name, v in zip(leaf_names(params), jax.tree.leaves(params)):
        if not np.all(np.isfinite(np.asarray(v))):
            raise CheckpointError(f"{source}: non-finite parameters ({name}); the run diverged or the file is damaged")
    for v in jax.tree.leaves(buffers):
        v = np.asarray(v)
        if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v)):
            raise CheckpointError(f"{source}: non-finite buffers (masks or settings); damaged checkpoint")


def analyse_run(run_dir, n_examples=256, threshold=0.01, role=None):
    """Statistics of one run folder's network on its first `n_examples` test images
    (`role` "EP" / "DEP": also check the run's model)."""
    check_args(n_examples, threshold)
    check_run(run_dir, role, n_examples)
    cfg, model, est, params, buffers, rx, meta = engine.load_run(run_dir)
    source = Path(run_dir) / engine.CHECKPOINT
    epoch = files.checkpoint_epoch(meta, source)
    finite_parameters(params, buffers, source)
    _, _, xte, _ = engine.load_data(cfg)
    x = jnp.asarray(xte[:n_examples], ep_jax.models.base.default_float())
    return {
        "run": str(run_dir),
        "epoch": epoch,
        "model": cfg.model,
        "layers": trajectory_stats(model, params, buffers, x, rx, cfg.t_free, threshold),
    }


def plot(results: dict, path: Path):
    """One column per hidden layer: mean |s| and fraction active against the step."""
    figures.save(plot_figure(results), path, dpi=120)


def plot_figure(results: dict):
    """The figure of `plot` (a matplotlib Figure)."""
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
            figures.integer_ticks(ax.xaxis)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    return fig


def main(argv=None):
    """The command line: hidden-state statistics of an EP and a DEP run."""
    p = argparse.ArgumentParser(
        prog=cli.prog("hidden_states"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ep", required=True, help="run folder of an EP run")
    p.add_argument("--dep", required=True, help="run folder of a DEP run")
    p.add_argument("--out", default="runs/hidden_states", help="output folder (default runs/hidden_states)")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.01)
    cli.add_common(p)
    a = p.parse_args(argv)
    out = Path(a.out)
    check_args(a.examples, a.threshold)
    runs = {"EP": a.ep, "DEP": a.dep}
    for role, run_dir in runs.items():  # both configs checked before either checkpoint is read
        check_run(run_dir, role, a.examples)
    results = {role: analyse_run(d, a.examples, a.threshold, role) for role, d in runs.items()}
    fig = plot_figure(results)
    runfolder.claim_outputs(out, ["hidden_states.json", "hidden_states.png"], "hidden-states")  # not over a user's
    checkpoint.atomic_write_text(out / "hidden_states.json", json.dumps(results, indent=1) + "\n")
    figures.save(fig, out / "hidden_states.png", dpi=120)
    for name, r in results.items():
        for l, st in enumerate(r["layers"][:-1], start=1):
            print(
                f"{name} layer {l}: final mean|s| {st['mean_abs'][-1]:.4f}, active {100 * st['frac_active'][-1]:.1f}%"
            )
    print(f"wrote {out}/hidden_states.png and .json")


if __name__ == "__main__":
    sys.exit(cli.main_wrapper(main))
