"""The relaxation solvers (`ep_jax.solvers`) against each other, per preset, in one process.

For each preset and solver (synchronous `scan`, asynchronous even/odd `async`):

1. steps of the free phase to a relative residual (`dynamics.relative_residual` of the
   last step, or sweep) of 1e-4 / 1e-5 / 1e-6, float64 where the CPU allows, on a small
   batch of the preset's data (at initialisation: a trained network converges more
   slowly, see benchmarks/README.md);
2. the relative error of the symmetric EP gradient, at the preset's T1/T2 and at fewer
   steps, against the implicit gradient at the same β (`estimators.implicit_grad`,
   adjoint of the synchronous step at the fixed point, float64);
3. the wall time of one jitted training step (float32), every configuration interleaved
   and repeated in this one process, so the ratios are fair on a loaded machine.

    python -m benchmarks.solvers --presets mnist-ep,mnist-dep --batch 16 --json benchmarks/results/solvers.json

Writes a table (stdout) and JSON (`--json`). One "step" of `async` is one sweep (both
halves: odd layers, then even layers), which costs what one synchronous step costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ep_jax
from ep_jax import dynamics, solvers
from ep_jax.experiments import build
from ep_jax.experiments.config import RunConfig, validate
from ep_jax.experiments.presets import PRESETS

THRESHOLDS = (1e-4, 1e-5, 1e-6)
DEFAULT_PRESETS = ("mnist-ep", "mnist-dep", "fmnist-dep", "mnist-hts-normal", "fmnist-conv-small", "cifar10-conv-ep")


DATA_DIRS: dict = {}  # dataset -> folder (--data-dir DATASET=PATH)


def network(preset: str, batch: int, dtype):
    """The preset's config, model, a fresh network (seed 0) and its relaxation in `dtype`."""
    values = dict(PRESETS[preset], batch_size=batch, float64=dtype == jnp.float64)
    if values.get("dataset") in DATA_DIRS:
        values["data_dir"] = DATA_DIRS[values["dataset"]]
    cfg = validate(RunConfig.from_dict(values))
    model = build.build_model(cfg)
    params, buffers = model.init(jax.random.PRNGKey(0), dtype, **build.model_settings(cfg))
    rx = build.build_relaxation(cfg, model)
    rx = jax.tree.map(lambda v: jnp.asarray(v, dtype), rx)
    return cfg, model, params, buffers, rx


def data(cfg, model, batch, dtype):
    """The first `batch` training images of the preset's dataset (synthetic noise where the
    files are missing)."""
    try:
        xtr, ytr, _, _ = build.load_data(cfg.replace(subset=max(batch, 64), test_subset=64))
        x, y = jnp.asarray(xtr[:batch], dtype), jnp.asarray(ytr[:batch])
        return x, y, cfg.dataset
    except Exception as e:  # noqa: BLE001 - a benchmark on any machine
        n0 = int(np.prod(model.input_shape)) if hasattr(model, "input_shape") else model.sizes[0]
        x = jax.random.uniform(jax.random.PRNGKey(1), (batch, n0), dtype)
        return x, jnp.arange(batch) % model.n_classes, f"uniform noise ({type(e).__name__})"


def residual_curve(kind, model, eff, ctx, s0, dt, T):
    """Relative residual after each of `T` free steps (sweeps)."""
    dts = dynamics.per_neuron(dt, s0)

    def body(s, _):
        new = (
            dynamics.step(model, eff, ctx, s, None, 0.0, dts)
            if kind == "scan"
            else solvers.async_sweep(model, eff, ctx, s, None, 0.0, dts)
        )
        return new, dynamics.relative_residual(new, s)

    return jax.lax.scan(body, s0, None, length=T)[1]


def first_below(r, thr):
    hit = np.nonzero(r <= thr)[0]
    return int(hit[0]) + 1 if hit.size else None


def rel_err(a, b):
    a, b = (np.concatenate([np.ravel(np.asarray(l, np.float64)) for l in jax.tree.leaves(t)]) for t in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return out


def run_preset(preset, a, solver_rows):
    res = {"preset": preset}
    # --- convergence and gradient error, float64 -----------------------------------------
    dtype = jnp.float64 if a.float64 else jnp.float32
    with jax.enable_x64(a.float64):
        cfg, model, params, buffers, rx = network(preset, a.batch, dtype)
        x, y, source = data(cfg, model, a.batch, dtype)
        res.update(data=source, T1=cfg.t_free, T2=cfg.t_nudge, dtype=jnp.dtype(dtype).name)
        eff = model.prepare(params, buffers)
        ctx = model.input_drive(eff, x)
        s0 = model.zero_state(a.batch, dtype)
        horizon = max(a.horizon, cfg.t_free)
        curve = jax.jit(residual_curve, static_argnums=(0, 1, 6))
        res["steps_to"] = {}
        for kind in ("scan", "async"):
            r = np.asarray(curve(kind, model, eff, ctx, s0, rx.dt, horizon))
            res["steps_to"][kind] = {f"{t:g}": first_below(r, t) for t in THRESHOLDS}
            res["steps_to"][kind]["residual_at_T1"] = float(r[cfg.t_free - 1])
            res["steps_to"][kind]["horizon"] = horizon
        if not a.no_grad:
            g_ref, _, info = ep_jax.estimators.implicit_grad(
                model, params, buffers, x, y, rx, a.ref_steps, tol=1e-6, solver=solvers.Adaptive(1e-13)
            )
            res["implicit_converged"] = bool(info.converged)
            res["grad_error"] = {}
            est_fn = jax.jit(ep_jax.estimate, static_argnums=(0, 1))
            # the EP gradient at the same β with both phases converged: what the relaxation
            # alone can get wrong is the distance to this (the distance to the implicit
            # gradient adds the estimator's O(β²) bias, the same for every solver)
            conv = solvers.Adaptive(1e-13)
            g_conv, aux_c = est_fn(
                model,
                ep_jax.Estimator(t_free=a.ref_steps, t_nudge=a.ref_steps, solver=conv),
                None,
                params,
                buffers,
                x,
                y,
                rx,
            )
            res["converged_ep_vs_implicit"] = rel_err(g_conv, g_ref)
            for name, make in solver_rows(cfg).items():
                est = make()
                g, aux = est_fn(model, est, None, params, buffers, x, y, rx)
                res["grad_error"][name] = {
                    "rel_err": rel_err(g, g_ref),
                    "vs_converged_ep": rel_err(g, g_conv),
                    "residual_free": float(aux.residual_free),
                }
    # --- wall time of a training step, float32, interleaved ------------------------------
    if not a.no_time:
        cfg, model, params, buffers, rx = network(preset, a.batch, jnp.float32)
        x, y, _ = data(cfg, model, a.batch, jnp.float32)
        opt = build.build_optimizer(cfg, model)
        fns = {}
        for name, make in solver_rows(cfg).items():
            est = make()
            state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0), **build.model_settings(cfg))
            step = jax.jit(lambda st, est=est: ep_jax.train_step(model, est, opt, jax.random.PRNGKey(2), st, x, y, rx))
            jax.block_until_ready(step(state))  # compile
            fns[name] = (step, state)
        times = {n: [] for n in fns}
        for _ in range(a.repeats):  # interleaved: every configuration in each round
            for n, (step, state) in fns.items():
                times[n] += [t / a.inner for t in timed(lambda: [step(state) for _ in range(a.inner)][-1], 1)]
        base = statistics.median(times["scan (default)"])
        res["step_ms"] = {
            n: {"median": 1e3 * statistics.median(t), "min": 1e3 * min(t), "x_default": base / statistics.median(t)}
            for n, t in times.items()
        }
    return res


def solver_rows(fewer: float):
    def rows(cfg):
        T1, T2 = cfg.t_free, cfg.t_nudge
        f1, f2 = max(1, round(T1 * fewer)), max(1, round(T2 * fewer))
        return {
            "scan (default)": lambda: ep_jax.Estimator(t_free=T1, t_nudge=T2),
            f"scan T1={f1} T2={f2}": lambda: ep_jax.Estimator(t_free=f1, t_nudge=f2),
            "async": lambda: ep_jax.Estimator(t_free=T1, t_nudge=T2, solver=solvers.Async()),
            f"async T1={f1} T2={f2}": lambda: ep_jax.Estimator(t_free=f1, t_nudge=f2, solver=solvers.Async()),
            "async:1e-5 (budget T1/T2)": lambda: ep_jax.Estimator(t_free=T1, t_nudge=T2, solver=solvers.Async(1e-5)),
            "adaptive:1e-5/scan": lambda: ep_jax.Estimator(
                t_free=T1, t_nudge=T2, solver=solvers.Adaptive(1e-5), nudge_solver=solvers.Scan()
            ),
        }

    return rows


def table(results) -> str:
    lines = ["| preset | T1/T2 | solver | steps to 1e-4 / 1e-5 / 1e-6 | residual at T1 |", "|---|---|---|---|---|"]
    for r in results:
        for kind, s in r["steps_to"].items():
            f = lambda v: "—" if v is None else str(v)
            lines.append(
                f"| {r['preset']} | {r['T1']}/{r['T2']} | {kind} | {f(s['0.0001'])} / {f(s['1e-05'])} / "
                f"{f(s['1e-06'])} (of {s['horizon']}) | {s['residual_at_T1']:.1e} |"
            )
    lines += [
        "",
        "| preset | configuration | grad error vs implicit | vs converged EP (same β) | free residual | "
        "train step ms | × default |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        names = list(r.get("step_ms") or r.get("grad_error") or {})
        for n in names:
            ge = r.get("grad_error", {}).get(n, {})
            st = r.get("step_ms", {}).get(n, {})
            lines.append(
                f"| {r['preset']} | {n} | {ge.get('rel_err', float('nan')):.2e} | "
                f"{ge.get('vs_converged_ep', float('nan')):.1e} | "
                f"{ge.get('residual_free', float('nan')):.1e} | {st.get('median', float('nan')):.1f} | "
                f"{st.get('x_default', float('nan')):.2f} |"
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--horizon", type=int, default=300, help="free steps of the residual curves (at least T1)")
    p.add_argument("--ref-steps", type=int, default=3000, help="most free steps of the implicit reference")
    p.add_argument("--fewer", type=float, default=0.5, help="the reduced step budgets: this fraction of T1/T2")
    p.add_argument("--repeats", type=int, default=15, help="rounds of the interleaved timing")
    p.add_argument("--inner", type=int, default=5, help="training steps per timed call")
    p.add_argument("--float32", dest="float64", action="store_false", help="curves and gradients in float32")
    p.add_argument("--no-grad", action="store_true")
    p.add_argument("--no-time", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--data-dir",
        action="append",
        default=[],
        metavar="DATASET=PATH",
        help="where a dataset's files are (repeatable); default: ep_jax.data's search",
    )
    a = p.parse_args(argv)
    for item in a.data_dir:
        name, _, path = item.partition("=")
        DATA_DIRS[name] = path
    results = []
    for preset in a.presets.split(","):
        t = time.time()
        r = run_preset(preset, a, solver_rows(a.fewer))
        r["seconds"] = round(time.time() - t, 1)
        results.append(r)
        print(json.dumps(r), flush=True)
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(
                json.dumps(
                    {
                        "machine": f"{jax.devices()[0].platform}, {jax.device_count()} device(s)",
                        "batch": a.batch,
                        "results": results,
                    },
                    indent=1,
                )
            )
    print(table(results))


if __name__ == "__main__":
    main()
