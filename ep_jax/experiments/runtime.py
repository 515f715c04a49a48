"""Where a run's computation happens and who writes its files: the engine's runtime.

A runtime answers, for the engine and its parts, the questions that differ between one
process and a `jax.distributed` job:

- `is_main`: does this process write the run's files and logs (process 0)?
- `together(fn)`: run a check on every process as one decision (a refusal anywhere stops
  all of them, each with one `error:` line; also a barrier);
- `check_layout(groups)`: refuse, before anything is touched, a group whose members or
  batches do not divide over the devices;
- `runner(group, n)`: the group's compiled chunk of steps and its evaluation;
- `host(tree)`: numpy copies of a (replicated) state, for host-side work (saving, probes).

`Local()` is one process on its default device (the vmapped `ep_jax.sweep` programs);
`Distributed(member_shards)` trains every group on a `("members", "data")` mesh over all
devices of all processes (`ep_jax.parallel.sharded_sweep_steps`): members split over
"members" (they never communicate), each member's batch over "data" (gradients
averaged); between chunks the state is replicated, so process 0 alone can write.

The engine is handed a runtime (`engine.run(..., runtime=...)`); left out, it takes
`current()`: the `Distributed` runtime once the commands' `--distributed` set-up
(`experiments.distributed.setup`) started one, else `Local()`.
"""

from __future__ import annotations

import weakref

import numpy as np

from ep_jax.experiments.errors import RunError

# what the commands' set-up started (experiments.distributed.setup); read only by current()
_STATE = {"on": False, "member_shards": None, "lost": False}


def first_line(e) -> str:
    """The first line of an exception's message (or its type's name)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class Local:
    """One process: the group's vmapped programs on the default device."""

    active = False
    multi = False
    is_main = True

    def __bool__(self):  # `if distributed.setup(args):` reads "if the run is distributed"
        return False

    def together(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`: one process decides alone."""
        return fn(*args, **kwargs)

    def agree(self, value: str, what: str):
        """One process always agrees with itself."""

    def check_layout(self, groups):
        """Nothing to divide on one device."""

    def runner(self, group, n: int):
        """`_LocalRunner`: `ep_jax.sweep`'s compiled chunk and evaluation."""
        return _LocalRunner(group)

    def host(self, tree):
        """The state itself (already on this process)."""
        return tree


class _LocalRunner:
    def __init__(self, g):
        self.g = g

    def steps(self, state, x_all, y_all, idx, rx, max_state):
        from ep_jax import sweep as S

        g = self.g
        # looked up per call: tests replace it to simulate a failing device
        if getattr(g, "augment", None) is not None:
            return S.sweep_steps_jit(
                g.model, g.est, g.opt, state, x_all, y_all, idx, rx, max_state, augment=g.augment, aug_keys=g.aug_keys
            )
        return S.sweep_steps_jit(g.model, g.est, g.opt, state, x_all, y_all, idx, rx, max_state)

    def evaluate(self, state, x, y, rx, batch: int):
        from ep_jax import sweep as S

        g = self.g
        correct = np.zeros(g.M)
        loss = np.zeros(g.M)
        n = x.shape[0]
        for i in range(0, n, batch):
            ev = S.sweep_evaluate(g.model, g.est, state, x[i : i + batch], y[i : i + batch], rx)
            correct += np.asarray(ev.correct)
            loss += np.asarray(ev.loss) * min(batch, n - i)
        return correct / n, loss / n


class Distributed:
    """Every device of every process of a `jax.distributed` job (module docstring)."""

    active = True

    def __bool__(self):
        return True

    def __init__(self, member_shards: int | None = None):
        self.member_shards = member_shards
        self._runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def multi(self) -> bool:
        """Several processes take part."""
        import jax

        return jax.process_count() > 1

    @property
    def is_main(self) -> bool:
        """Process 0 writes the run's files and logs."""
        import jax

        return jax.process_index() == 0

    def together(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` on every process, as one decision: if it raises on any
        process, it raises on all of them (the failing process its own error, the others a
        `RunError` naming that process and its message). Also a barrier."""
        if not self.multi:
            return fn(*args, **kwargs)
        from jax.experimental import multihost_utils

        err, out = None, None
        try:
            out = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 — every error must reach the other processes
            err = e
        msg = np.zeros(400, np.uint8)
        if err is not None:
            text = first_line(err).encode()[:399]
            msg[0] = 1
            msg[1 : 1 + len(text)] = np.frombuffer(text, np.uint8)
        allmsg = np.asarray(multihost_utils.process_allgather(msg))
        if err is not None:
            raise err
        failed = np.flatnonzero(allmsg[:, 0])
        if len(failed):
            k = int(failed[0])
            text = bytes(allmsg[k, 1:]).rstrip(b"\0").decode(errors="replace")
            raise RunError(f"process {k} refused: {text}")
        return out

    def agree(self, value: str, what: str):
        """Refuse (RunError, on every process) unless every process passes the same `value`
        (a digest of its config, its process count, ...): processes started with other
        settings would train silently to a worse result or wait forever at the end."""
        if not self.multi:
            return
        import hashlib

        from jax.experimental import multihost_utils

        h = np.frombuffer(hashlib.sha256(value.encode()).digest(), np.uint8)
        allh = np.asarray(multihost_utils.process_allgather(h))
        other = [k for k in range(len(allh)) if not np.array_equal(allh[k], allh[0])]
        if other:
            raise RunError(
                f"process {other[0]} was started with another {what} than process 0: start every "
                "process with the same command"
            )

    def layout(self, M: int, batch_size: int, n: int, where: str = "") -> tuple[int, int]:
        """`(member_shards, data_shards)` of a group of M members with this batch size on `n`
        training examples; ConfigError naming what does not divide."""
        import jax

        from ep_jax import parallel
        from ep_jax.experiments.config import ConfigError

        rest = n % batch_size
        try:
            return parallel.sweep_layout(jax.device_count(), M, [batch_size, rest], self.member_shards)
        except ValueError as e:
            detail = f"batch_size {batch_size}" + (f", last batch of each epoch {rest} ({n} examples)" if rest else "")
            raise ConfigError(
                f"--distributed{where}: {e} ({detail}; {jax.device_count()} devices in "
                f"{jax.process_count()} process(es)); change batch_size/subset or --member-shards"
            ) from None

    def check_layout(self, groups):
        """Refuse (ConfigError) before anything is touched if a group does not divide."""
        for gi, g in enumerate(groups):
            where = f" (group {gi + 1}: {', '.join(m.name for m in g.members)})" if len(groups) > 1 or g.M > 1 else ""
            self.layout(g.M, g.cfg.batch_size, g.cfg.n_train(), where)

    def runner(self, group, n: int):
        """The group's compiled steps on its mesh (made once per group)."""
        r = self._runners.get(group)
        if r is None:
            r = self._runners[group] = _MeshRunner(self, group, n)
        return r

    def host(self, tree):
        """Numpy copies of a replicated state."""
        import jax

        return jax.tree.map(np.asarray, tree)


class _MeshRunner:
    """`sweep_steps_jit` and the evaluation of one group on its `("members", "data")` mesh."""

    def __init__(self, rt: Distributed, g, n: int):
        from ep_jax import parallel

        self.m, self.d = rt.layout(g.M, g.cfg.batch_size, n)
        self.mesh = parallel.sweep_mesh(self.m)
        self.augment = getattr(g, "augment", None)
        self.aug_keys = getattr(g, "aug_keys", None)
        self.steps_fn = parallel.sharded_sweep_steps(g.model, g.est, g.opt, self.mesh, augment=self.augment)
        self.ev = parallel.sharded_sweep_evaluate(g.model, g.est, self.mesh)
        self._cache = {}

    def _resident(self, a, host=False):
        """The replicated global copy (or the host copy) of a dataset array, made once."""
        from ep_jax import parallel

        key = (id(a), host)
        if key not in self._cache or self._cache[key][0] is not a:
            self._cache[key] = (a, np.asarray(a) if host else parallel.put(a, self.mesh))
        return self._cache[key][1]

    def steps(self, state, x_all, y_all, idx, rx, max_state):
        """As `ep_jax.sweep.sweep_steps_jit` (idx `(T, M, B)`); state and info come back
        replicated on every device."""
        from jax.sharding import PartitionSpec as P

        from ep_jax import parallel

        mesh = self.mesh
        # state and rx replicated, as the steps return them (one compiled program per chunk
        # shape; the step takes each device's members itself)
        state, rx = parallel.put((state, rx), mesh)
        idx = parallel.put(np.asarray(idx), mesh, P(None, parallel.MEMBERS, parallel.DATA))
        extra = (parallel.put(self.aug_keys, mesh),) if self.augment is not None else ()
        return self.steps_fn(
            state, self._resident(x_all), self._resident(y_all), idx, rx, parallel.put(max_state, mesh), *extra
        )

    def evaluate(self, state, x, y, rx, batch: int):
        """Per-member accuracy (fraction) and mean loss on `(x, y)`, batches split over "data"."""
        from jax.sharding import PartitionSpec as P

        from ep_jax import parallel

        mesh, d = self.mesh, self.d
        state, rx = parallel.put((state, rx), mesh)
        xh, yh = self._resident(x, host=True), self._resident(y, host=True)
        n = len(yh)
        correct, loss = 0.0, 0.0
        b = min(-(-batch // d) * d, -(-n // d) * d)
        for i in range(0, n, b):
            xb, yb = xh[i : i + b], yh[i : i + b]
            k = len(yb)
            pad = b - k  # the last batch padded to the others' shape: one compiled program
            mask = np.arange(k + pad) < k
            if pad:
                xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
                yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
            xg, yg, mg = parallel.put((xb, yb, mask), mesh, P(parallel.DATA))
            c, l = self.ev(state, xg, yg, mg, rx)
            correct = correct + np.asarray(c, np.float64)
            loss = loss + np.asarray(l, np.float64)
        return correct / n, loss / n


LOCAL = Local()
_DISTRIBUTED: dict = {}


def current():
    """The runtime the commands' set-up started (`Distributed`), else `Local()`."""
    if not _STATE["on"]:
        return LOCAL
    shards = _STATE["member_shards"]
    if shards not in _DISTRIBUTED:
        _DISTRIBUTED[shards] = Distributed(shards)
    return _DISTRIBUTED[shards]
