"""Training runs and sweeps over several devices and processes, on JAX's own runtime.

`python -m experiments.train ... --distributed` (or `EP_JAX_DISTRIBUTED=1`) runs the same
engine (`experiments.engine`) on every device of every process of a `jax.distributed`
job; docs/distributed.md shows how to launch one (one host, several hosts, SLURM).

- `setup(args)`, called by the commands before any other JAX use, starts
  `jax.distributed` (`ep_jax.parallel.initialize`, gloo collectives for CPU devices):
  coordinator address, process count and id from `--coordinator`/`--num-processes`/
  `--process-id`, else `JAX_COORDINATOR_ADDRESS`/`JAX_NUM_PROCESSES`/`JAX_PROCESS_ID`,
  else what JAX detects (SLURM, Open MPI). With one process nothing is started: the run
  just uses every local device.
- Every group of members trains on a `("members", "data")` mesh over all devices
  (`ep_jax.parallel.sharded_sweep_steps`): members split over "members" (they never
  communicate), each member's batch over "data" (gradients averaged). The number of
  member shards is the largest that fits, or `--member-shards`; the members must divide
  by it and every batch (`batch_size`, and the last partial batch of an epoch) by the data
  shards, else the command refuses before touching anything (`check_layout`).
- Every process holds the (small) dataset and computes the same data order (it derives
  from the seeds); the per-member batch indices are split like the batches, so each
  process's devices gather only their own rows of every global batch.
- Between chunks the state is replicated (the compiled chunk ends with an all-gather),
  which is what lets process 0 alone write metrics, run files, summaries and checkpoints
  (`is_main`); the other processes write nothing and print only errors.
- The run folders are checked by every process before any is changed (`together`: a
  refusal on one process stops all of them, each with one `error:` line). `--resume`
  reads the checkpoints on every process, so the output folder must be visible to all
  processes (a shared file system; on one host it always is).
- A process that dies makes the collectives of the others fail (gloo, NCCL) or, if it
  went silent, the coordination service notices after `--peer-timeout` seconds of
  missed heartbeats: the others then stop with an error line instead of hanging
  (`main_wrapper`), and every process restarted with `--resume` continues from the last
  finished epoch.
"""
from __future__ import annotations

import os
import re
import sys
import traceback
import weakref

import numpy as np

ENV_FLAG = "EP_JAX_DISTRIBUTED"
DEFAULT_PEER_TIMEOUT = 100   # JAX's heartbeat timeout
_STATE = {"on": False, "member_shards": None, "lost": False}


def add_flags(p):
    """The `--distributed` flags of the training commands."""
    g = p.add_argument_group("distributed (several devices, processes or hosts; docs/distributed.md)")
    g.add_argument("--distributed", action="store_true",
                   help=f"train on every device of every process of a jax.distributed job (or {ENV_FLAG}=1)")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0's coordinator (default: JAX_COORDINATOR_ADDRESS, or SLURM's)")
    g.add_argument("--num-processes", type=int, metavar="N",
                   help="number of processes (default: JAX_NUM_PROCESSES, or SLURM's; 1: this process's devices)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0..N-1 (default: "
                   "JAX_PROCESS_ID, or SLURM's)")
    g.add_argument("--member-shards", type=int, metavar="K",
                   help="split a sweep's members over K groups of devices (default: as many as fit)")
    g.add_argument("--peer-timeout", type=int, metavar="SECONDS",
                   help=f"a process silent this long counts as dead and the run stops (default "
                        f"{DEFAULT_PEER_TIMEOUT}; EP_JAX_PEER_TIMEOUT)")


def _env_int(name):
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        from ep_jax.experiments.config import ConfigError
        raise ConfigError(f"{name}={v!r} is not an integer") from None


def requested(a) -> bool:
    return bool(getattr(a, "distributed", False) or os.environ.get(ENV_FLAG, "").lower() in ("1", "true", "yes")
                or any(getattr(a, k, None) is not None for k in ("coordinator", "num_processes", "process_id",
                                                                  "member_shards")))


def setup(a) -> bool:
    """Start the distributed runtime if the flags or `EP_JAX_DISTRIBUTED` ask for it (call
    before any other JAX use); True when the run is distributed."""
    from ep_jax.experiments.config import ConfigError
    from ep_jax.experiments.engine import RunError
    if not requested(a):
        return False
    if _STATE["on"]:
        return True
    import jax
    from ep_jax import parallel
    num = a.num_processes if a.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = a.process_id if a.process_id is not None else _env_int("JAX_PROCESS_ID")
    coordinator = a.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    shards = a.member_shards if a.member_shards is not None else _env_int("EP_JAX_MEMBER_SHARDS")
    timeout = a.peer_timeout if a.peer_timeout is not None else _env_int("EP_JAX_PEER_TIMEOUT")
    timeout = DEFAULT_PEER_TIMEOUT if timeout is None else timeout
    if num is not None and num < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {num}")
    if pid is not None and (pid < 0 or (num is not None and pid >= num)):
        raise ConfigError(f"--process-id must be in 0..{(num or 1) - 1}, got {pid}")
    if shards is not None and shards < 1:
        raise ConfigError(f"--member-shards must be at least 1, got {shards}")
    if timeout < 1:
        raise ConfigError(f"--peer-timeout must be at least 1 second, got {timeout}")
    if coordinator is not None and not re.fullmatch(r"\S+:\d+", coordinator):
        raise ConfigError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if num != 1 or pid not in (None, 0):
        try:
            parallel.initialize(coordinator, num, pid, initialization_timeout=max(300, timeout),
                                heartbeat_timeout_seconds=timeout)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"--distributed: {_first_line(e).rstrip('.')}: give --coordinator HOST:PORT "
                              "--num-processes N --process-id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                              "JAX_PROCESS_ID), or run under SLURM") from None
        except Exception as e:  # connection refused, timed out, ...
            raise RunError(f"--distributed: could not join the other processes via {coordinator or 'the cluster'} "
                           f"({_first_line(e)})") from None
    _STATE.update(on=True, member_shards=shards)
    if jax.process_index() != 0:
        sys.stdout = open(os.devnull, "w")   # process 0 alone logs; errors still go to stderr
    return True


def _first_line(e) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def active() -> bool:
    """The run is distributed (`setup` started it)."""
    return _STATE["on"]


def multi() -> bool:
    """Several processes take part."""
    if not _STATE["on"]:
        return False
    import jax
    return jax.process_count() > 1


def is_main() -> bool:
    """This process writes the run's files and logs (process 0; always when not distributed)."""
    if not _STATE["on"]:
        return True
    import jax
    return jax.process_index() == 0


def together(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on every process, as one decision: if it raises on any
    process, it raises on all of them (the failing process its own error, the others a
    `RunError` naming that process and its message). Also a barrier."""
    if not multi():
        return fn(*args, **kwargs)
    from jax.experimental import multihost_utils
    from ep_jax.experiments.engine import RunError
    err, out = None, None
    try:
        out = fn(*args, **kwargs)
    except Exception as e:   # noqa: BLE001 — every error must reach the other processes
        err = e
    msg = np.zeros(400, np.uint8)
    if err is not None:
        text = (_first_line(err) or type(err).__name__).encode()[:399]
        msg[0] = 1
        msg[1:1 + len(text)] = np.frombuffer(text, np.uint8)
    allmsg = np.asarray(multihost_utils.process_allgather(msg))
    if err is not None:
        raise err
    failed = np.flatnonzero(allmsg[:, 0])
    if len(failed):
        k = int(failed[0])
        text = bytes(allmsg[k, 1:]).rstrip(b"\0").decode(errors="replace")
        raise RunError(f"process {k} refused: {text}")
    return out


# --- layout ---------------------------------------------------------------------------------

def layout(M: int, batch_size: int, n: int, where: str = "") -> tuple[int, int]:
    """`(member_shards, data_shards)` of a group of M members with this batch size on `n`
    training examples; ConfigError naming what does not divide."""
    import jax
    from ep_jax import parallel
    from ep_jax.experiments.config import ConfigError
    rest = n % batch_size
    try:
        return parallel.sweep_layout(jax.device_count(), M, [batch_size, rest], _STATE["member_shards"])
    except ValueError as e:
        detail = f"batch_size {batch_size}" + (f", last batch of each epoch {rest} ({n} examples)" if rest else "")
        raise ConfigError(f"--distributed{where}: {e} ({detail}; {jax.device_count()} devices in "
                          f"{jax.process_count()} process(es)); change batch_size/subset or --member-shards") from None


def check_layout(members):
    """Refuse (ConfigError) before anything is touched if a group does not divide."""
    if not active():
        return
    from ep_jax.experiments import engine
    groups = engine.group_members(members)
    for gi, g in enumerate(groups):
        where = f" (group {gi + 1}: {', '.join(m.name for m in g.members)})" if len(groups) > 1 or g.M > 1 else ""
        layout(g.M, g.cfg.batch_size, g.cfg.n_train(), where)


# --- the engine's compiled steps on a mesh ---------------------------------------------------

class GroupRunner:
    """`sweep_steps_jit` and the evaluation of one group on its `("members", "data")` mesh."""

    def __init__(self, g, n: int):
        from ep_jax import parallel
        self.m, self.d = layout(g.M, g.cfg.batch_size, n)
        self.mesh = parallel.sweep_mesh(self.m)
        self.steps = parallel.sharded_sweep_steps(g.model, g.est, g.opt, self.mesh)
        self.ev = parallel.sharded_sweep_evaluate(g.model, g.est, self.mesh)
        self._cache = {}

    def _resident(self, a, host=False):
        """The replicated global copy (or the host copy) of a dataset array, made once."""
        from ep_jax import parallel
        key = (id(a), host)
        if key not in self._cache or self._cache[key][0] is not a:
            self._cache[key] = (a, np.asarray(a) if host else parallel.put(a, self.mesh))
        return self._cache[key][1]

    def __call__(self, model, est, opt, state, x_all, y_all, idx, rx, max_state):
        """As `ep_jax.sweep.sweep_steps_jit` (idx `(T, M, B)`); state and info come back
        replicated on every device."""
        from ep_jax import parallel
        from jax.sharding import PartitionSpec as P
        mesh = self.mesh
        # state and rx replicated, as the steps return them (one compiled program per chunk
        # shape; the step takes each device's members itself)
        state, rx = parallel.put((state, rx), mesh)
        idx = parallel.put(np.asarray(idx), mesh, P(None, parallel.MEMBERS, parallel.DATA))
        return self.steps(state, self._resident(x_all), self._resident(y_all), idx, rx, parallel.put(max_state, mesh))

    def evaluate(self, state, x, y, rx, batch: int):
        """Per-member accuracy (fraction) and mean loss on `(x, y)`, batches split over "data"."""
        from ep_jax import parallel
        from jax.sharding import PartitionSpec as P
        mesh, d = self.mesh, self.d
        state, rx = parallel.put((state, rx), mesh)
        xh, yh = self._resident(x, host=True), self._resident(y, host=True)
        n = len(yh)
        correct, loss = 0.0, 0.0
        b = min(-(-batch // d) * d, -(-n // d) * d)
        for i in range(0, n, b):
            xb, yb = xh[i:i + b], yh[i:i + b]
            k = len(yb)
            pad = b - k   # the last batch padded to the others' shape: one compiled program
            mask = np.arange(k + pad) < k
            if pad:
                xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
                yb = np.concatenate([yb, np.zeros((pad,), yb.dtype)])
            xg, yg, mg = parallel.put((xb, yb, mask), mesh, P(parallel.DATA))
            c, l = self.ev(state, xg, yg, mg, rx)
            correct = correct + np.asarray(c, np.float64)
            loss = loss + np.asarray(l, np.float64)
        return correct / n, loss / n


_RUNNERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def steps_fn(g, n: int) -> GroupRunner:
    """The group's compiled steps on the mesh (ConfigError if it does not divide)."""
    r = _RUNNERS.get(g)
    if r is None:
        r = _RUNNERS[g] = GroupRunner(g, n)
    return r


def evaluate(g, state, x, y, rx, batch: int):
    return _RUNNERS[g].evaluate(state, x, y, rx, batch)


def host(tree):
    """Numpy copies of a (replicated) state, for host-side work on one process (saving,
    alignment probes); unchanged when not distributed."""
    if not active():
        return tree
    import jax
    return jax.tree.map(np.asarray, tree)


# --- the commands' exit ------------------------------------------------------------------

_LOST = re.compile(r"gloo|nccl|coordination service|heartbeat|connection reset|connection refused|"
                   r"broken pipe|socket closed|unavailable:|deadline_exceeded", re.I)


def lost_peer(e: BaseException) -> bool:
    """Does the error say that another process of the run is gone?"""
    return multi() and bool(_LOST.search(str(e)))


def main_wrapper(main, argv=None) -> int:
    """`cli.main_wrapper` for the training commands: a collective that fails because
    another process died becomes one clear `error:` line (exit 2), and this process then
    leaves at once rather than wait for the lost one at JAX's shutdown barrier."""
    from ep_jax.experiments import cli
    from ep_jax.experiments.engine import RunError

    def guarded(argv):
        try:
            return main(argv)
        except Exception as e:
            if lost_peer(e):
                _STATE["lost"] = True
                raise RunError(f"lost contact with another process of this distributed run ({_first_line(e)}); "
                               "every finished epoch is checkpointed: start all processes again with --resume") from e
            raise

    try:
        code = cli.main_wrapper(guarded, argv)
    except Exception:
        if not multi():
            raise
        # an unexpected error: show it, and leave at once (the others' collectives then
        # fail and they stop too, rather than all waiting at the shutdown barrier)
        traceback.print_exc()
        _STATE["lost"] = True
        code = 1
    return finish(code)


def finish(code: int) -> int:
    """Leave the distributed runtime: at JAX's shutdown barrier when every process is
    alive, at once (`os._exit`) when one was lost."""
    if not multi():
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    if _STATE["lost"]:
        os._exit(code)
    import jax
    try:
        jax.distributed.shutdown()
    except Exception as e:   # noqa: BLE001
        print(f"warning: jax.distributed.shutdown: {_first_line(e)}", file=sys.stderr)
    return code
