"""How far the EP estimates are from the exact gradient, and whether the phases converge.

    EP_JAX_DATA_DIR=../shared/data python -m experiments.gradient_error --out runs/gradient-error
    ep-jax gradient-error --betas 0.01 0.03 0.1 0.3 0.5 1 --n-points 2 4 8 16

Left panel: for a standard EP network in float64 (sigmoid, `--sizes`, one batch of
`--dataset` training examples, at initialisation), the relative error
‖g − g*‖ / ‖g*‖ of the one-sided, symmetric and holomorphic (N = `--n-points`)
estimates against the exact gradient g* at the free fixed point (the `implicit`
estimator), against |β|; every phase runs `--t-free` steps (long enough to converge).
Right panel: the relative residual ‖s_t − s_{t−1}‖ / ‖s_t‖ of the free phase against t
for the networks of `--presets` (Table 2's settings, at initialisation, a batch of their
own dataset; or trained networks given with `--run`), with each one's T1 marked: is
T1 long enough?

Writes `gradient_error.png` and `gradient_error.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ep_jax
from ep_jax import dynamics
from ep_jax.experiments import checkpoint, cli, engine, figures, runfolder
from ep_jax.experiments.config import ConfigError, RunConfig, validate
from ep_jax.experiments.presets import PRESETS


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ over every leaf."""
    u = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(a)])
    v = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(u - v) / np.linalg.norm(v))


def batch(cfg: RunConfig, n: int, dtype):
    """The first `n` training examples of `cfg`'s dataset."""
    x, y, _, _ = engine.load_data(cfg)
    return jnp.asarray(x[:n], dtype), jnp.asarray(y[:n])


def estimate_errors(a) -> dict:
    """`{"betas", "curves": {label: [error per β]}, "residual_free", ...}` of the left panel."""
    cfg = validate(
        RunConfig.from_dict(
            dict(
                dataset=a.dataset,
                data_dir=a.data_dir,
                model="ep",
                sizes=a.sizes,
                activation=a.activation,
                float64=True,
                seed=a.seed,
            )
        )
    )
    model = ep_jax.EPModel(sizes=tuple(a.sizes), activation=a.activation)
    params, buffers = model.init(jax.random.PRNGKey(a.seed), jnp.float64)
    x, y = batch(cfg, a.batch, jnp.float64)
    T = a.t_free
    curves = {"one-sided": [], "symmetric": []} | {f"holomorphic N={n}": [] for n in a.n_points}
    kinds = {"one-sided": ("one_sided", {}), "symmetric": ("symmetric", {})} | {
        f"holomorphic N={n}": ("holomorphic", {"n_points": n}) for n in a.n_points
    }
    est_jit = jax.jit(ep_jax.estimate, static_argnums=(0, 1))
    rx = ep_jax.make_relaxation(model, beta=a.betas[0], dt=a.dt, dtype=jnp.float64)
    exact, aux = est_jit(model, ep_jax.Estimator("implicit", T, 1, tol=1e-8), None, params, buffers, x, y, rx)
    for beta in a.betas:
        rx = ep_jax.make_relaxation(model, beta=beta, dt=a.dt, dtype=jnp.float64)
        for label, (kind, kw) in kinds.items():
            g, _ = est_jit(model, ep_jax.Estimator(kind, T, T, **kw), None, params, buffers, x, y, rx)
            curves[label].append(rel_err(g, exact))
    return {
        "network": f"EP {'-'.join(map(str, a.sizes))} {a.activation}, float64, dt={a.dt:g}, "
        f"{a.batch} {a.dataset} examples, T1 = T2 = {T}",
        "betas": list(a.betas),
        "curves": curves,
        "residual_free": float(aux.residual_free),
    }


def network(source: str, a):
    """`(label, cfg, model, est, params, buffers, rx)` of a preset (at initialisation) or a run folder."""
    if source in PRESETS:
        cfg = validate(RunConfig.from_dict({**PRESETS[source], "seed": a.seed}))
        g = engine.Group([engine.Member(cfg, source, Path("."))])
        state, rx = g.initial()
        tr = ep_jax.sweep.take(state.train, 0)
        return f"{source} (init)", cfg, g.model, g.est, tr.params, tr.buffers, ep_jax.sweep.take(rx, 0)
    if Path(source).is_dir():
        cfg, model, est, params, buffers, rx, _ = engine.load_run(source)
        return Path(source).name, cfg, model, est, params, buffers, rx
    raise ConfigError(
        f"--presets/--run: {source!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a run folder"
    )


def residual_curves(a, sources) -> dict:
    """`{label: {"t_free", "t_nudge", "free", "at_t_free", "per_layer_at_t_free", "nudge_at_t_nudge", "dt"}}`
    of the right panel: "free" the residual after every free step t = 1..T."""
    out = {}
    for src in sources:
        label, cfg, model, est, params, buffers, rx = network(src, a)
        x, y = batch(cfg, a.batch, jax.tree.leaves(params)[0].dtype)
        eff = model.prepare(params, buffers)
        ctx = model.input_drive(eff, x)
        T = max(a.horizon, est.t_free)
        _, traj = dynamics.free_phase(model, eff, ctx, rx.dt, T, record=True)
        # the state before each step: zero, then the trajectory shifted by one
        prev = tuple(jnp.concatenate([jnp.zeros_like(t[:1]), t[:-1]]) for t in traj)
        free = [float(r) for r in jax.vmap(dynamics.relative_residual)(traj, prev)]
        at_t1 = tuple(t[est.t_free - 1] for t in traj), tuple(p[est.t_free - 1] for p in prev)
        per_layer = [float(r) for r in dynamics.layer_residuals(*at_t1)]
        nudge = None
        if est.is_ep and est.kind != "holomorphic":
            y1h = model.one_hot(y, x.dtype)
            _, r = ep_jax.estimators.ep_nudged_states(model, est, eff, ctx, at_t1[0], y1h, rx, residual=True)
            nudge = float(r)
        out[label] = {
            "t_free": est.t_free,
            "t_nudge": est.t_nudge,
            "free": free,
            "at_t_free": free[est.t_free - 1],
            "per_layer_at_t_free": per_layer,
            "nudge_at_t_nudge": nudge,
            "dt": "per-neuron" if any(jnp.ndim(d) for d in rx.dt) else float(np.asarray(rx.dt[0])),
        }
    return out


def figure(errors: dict, residuals: dict):
    """Error against |β| (log-log) and the free phases' residual against t (log)."""
    plt = figures.pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, errs) in enumerate(errors["curves"].items()):
        style = dict(marker="o", ms=3.5) if label != "holomorphic N=2" else dict(marker="x", ms=7, ls="none")
        ax.loglog(errors["betas"], np.maximum(errs, 1e-17), label=label, color=f"C{i}", **style)
    ax.set_xlabel("|β|")
    ax.set_ylabel(r"$\|g - g^*\| \,/\, \|g^*\|$  ($g^*$: implicit, at the fixed point)")
    ax.set_title(errors["network"], fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    for i, (label, r) in enumerate(residuals.items()):
        t = np.arange(1, len(r["free"]) + 1)
        bx.semilogy(t, np.maximum(r["free"], 1e-17), color=f"C{i}", label=f"{label}: T1 = {r['t_free']}")
        bx.axvline(r["t_free"], color=f"C{i}", ls=":", lw=1)
    bx.set_xlabel("free-phase step t")
    bx.set_ylabel(r"$\|s_t - s_{t-1}\| \,/\, \|s_t\|$")
    bx.set_title("free-phase residual (dotted: T1)", fontsize=9)
    bx.legend(fontsize=7)
    figures.integer_ticks(bx.xaxis)
    fig.tight_layout()
    return fig


def main(argv=None):
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(
        prog=cli.prog("gradient_error"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/gradient-error", help="output folder (default runs/gradient-error)")
    p.add_argument("--dataset", default="mnist", help="dataset of the error panel's batch (default mnist)")
    p.add_argument(
        "--data-dir",
        help="folder with the error panel's dataset files (the presets' datasets are "
        "looked up as train does: EP_JAX_DATA_DIR, ./.data, ...)",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[784, 64, 10], help="the error panel's network")
    p.add_argument("--activation", default="sigmoid", help="a holomorphic activation (tanh | sigmoid | identity)")
    p.add_argument("--dt", type=float, default=0.5, help="time step of the error panel's network")
    p.add_argument("--t-free", type=int, default=300, help="steps of every phase of the error panel")
    p.add_argument("--betas", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0])
    p.add_argument("--n-points", type=int, nargs="+", default=[2, 4, 8], help="N of the holomorphic curves")
    p.add_argument(
        "--presets",
        nargs="*",
        default=["mnist-ep", "mnist-dep", "fmnist-ep", "fmnist-dep"],
        help="networks of the residual panel: presets (at initialisation) or run folders",
    )
    p.add_argument("--horizon", type=int, default=200, help="free steps drawn in the residual panel")
    p.add_argument("--batch", type=int, default=64, help="examples per batch")
    p.add_argument("--seed", type=int, default=0)
    cli.add_common(p)
    a = p.parse_args(argv)
    for name in ("batch", "t_free", "horizon"):
        if getattr(a, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if any(not 0 < b < float("inf") for b in a.betas):
        raise ConfigError(f"--betas must be positive numbers, got {a.betas}")
    if any(n < 2 for n in a.n_points):
        raise ConfigError(f"--n-points must be integers >= 2, got {a.n_points}")
    if not 0 < a.dt <= 1:
        raise ConfigError(f"--dt must lie in (0, 1], got {a.dt}")
    with jax.enable_x64(True):
        errors = estimate_errors(a)
    with jax.enable_x64(False):
        residuals = residual_curves(a, a.presets)
    out = Path(a.out)
    runfolder.claim_outputs(out, ["gradient_error.png", "gradient_error.json"], "gradient-error")  # not over a user's
    figures.save(figure(errors, residuals), out / "gradient_error.png", dpi=110)
    summary = {"errors": errors, "residuals": residuals}
    checkpoint.atomic_write_text(out / "gradient_error.json", json.dumps(summary, indent=1) + "\n")
    print(errors["network"] + f"; free residual of the reference {errors['residual_free']:.2g}")
    labels = list(errors["curves"])
    print(f"{'|β|':>7s} " + " ".join(f"{k:>16s}" for k in labels))
    for i, b in enumerate(errors["betas"]):
        print(f"{b:7.3g} " + " ".join(f"{errors['curves'][k][i]:16.3g}" for k in labels))
    print(f"\n{'network':22s} {'T1':>5s} {'residual at T1':>15s} {'per layer':>28s} {'nudged at T2':>13s}")
    for label, r in residuals.items():
        nud = "-" if r["nudge_at_t_nudge"] is None else f"{r['nudge_at_t_nudge']:.2g}"
        per = " ".join(f"{v:.2g}" for v in r["per_layer_at_t_free"])
        print(f"{label:22s} {r['t_free']:5d} {r['at_t_free']:15.3g} {per:>28s} {nud:>13s}")
    print(f"wrote {out / 'gradient_error.png'} and gradient_error.json")


if __name__ == "__main__":
    sys.exit(cli.main_wrapper(main))
