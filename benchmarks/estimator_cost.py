"""What each gradient estimator costs per training step: the complex phases of the
holomorphic estimator and the adjoint solve of the implicit one, against symmetric EP.

    python -m benchmarks.estimator_cost [--batch 64] [--repeats 5] [--steps 20]

The network is the MNIST EP cell with a holomorphic activation (784-256-10, sigmoid,
T1 = 60, T2 = 12, batch 64, float32, dt = 0.5 so that the free phase converges and the
implicit estimator accepts it at tol = 1e-5). Each estimator runs `--steps` jitted
training steps (`ep_jax.train_steps_jit`, one scan) after a compiling warm-up; the best
of `--repeats` is reported per step and relative to symmetric. Prints a table, writes
`benchmarks/results/estimator_cost_<platform>.json`.

What to expect (counted before measuring): symmetric relaxes 60 free steps on B rows and
12 nudged steps on 2B rows (84 row-steps of B); holomorphic N relaxes 12 steps on N·B
*complex* rows, and a complex state times a real matrix is two real products, so about
60 + 24·N real row-steps: N = 2 ≈ 1.3×, N = 4 ≈ 1.9×, N = 8 ≈ 3.0× symmetric (more where
complex arithmetic vectorises worse than real). Implicit: 60 free steps, then adjoint
iterations, each a VJP of one step (~2 row-steps), until λ changes by < 100 ulp — as
many iterations as the relaxation needs to converge to float resolution (~30 here).
Adaptive free phase (`free_tol=1e-6`, now `solver="adaptive:1e-6/scan"`, a `lax.while_loop` that stops once the residual is
below it): the free phase converges in ~25 of its 60 steps here, so expect about
(25 + 24) / 84 ≈ 0.6× symmetric, less the cost of a residual per step.

`--table2` times the same rows for the Table-2 MNIST network instead (hard sigmoid, dt = 1,
β = 0.1; the holomorphic rows left out, as the hard sigmoid is not holomorphic, and implicit).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import ep_jax

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

ESTIMATORS = {
    "symmetric": dict(kind="symmetric"),
    "one_sided": dict(kind="one_sided"),
    "holomorphic N=2": dict(kind="holomorphic", n_points=2),
    "holomorphic N=4": dict(kind="holomorphic", n_points=4),
    "holomorphic N=8": dict(kind="holomorphic", n_points=8),
    "implicit": dict(kind="implicit"),
    "bptt": dict(kind="bptt"),
    "symmetric, free_tol=1e-6": dict(
        kind="symmetric", solver=ep_jax.solvers.Adaptive(1e-6), nudge_solver=ep_jax.solvers.Scan()
    ),
}


def time_estimator(model, kw, x, y, rx, steps, repeats, batch):
    est = ep_jax.Estimator(t_free=60, t_nudge=12, **kw)
    opt = ep_jax.optim.sgd(model, lr=[0.1, 0.05], momentum=0.9)
    state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0))
    idx = jnp.arange(steps * batch).reshape(steps, batch) % x.shape[0]
    key = jax.random.PRNGKey(1)
    out, info = ep_jax.train_steps_jit(model, est, opt, key, state, x, y, idx, rx)  # compile
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out, info = ep_jax.train_steps_jit(model, est, opt, key, state, x, y, idx, rx)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t)
    return best / steps, bool(jnp.all(info.finite))


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.estimator_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--table2", action="store_true", help="the Table-2 MNIST network (hard sigmoid, dt 1)")
    p.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    a = p.parse_args(argv)
    act, dt, beta = ("hard_sigmoid", 1.0, 0.1) if a.table2 else ("sigmoid", 0.5, 0.5)
    model = ep_jax.EPModel(sizes=(784, 256, 10), activation=act)
    x = jax.random.uniform(jax.random.PRNGKey(2), (4 * a.batch, 784))
    y = jax.random.randint(jax.random.PRNGKey(3), (4 * a.batch,), 0, 10)
    rx = ep_jax.make_relaxation(model, beta=beta, dt=dt)
    rows = {}
    for name, kw in ESTIMATORS.items():
        if a.table2 and kw["kind"] in ("holomorphic", "implicit"):
            continue
        s, finite = time_estimator(model, kw, x, y, rx, a.steps, a.repeats, a.batch)
        rows[name] = {"step_ms": 1e3 * s, "finite": finite}
    params, buffers = model.init(jax.random.PRNGKey(0))
    eff = model.prepare(params, buffers)
    _, r, k = jax.jit(ep_jax.dynamics.free_phase_adaptive, static_argnums=(0, 4))(
        model, eff, model.input_drive(eff, x[: a.batch]), rx.dt, 60, 1e-6
    )
    rows["symmetric, free_tol=1e-6"]["free_steps_at_init"] = int(k)
    base = rows["symmetric"]["step_ms"]
    platform = jax.devices()[0].platform
    print(
        f"estimator cost per training step, 784-256-10 {act}, dt={dt:g}, T1=60, T2=12, batch {a.batch}, "
        f"{platform}; free_tol=1e-6 stops at step {int(k)} at initialisation"
    )
    print(f"{'estimator':18s} {'ms/step':>9s} {'× symmetric':>12s}  steps applied")
    for name, r in rows.items():
        r["vs_symmetric"] = r["step_ms"] / base
        print(f"{name:18s} {r['step_ms']:9.2f} {r['vs_symmetric']:12.2f}  {'yes' if r['finite'] else 'NO (refused)'}")
    if not a.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"estimator_cost{'_table2' if a.table2 else ''}_{platform}.json"
        path.write_text(
            json.dumps(
                {
                    "network": f"784-256-10 {act} dt={dt:g}",
                    "batch": a.batch,
                    "steps": a.steps,
                    "repeats": a.repeats,
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
