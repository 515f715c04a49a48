"""EP-vs-BPTT alignment measured during training (`align_every`), as a loop hook.

The reference is `align_reference`: BPTT truncated to T2 (default), BPTT through all T1
free steps, or the implicit equilibrium gradient (`ep_jax.alignment.measure`).

Every member is measured on one fixed probe batch (`align_batch` training examples, a
seeded choice shared by the members: `subset_seed`) at step 0 of a fresh run and then
whenever its step counter crosses a multiple of `align_every`. The records of an epoch
go into its metrics row (`alignment`: step, angle between the full gradients, and per
parameter cosine, relative RMSE and sign agreement; `align_time_s`: the seconds spent
measuring, which do not count as training time).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import ep_jax
from ep_jax import sweep as S
from ep_jax.experiments.loop import Hook


class AlignmentHook(Hook):
    """Alignment of every member against BPTT (module docstring)."""

    def __init__(self, g, x, y, state, runtime):
        cfg = g.cfg
        self.every = cfg.align_every
        self.runtime = runtime
        n = x.shape[0]
        probe = ep_jax.data.subset_indices(
            jax.random.fold_in(jax.random.PRNGKey(cfg.subset_seed), 2), n, min(cfg.align_batch, n)
        )
        xp, yp = x[jnp.asarray(probe)], y[jnp.asarray(probe)]
        self.names = ep_jax.alignment.leaf_names(S.take(state.train.params, 0))
        fn = lambda tr, r: ep_jax.alignment.measure(
            g.model, g.est, tr.params, tr.buffers, xp, yp, r, reference=cfg.align_reference
        )
        self.fn = jax.jit(jax.vmap(fn))
        self.pending = [[] for _ in range(g.M)]
        self.spent = 0.0
        self.epoch_spent = 0.0
        self.before = None

    def measure(self, state, rx, members) -> dict:
        """`{member: record}` of the members' alignment now."""
        a = jax.device_get(self.fn(*self.runtime.host((state.train, rx))))
        steps = np.asarray(state.train.step)
        out = {}
        for i in members:
            leaf = lambda f: {n: float(np.asarray(v)[i]) for n, v in zip(self.names, f)}
            out[i] = {
                "step": int(steps[i]),
                "angle": float(np.asarray(a.angle)[i]),
                "cosine": leaf(a.cosine),
                "rel_rmse": leaf(a.rel_rmse),
                "sign_agree": leaf(a.sign_agree),
            }
        return out

    def _record(self, state, rx, members):
        t = time.perf_counter()
        for i, rec in self.measure(state, rx, members).items():
            self.pending[i].append(rec)
        self.spent += time.perf_counter() - t

    def start(self, loop, state, rx):
        """Measure the fresh members at step 0."""
        steps0 = np.asarray(state.train.step)
        fresh = [i for i in range(loop.M) if steps0[i] == 0 and loop.status[i] == "running"]
        if fresh:
            self._record(state, rx, fresh)
        self.spent = 0.0  # before the first epoch: not part of any epoch's time
        self.before = np.asarray(state.train.step)

    def after_chunk(self, loop, state, rx, chunk):
        """Measure the members whose step counter crossed a multiple of `align_every`."""
        after = np.asarray(state.train.step)
        active = [loop.start[i] < chunk.epoch and loop.status[i] == "running" for i in range(loop.M)]
        due = [i for i in range(loop.M) if active[i] and after[i] // self.every > self.before[i] // self.every]
        if due:
            self._record(state, rx, due)
        self.before = after

    def excluded_time(self) -> float:
        """The measuring time of the epoch (kept for its rows' `align_time_s`)."""
        self.epoch_spent, self.spent = self.spent, 0.0
        return self.epoch_spent

    def columns(self, loop, i: int) -> dict:
        """`align_time_s` and the member's records of the epoch."""
        recs, self.pending[i] = self.pending[i], []
        return {"align_time_s": self.epoch_spent, "alignment": recs}
