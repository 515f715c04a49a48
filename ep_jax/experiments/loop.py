"""The training loop of a group: epochs of device-resident chunks, and hooks.

`Loop.run(state, rx)` trains a group's members (state in, state out) from the epoch after
each member's last finished one (`start`) to `epochs`. It knows nothing of files: after
every chunk and every epoch it calls its hooks (`Hook`), which log, measure, draw and
write. An epoch is every full batch in chunks of `cfg.chunk` steps (one `lax.scan` each,
the data resident on the device), then the partial last batch; then the test set is
evaluated. The loop does not wait for a chunk's results: the per-chunk counts are read
once, at the end of the epoch (a hook that shows a running accuracy reads them itself).

Per member the loop keeps `status` (running | diverged | interrupted | ok), `start` (the
last epoch whose record a hook made safe, see `EpochEnd.done`), `history` (those epochs'
rows), `message` and `diverged_step`. A member whose state, gradient or updated
parameters turn non-finite (or whose state exceeds `max_state`) is frozen at its last good
step by the compiled step itself; the loop marks it diverged, names the cause
(`divergence_cause`) and the others go on. A member already past an epoch (resumed from
a later checkpoint) sits that epoch out.

`Ticker` is the progress output of a wait in native code (XLA compiling the first chunk):
a line on stderr every few seconds saying what it waits for and for how long.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ep_jax.estimators import DEFAULT_TOL
from ep_jax.experiments.errors import Interrupted


def _epoch_mean(parts, M: int) -> np.ndarray:
    """Per member, the mean over the epoch's steps of a per-step metric `(steps, M)`,
    ignoring NaN (steps where it does not exist); NaN where it never does."""
    a = np.concatenate([np.asarray(p, np.float64).reshape(-1, M) for p in parts], axis=0)
    ok = np.isfinite(a)
    n = ok.sum(0)
    return np.where(n > 0, np.where(ok, a, 0).sum(0) / np.maximum(n, 1), np.nan)


def divergence_cause(cfg, infos, i: int) -> str:
    """Why member i's first refused step of the epoch was refused, from that step's
    `StepInfo` (`infos`: the epoch's chunks, fields `(steps, M)`): the first of a
    non-finite free state, a state above `max_state`, an implicit gradient whose free
    phase did not converge, a non-finite gradient, an update that overflowed."""
    first = None
    for info in infos:
        bad = np.flatnonzero(~np.asarray(info.finite)[:, i])
        if bad.size:
            first = jax.tree.map(lambda a: np.asarray(a)[bad[0], i], info)
            break
    if first is None:
        return "a refused step"
    if not np.isfinite(first.state_absmax) or not np.isfinite(first.loss):
        return "the free state or the loss is not finite"
    if first.state_absmax > cfg.max_state:
        return f"a free state of magnitude {float(first.state_absmax):.3g} above max_state={cfg.max_state:g}"
    if cfg.estimator == "implicit":
        tol = DEFAULT_TOL if cfg.implicit_tol is None else cfg.implicit_tol
        r = float(first.residual_free)
        if not r <= tol:
            return (
                f"the free phase did not converge for the implicit gradient: relative residual {r:.3g} > "
                f"implicit_tol={tol:g} after t_free={cfg.t_free} steps; raise t_free (or implicit_tol), or "
                f"lower dt"
            )
    if not np.isfinite(first.grad_norm):
        return "a non-finite gradient"
    return "the update made the parameters or the optimiser state non-finite: a learning rate too large?"


class Chunk(NamedTuple):
    """What a hook sees after one chunk: epoch, chunk number, steps in the chunk, batch
    size, and the chunk's per-step `info` (device arrays: `correct`, `loss` of shape
    `(steps, members)`)."""

    epoch: int
    index: int
    steps: int
    batch: int
    info: object


@dataclasses.dataclass
class EpochEnd:
    """What a hook sees after one epoch. Arrays have one entry per member; `rows[i]` is
    member i's metrics row (None if it sat the epoch out or diverged in it)."""

    epoch: int
    active: np.ndarray
    alive: np.ndarray
    rows: list
    test_acc: np.ndarray
    elapsed: float
    diverged: list


class Hook:
    """Something that happens around the loop: every method is optional."""

    def start(self, loop: Loop, state, rx):
        """Before the first epoch."""

    def after_chunk(self, loop: Loop, state, rx, chunk: Chunk):
        """After every chunk (the chunk's results may still be computing)."""

    def columns(self, loop: Loop, i: int) -> dict:
        """Extra columns of member i's row for the epoch that just ended."""
        return {}

    def excluded_time(self) -> float:
        """Seconds this hook spent during the epoch that do not count as training (reset)."""
        return 0.0

    def after_epoch(self, loop: Loop, state, rx, end: EpochEnd):
        """After every epoch, in the order of the hooks."""

    def stop(self, loop: Loop, reason: str):
        """When the loop ends: "ok", "interrupted" or "failed" (also when a hook failed)."""


class Loop:
    """One group's epochs (module docstring).

    runner: `.steps(state, x, y, idx, rx, max_state)` and `.evaluate(state, x, y, rx,
    batch)` (a runtime's runner); data: device arrays `(x_train, y_train, x_test, y_test)`;
    batches: `batches(member_index, epoch, n) -> (full (n // B, B), rest)` example indices;
    start: last finished epoch per member; histories: their rows; guard: a context
    manager around the hooks' `after_epoch` (the engine's: a signal does not cut an
    epoch's record in half)."""

    def __init__(
        self,
        group,
        runner,
        data,
        batches: Callable,
        start: Sequence[int],
        histories: list,
        hooks: Sequence[Hook] = (),
        deadline: float | None = None,
        guard: Callable | None = None,
    ):
        self.group = group
        self.cfg = group.cfg
        self.M = group.M
        self.runner = runner
        self.x, self.y, self.x_test, self.y_test = data
        self.batches = batches
        self.start = np.asarray(start, int).copy()
        self.history = [list(h) for h in histories]
        self.hooks = list(hooks)
        self.deadline = deadline
        self.guard = guard or contextlib.nullcontext
        self.status = ["running"] * self.M
        self.message = [""] * self.M
        self.diverged_step: list = [None] * self.M
        dtype = self.x.dtype
        self.max_state = jnp.asarray(self.cfg.max_state, dtype)

    @property
    def n(self) -> int:
        """Training examples."""
        return int(self.y.shape[0])

    def steps_per_epoch(self) -> int:
        """Full batches plus the partial last one."""
        B = self.cfg.batch_size
        return self.n // B + (self.n % B > 0)

    def first_epoch(self) -> int:
        """The first epoch some member still has to train."""
        return int(self.start.min()) + 1

    def run(self, state, rx):
        """Train every member to `cfg.epochs`; returns the final state."""
        reason = "failed"
        try:
            for h in self.hooks:
                h.start(self, state, rx)
            last_epoch_s = 0.0
            for epoch in range(self.first_epoch(), self.cfg.epochs + 1):
                if self.deadline is not None and time.time() + last_epoch_s > self.deadline:
                    raise Interrupted("time budget used up")
                t0 = time.perf_counter()
                state = self.epoch(state, rx, epoch)
                last_epoch_s = time.perf_counter() - t0
                if not any(s == "running" for s in self.status):
                    break
            reason = "ok"
        except (Interrupted, KeyboardInterrupt):
            reason = "interrupted"
            raise
        finally:
            for h in self.hooks:
                try:
                    h.stop(self, reason)
                except Exception:  # noqa: BLE001
                    if reason == "ok":
                        raise
                    # the error that stopped the loop is the one to report
        return state

    def epoch(self, state, rx, epoch: int):
        """One epoch of every active member, then the hooks."""
        M, cfg = self.M, self.cfg
        active = np.array([self.start[i] < epoch and self.status[i] == "running" for i in range(M)])
        if not active.any():
            return state
        alive_before = np.asarray(state.alive)
        state = state._replace(alive=jnp.asarray(alive_before & active))
        t0 = time.perf_counter()
        orders = [self.batches(i, epoch, self.n) for i in range(M)]
        full = np.stack([o[0] for o in orders], axis=1)  # (n_full, M, B)
        rest = np.stack([o[1] for o in orders], axis=0)  # (M, n % B)
        chunks = [full[c0 : c0 + cfg.chunk] for c0 in range(0, full.shape[0], cfg.chunk)]
        if rest.shape[1]:
            chunks.append(rest[None])
        infos = []
        for ci, idx in enumerate(chunks):
            # host indices: the steps check their range on the host (`check_indices`), with no
            # round trip of a device copy, and transfer them with the call
            state, info = self.runner.steps(state, self.x, self.y, idx, rx, self.max_state)
            infos.append((info, idx.shape[2]))
            for h in self.hooks:
                h.after_chunk(self, state, rx, Chunk(epoch, ci, idx.shape[0], idx.shape[2], info))
        # the epoch's counts, read once (the same float64 sums, in the same order, as chunk by chunk)
        correct, loss_sum, seen = np.zeros(M), np.zeros(M), 0
        for info, B in infos:
            c = np.asarray(info.correct)
            correct += c.sum(0)
            loss_sum += (np.asarray(info.loss) * B).sum(0)
            seen += c.shape[0] * B
        residuals = {
            k: _epoch_mean([getattr(info, k) for info, _ in infos], M) for k in ("residual_free", "residual_nudge")
        }
        alive_now = np.asarray(state.alive)
        jax.block_until_ready(state)
        elapsed = time.perf_counter() - t0 - sum(h.excluded_time() for h in self.hooks)
        test_acc, test_loss = self.runner.evaluate(state, self.x_test, self.y_test, rx, cfg.eval_batch)
        # restore the flags of members that sat this epoch out
        state = state._replace(alive=jnp.asarray(np.where(active, alive_now, alive_before)))
        dsteps = np.asarray(state.diverged_step)
        steps = np.asarray(state.train.step)
        rows, diverged = [None] * M, []
        for i in range(M):
            if not active[i]:
                continue
            if not alive_now[i]:
                self.status[i] = "diverged"
                self.diverged_step[i] = int(dsteps[i])
                self.message[i] = (
                    f"diverged at epoch {epoch}, step {int(dsteps[i]) + 1} "
                    f"({divergence_cause(cfg, [info for info, _ in infos], i)}); the checkpoint of "
                    f"epoch {self.start[i]} is kept"
                )
                diverged.append(i)
                continue
            row = {
                "epoch": epoch,
                "train_acc": 100.0 * correct[i] / seen,
                "loss": loss_sum[i] / seen,
                "test_acc": 100.0 * test_acc[i],
                "test_loss": float(test_loss[i]),
                "time_s": elapsed,
                "steps": int(steps[i]),
            }
            row.update({k: float(v[i]) for k, v in residuals.items() if np.isfinite(v[i])})
            for h in self.hooks:
                row.update(h.columns(self, i))
            rows[i] = row
        end = EpochEnd(epoch, active, alive_now, rows, test_acc, elapsed, diverged)
        with self.guard():
            for h in self.hooks:
                h.after_epoch(self, state, rx, end)
        return state

    def done(self, i: int, row: dict):
        """Member i's epoch `row["epoch"]` is recorded (called by the hook that saves it)."""
        self.history[i].append(row)
        self.start[i] = row["epoch"]


class Ticker:
    """While the main thread waits in native code (XLA compiling a program), a background
    thread prints `"<what>: <n> s so far..."` to stderr every `every` seconds (the first
    after `every` seconds: a short wait prints nothing). `stop()` ends it (idempotent, also
    when the wait ended with an error or an interrupt); a daemon thread, so it never holds
    the process."""

    def __init__(self, what: str, every: float = 15.0, stream=None):
        self.what, self.every, self.stream = what, float(every), stream
        self.t0 = time.perf_counter()
        self.lines = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ep_jax-ticker", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.wait(self.every):
            stream = self.stream or sys.stderr
            line = f"{self.what}: {time.perf_counter() - self.t0:.0f} s so far..."
            try:
                try:  # above a progress bar, if one is drawn
                    from tqdm import tqdm

                    tqdm.write(line, file=stream)
                    stream.flush()
                except ImportError:
                    print(line, file=stream, flush=True)
            except Exception:  # noqa: BLE001 — a closed stream: nothing more to say
                return
            self.lines += 1

    def stop(self):
        """End the lines; returns the seconds waited."""
        self._done.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        return time.perf_counter() - self.t0
