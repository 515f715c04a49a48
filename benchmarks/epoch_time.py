"""Training-step time per preset: straightforward formulation vs the optimised path.

    python benchmarks/epoch_time.py [--steps 20] [--presets mnist-dep,mnist-ep,fmnist-dep,fmnist-ep]

- straightforward: `ep_jax.reference.Unhoisted` (masked kernels and input drive recomputed
  every relaxation step), the +β and −β phases as two scans, one jitted call per batch
  fed from host memory;
- optimised: loop invariants computed once per batch, ±β phases as one batched scan,
  the dataset resident on the device and `train_steps_jit` scanning over a chunk of
  batches (no return to Python between steps).
Prints a table (ms per step, seconds per 60 000-example epoch at batch 64) and writes
`benchmarks/results/epoch_time-<platform>.json` with the machine described.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np

import ep_jax
from ep_jax.reference import Unhoisted
from experiments import config as C
from experiments.presets import PRESETS


def machine():
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "n_devices": jax.device_count(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version(),
            "host": platform.machine()}


def bench(preset: str, steps: int, seed: int = 0):
    cfg = C.resolve(PRESETS[preset])
    model, est = C.build_model(cfg), C.build_estimator(cfg)
    hyper = C.build_hyper(cfg, model, jax.random.PRNGKey(seed))
    state = ep_jax.init_state(model, jax.random.PRNGKey(seed), hyper, est)
    B = cfg["batch_size"]
    rng = np.random.default_rng(seed)
    n = B * steps
    x = rng.random((n, model.sizes[0]), dtype=np.float32)
    y = rng.integers(0, model.n_classes, n).astype(np.int32)
    out = {}

    # straightforward
    ref, est_ref = Unhoisted(model), ep_jax.Estimator(est.kind, est.t_free, est.t_nudge, batched_nudge=False)
    st, _ = ep_jax.train_step_jit(ref, est_ref, state, x[:B], y[:B], hyper)  # compile
    jax.block_until_ready(st)
    t0 = time.perf_counter()
    st = state
    for i in range(steps):
        st, m = ep_jax.train_step_jit(ref, est_ref, st, x[i * B:(i + 1) * B], y[i * B:(i + 1) * B], hyper)
    jax.block_until_ready(st)
    out["straightforward_ms"] = 1e3 * (time.perf_counter() - t0) / steps

    # optimised
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    idx = jnp.arange(n).reshape(steps, B)
    st, _ = ep_jax.train_steps_jit(model, est, state, xd, yd, idx, hyper)  # compile
    jax.block_until_ready(st)
    t0 = time.perf_counter()
    st, _ = ep_jax.train_steps_jit(model, est, state, xd, yd, idx, hyper)
    jax.block_until_ready(st)
    out["optimised_ms"] = 1e3 * (time.perf_counter() - t0) / steps
    # same numbers: params after ONE step from the same state (over many steps float32
    # rounding differences of the two op orders grow, as in any chaotic training run)
    one_ref, _ = ep_jax.train_step_jit(ref, est_ref, state, x[:B], y[:B], hyper)
    one_opt, _ = ep_jax.train_steps_jit(model, est, state, xd, yd, idx[:1], hyper)
    out["max_param_diff"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                                zip(jax.tree.leaves(one_opt.params), jax.tree.leaves(one_ref.params)))
    per_epoch = 60000 / B
    out.update(preset=preset, sizes=cfg["sizes"], t_free=est.t_free, t_nudge=est.t_nudge, batch=B, steps=steps,
               straightforward_epoch_s=out["straightforward_ms"] * per_epoch / 1e3,
               optimised_epoch_s=out["optimised_ms"] * per_epoch / 1e3,
               speedup=out["straightforward_ms"] / out["optimised_ms"])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--presets", default="mnist-dep,mnist-ep,fmnist-dep,fmnist-ep")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    info = machine()
    rows = [bench(pr, a.steps) for pr in a.presets.split(",")]
    print(f"machine: {info}")
    print(f"{'preset':12s} {'sizes':18s} {'T1/T2':>7s} {'straight ms/step':>17s} {'opt ms/step':>12s} "
          f"{'straight s/epoch':>17s} {'opt s/epoch':>12s} {'speed-up':>9s} {'max |Δθ|':>9s}")
    for r in rows:
        print(f"{r['preset']:12s} {'-'.join(map(str, r['sizes'])):18s} {r['t_free']:>3d}/{r['t_nudge']:<3d} "
              f"{r['straightforward_ms']:17.2f} {r['optimised_ms']:12.2f} {r['straightforward_epoch_s']:17.1f} "
              f"{r['optimised_epoch_s']:12.1f} {r['speedup']:9.2f} {r['max_param_diff']:9.1e}")
    out = Path(a.out or Path(__file__).parent / "results" / f"epoch_time-{info['platform']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
