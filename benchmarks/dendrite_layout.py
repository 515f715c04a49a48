"""Dendrite layout: reference (branch (j, k) in column j·K + k) vs branch-major (k·n + j).

    python -m benchmarks.dendrite_layout [--presets mnist-dep,fmnist-dep] [--rounds 9] [--chunk 10]

For each preset (experiments/presets.py; MNIST DEP: 784-256-10, K_b = 8, K_a = 2,
sparsity 0.5, symmetric EP, T1 = 60, T2 = 12, batch 64, hard-sigmoid) the same
parameters are run in two layouts:

- ``reference``: the kernel, mask and bias in the reference layout and the soma average
  `relu(z).reshape(B, n, K).mean(-1)` (the code before the branch-major layout, kept
  here as a private copy);
- ``branch_major``: `ep_jax.dendrites` as it is (sum of K contiguous slices).

Timed: the free phase alone (T1 steps from the hoisted masked kernels and input drive)
and a full training step (`train_steps_jit` over a chunk of `--chunk` batches resident
in memory, per step). The machine is shared, so the two layouts are timed interleaved
(A, B, B, A, ...) in one process; the table gives the median and best of `--rounds`
rounds and their ratio. Also checks that both layouts give the same numbers (free state
and params after one step, converted to one layout). Writes
`benchmarks/results/dendrite_layout_<platform>.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ep_jax
from benchmarks.run import machine
from ep_jax import dendrites, dynamics
from ep_jax.experiments import engine
from ep_jax.experiments.presets import preset_config
from ep_jax.models.dendritic import DendriticModel

RESULTS = Path(__file__).resolve().parent / "results"


def _soma_reference(z, branches):
    """The soma average of the reference layout (before the branch-major layout)."""
    r = jax.nn.relu(z)
    return r.reshape(*r.shape[:-1], -1, branches).mean(axis=-1)


@dataclasses.dataclass(frozen=True)
class ReferenceLayoutDendritic(DendriticModel):
    """The dendritic model with kernels, masks and biases in the reference layout."""

    def _basal(self, eff, l, u):
        k, c = eff["basal"][l]
        return _soma_reference(dendrites.branch_input(k, c, u), self.basal_branches)

    def _apical(self, eff, l, u):
        return _soma_reference(dendrites.branch_input(eff["apical"][l], None, u), self.apical_branches)


def to_reference(model, tree):
    """Params or masks (`{"basal", "apical"}`) of `model` converted to the reference layout."""
    conv = lambda K, n: lambda a: dendrites.to_reference_layout(a, n, K)
    L = model.n_layers
    return {
        "basal": tuple(
            jax.tree.map(conv(model.basal_branches, model.sizes[l + 1]), tree["basal"][l]) for l in range(L)
        ),
        "apical": tuple(
            jax.tree.map(conv(model.apical_branches, model.sizes[l + 1]), tree["apical"][l]) for l in range(L - 1)
        ),
    }


def bench(preset: str, rounds: int, chunk: int, seed: int = 0) -> dict:
    cfg = preset_config(preset)
    model, est = engine.build_model(cfg), engine.build_estimator(cfg)
    opt = engine.build_optimizer(cfg, model)
    ref_model = ReferenceLayoutDendritic(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})
    hyper = engine.build_relaxation(cfg, model)
    B = cfg.batch_size
    key = jax.random.PRNGKey(seed)
    state = ep_jax.init_state(model, est, opt, key, alpha=cfg.alpha)
    ref_params = to_reference(model, state.params)
    ref_buffers = dict(state.buffers, masks=to_reference(model, state.buffers["masks"]))
    ref_state = state._replace(params=ref_params, buffers=ref_buffers, opt_state=opt.init(ref_params))
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.random((B * chunk, model.sizes[0]), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, model.n_classes, B * chunk).astype(np.int32))
    idx = jnp.arange(B * chunk).reshape(chunk, B)

    @functools.partial(jax.jit, static_argnums=0)
    def hoisted(m, params, buffers, x):  # masked kernels and input drive, once per batch
        eff = m.prepare(params, buffers)
        return eff, m.input_drive(eff, x)

    @functools.partial(jax.jit, static_argnums=0)
    def free(m, eff, ctx, hyper):
        return dynamics.free_phase(m, eff, ctx, hyper.dt, est.t_free)

    variants = {"reference": (ref_model, ref_state), "branch_major": (model, state)}
    fns = {}
    for name, (m, st) in variants.items():
        eff, ctx = hoisted(m, st.params, st.buffers, x[:B])
        fns[(name, "free")] = (lambda m=m, eff=eff, ctx=ctx: free(m, eff, ctx, hyper), 1, chunk)
        fns[(name, "step")] = (
            lambda m=m, st=st: ep_jax.train_steps_jit(m, est, opt, key, st, x, y, idx, hyper),
            chunk,
            1,
        )
    for f, _, _ in fns.values():  # compile, warm up
        jax.block_until_ready(f())
        jax.block_until_ready(f())
    times = {k: [] for k in fns}
    names = list(variants)
    for r in range(rounds):
        for part in ("free", "step"):
            for name in names if r % 2 == 0 else names[::-1]:  # interleaved, alternating order
                f, per, reps = fns[(name, part)]
                t0 = time.perf_counter()
                for _ in range(reps):
                    out = f()
                jax.block_until_ready(out)
                times[(name, part)].append(1e3 * (time.perf_counter() - t0) / (reps * per))

    # same numbers: the free state, and the params after one training step (converted)
    s_ref, s_new = (free(m, *hoisted(m, st.params, st.buffers, x[:B]), hyper) for m, st in variants.values())
    free_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(s_ref, s_new))
    one_ref, _ = ep_jax.train_steps_jit(ref_model, est, opt, key, ref_state, x, y, idx[:1], hyper)
    one_new, _ = ep_jax.train_steps_jit(model, est, opt, key, state, x, y, idx[:1], hyper)
    param_diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(one_ref.params), jax.tree.leaves(to_reference(model, one_new.params)))
    )

    row = {
        "preset": preset,
        "sizes": list(model.sizes),
        "basal_branches": model.basal_branches,
        "apical_branches": model.apical_branches,
        "t_free": est.t_free,
        "t_nudge": est.t_nudge,
        "batch": B,
        "rounds": rounds,
        "chunk": chunk,
        "free_state_max_abs_diff": free_diff,
        "params_after_one_step_max_abs_diff": param_diff,
    }
    for (name, part), ts in times.items():
        row[f"{name}_{part}_ms_median"], row[f"{name}_{part}_ms_best"] = float(np.median(ts)), float(np.min(ts))
        row[f"{name}_{part}_ms_all"] = ts
    for part in ("free", "step"):
        row[f"{part}_speedup_median"] = row[f"reference_{part}_ms_median"] / row[f"branch_major_{part}_ms_median"]
        row[f"{part}_speedup_best"] = row[f"reference_{part}_ms_best"] / row[f"branch_major_{part}_ms_best"]
    per_epoch = 60000 / B / 1e3
    for name in variants:
        row[f"{name}_epoch_s_median"] = row[f"{name}_step_ms_median"] * per_epoch
        row[f"{name}_epoch_s_best"] = row[f"{name}_step_ms_best"] * per_epoch
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="mnist-dep")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--chunk", type=int, default=10)
    a = p.parse_args(argv)
    info = machine()
    rows = [bench(pr, a.rounds, a.chunk) for pr in a.presets.split(",")]
    print(f"machine: {info}")
    print(
        f"{'preset':11s} {'part':5s} {'reference ms':>19s} {'branch-major ms':>19s} {'speed-up':>9s} "
        f"{'ref s/epoch':>11s} {'bm s/epoch':>11s}"
    )
    print(f"{'':11s} {'':5s} {'median / best':>19s} {'median / best':>19s}")
    for r in rows:
        for part in ("free", "step"):
            ep = (
                f"{r['reference_epoch_s_median']:11.1f} {r['branch_major_epoch_s_median']:11.1f}"
                if part == "step"
                else ""
            )
            print(
                f"{r['preset']:11s} {part:5s} "
                f"{r[f'reference_{part}_ms_median']:9.2f} / {r[f'reference_{part}_ms_best']:7.2f} "
                f"{r[f'branch_major_{part}_ms_median']:9.2f} / {r[f'branch_major_{part}_ms_best']:7.2f} "
                f"{r[f'{part}_speedup_median']:9.2f} {ep}"
            )
        print(
            f"{'':11s} same numbers: free state max |Δ| {r['free_state_max_abs_diff']:.1e}, "
            f"params after one step max |Δ| {r['params_after_one_step_max_abs_diff']:.1e}"
        )
    path = RESULTS / f"dendrite_layout_{info['platform']}.json"
    path.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
