"""The experiment engine: every run is a sweep, a single run is a sweep of one.

`run(members, mode)` trains a list of `Member`s (a validated `RunConfig`, a name, a run
folder). Members that agree on every static field form a group; a group is ONE compiled
program, vmapped over its members, with the dataset resident on the device and the
epoch's steps run as `lax.scan`s over chunks of `cfg.chunk` steps.

The engine is a composition of parts, each in its own file:

- `build`      keys, model, estimator, optimiser, time steps, data and example order
               from a config (how every random choice derives from the seed);
- `runfolder`  the run folder's files, its lock (one process at a time) and what
               `--overwrite` may remove;
- `loop`       the epochs and chunks of a group, with hooks; it knows nothing of files;
- `loggers`    metrics.jsonl, the console, the progress bar, TensorBoard, W&B;
- `alignment_hook`  EP-vs-BPTT alignment during training (`align_every`);
- `runtime`    one process or a `jax.distributed` job: who writes, how results reach
               the host, the compiled steps on a mesh;
- `checkpoint` the state files (msgpack, no pickle), `figures` the PNGs.

Modes: "new" refuses an existing, non-empty folder; "overwrite" replaces a run folder
(only after the config, the data and the checkpoints were read without error, only a
folder that ep_jax made as a run folder, and in it only what its manifest names:
`runfolder`); "resume" needs a checkpoint of the same run —
the same config except `epochs` (which may grow) and `data_dir` (where the data lives is
not part of a run's identity) — and continues bit for bit. A diverging member (non-finite
state or gradient, or a state above `max_state`) is frozen at its last good step; its
last checkpoint (previous epoch) is kept; the others go on. Ctrl-C, SIGTERM and the time
budget stop at a safe point (a signal while an epoch is being recorded waits for the
record to be complete); a process busy in native code (XLA compiling) is stopped by a
watcher thread about a second after the signal (`_Signals`). Before a long compile the
run says what it compiles and how long that should take (`_CompileNotice`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ep_jax
from ep_jax import sweep as S
from ep_jax.experiments import checkpoint as ckpt
from ep_jax.experiments import config as configs
from ep_jax.experiments import figures, files
from ep_jax.experiments import runtime as runtimes
from ep_jax.experiments.alignment_hook import AlignmentHook
from ep_jax.experiments.build import (  # noqa: F401
    augment_key,
    build_augment,
    build_estimator,
    build_model,
    build_optimizer,
    build_relaxation,
    epoch_batches,
    epoch_order,
    group_optimizer,
    keys,
    load_data,
    model_settings,
    opt_hyperparams,
)
from ep_jax.experiments.config import RunConfig, warnings_for
from ep_jax.experiments.errors import Interrupted, RunError
from ep_jax.experiments.loggers import ConsoleLogger, JsonlLogger, ProgressBar, check_loggers, optional_loggers, plural
from ep_jax.experiments.loop import Hook, Loop, Ticker
from ep_jax.experiments.runfolder import CHECKPOINT, CONFIG, METRICS, SUMMARY, RunFolder

STATUSES = files.STATUSES
#: fields that are not part of a run's identity (a resume may change them)
NOT_IDENTITY = files.NOT_IDENTITY


@dataclasses.dataclass(frozen=True)
class Member:
    """One run: its config, its name (in a sweep) and its folder."""

    cfg: RunConfig
    name: str
    dir: Path


same_run = files.same_run


# --- groups -----------------------------------------------------------------------------


class Group:
    """Members sharing the static structure: one compiled, vmapped program."""

    def __init__(self, members: Sequence[Member]):
        self.members = list(members)
        first = self.members[0].cfg
        self.cfg = first
        self.model = build_model(first)
        self.est = build_estimator(first)
        with _x64(first):  # the rates are arrays of the run's precision
            self.opt = group_optimizer(first, self.model)
        self.M = len(self.members)
        # training augmentation (static) and each member's key for it (from its data key)
        self.augment = build_augment(first)
        self.aug_keys = jnp.stack([augment_key(m.cfg) for m in self.members]) if self.augment is not None else None

    def initial(self):
        """`(SweepState, stacked Relaxation)` from the members' configs and seeds."""
        cfgs = [m.cfg for m in self.members]
        ks = [keys(c) for c in cfgs]
        settings = {k: jnp.asarray([model_settings(c)[k] for c in cfgs]) for k in model_settings(self.cfg)}
        hps = [opt_hyperparams(c, self.model) for c in cfgs]
        hps = {k: jnp.stack([h[k] for h in hps]) for k in hps[0]}
        state = S.init_sweep(
            self.model,
            self.est,
            self.opt,
            [k["init"] for k in ks],
            [k["step"] for k in ks],
            settings=settings,
            opt_hyperparams=hps,
        )
        rx = S.stack_relaxations(self.model, [build_relaxation(c, self.model) for c in cfgs])
        return state, rx


def group_members(members: Sequence[Member]) -> list[Group]:
    """Groups in order of first appearance."""
    buckets: dict = {}
    for m in members:
        buckets.setdefault(m.cfg.static_key(), []).append(m)
    return [Group(ms) for ms in buckets.values()]


def _member_tree(state: S.SweepState, rx, i: int):
    return {"sweep": S.take(state, i), "relaxation": S.take(rx, i)}


# --- files ------------------------------------------------------------------------------


def read_json(path: Path):
    """A JSON file's value, None if it does not exist; RunError naming it if it cannot be
    read (`files.read_json`)."""
    return files.read_json(path, "any")


def read_metrics(path: Path) -> list[dict]:
    """The checked rows of a `metrics.jsonl` ([] if it does not exist; `files.read_metrics`)."""
    path = Path(path)
    return files.read_metrics(path.parent) if path.name == METRICS else files.read_metrics(path)


def summarize(history: list[dict], status: str, message: str = "", diverged_step=None) -> dict:
    """`summary.json` of a run from its history."""
    best = max(history, key=lambda h: h["test_acc"]) if history else None
    return {
        "status": status,
        "message": message,
        "epochs_done": len(history),
        "final_test_acc": history[-1]["test_acc"] if history else None,
        "best_test_acc": best["test_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "final_train_acc": history[-1]["train_acc"] if history else None,
        "train_time_s": float(sum(h["time_s"] for h in history)),
        "diverged_step": diverged_step,
    }


def _title(m: Member) -> str:
    c = m.cfg
    return f"{m.name}: {c.dataset} {c.model}/{c.estimator} seed {c.seed}"


# --- checks (read-only, before anything changes) ------------------------------------------


def check_members(members: Sequence[Member]):
    """Unique names and folders (RunError), in one pass."""
    seen, dup = set(), set()
    for m in members:
        (dup if m.name in seen else seen).add(m.name)
    if dup:
        raise RunError(f"member names must be unique, repeated: {sorted(dup)}")
    dirs = {m.dir.resolve() for m in members}
    if len(dirs) != len(members):
        raise RunError("two members share a run folder")


def check_folders(members: Sequence[Member], mode: str) -> dict:
    """Read-only checks of every member folder for `mode`; returns `{name: checkpoint meta}`
    of the checkpoints a resume will load. Raises RunError before anything is changed."""
    if mode not in ("new", "resume", "overwrite"):
        raise ValueError(f"mode must be new, resume or overwrite, got {mode!r}")
    check_members(members)
    metas = {}
    for m in members:
        f = RunFolder(m.dir)
        d = m.dir
        if d.exists() and not d.is_dir():
            raise RunError(f"{d} exists and is not a folder")
        if mode == "new":
            f.check_new()
        if mode == "overwrite":
            f.check_replaceable()
        f.check_manifest()  # a damaged manifest is refused here, before anything changes
        if mode != "resume":
            continue
        path = d / CHECKPOINT
        if not path.exists():
            if len(members) == 1:
                raise RunError(f"{d}: no checkpoint to resume from ({CHECKPOINT} is missing)")
            if (d / METRICS).exists() and read_metrics(d / METRICS):
                raise RunError(f"{d}: has metrics but no checkpoint; cannot resume it safely")
            continue  # a sweep member that never finished an epoch starts afresh
        meta = ckpt.read_meta(path)
        saved = read_json(d / CONFIG)
        if not same_run(meta, m.cfg, saved):
            detail = ""
            if isinstance(saved, dict):
                diff = sorted(k for k, v in m.cfg.to_json().items() if k not in NOT_IDENTITY and saved.get(k) != v)
                detail = f" (differs in {diff})" if diff else ""
            if detail:
                raise RunError(
                    f"{d}: the checkpoint belongs to another config{detail}; only epochs (and data_dir) "
                    "may change on --resume"
                )
            why = (
                "only epochs may change on --resume, and where the data lives (--data-dir)"
                if isinstance(meta.get("run_digest"), str)
                else "a checkpoint this old cannot tell which field, and counts data_dir too: restore config.json "
                "and give --data-dir (or EP_JAX_DATA_DIR) for data that moved"
            )
            raise RunError(
                f"{d}: the checkpoint belongs to another config than config.json's (another run's "
                f"checkpoint, or config.json edited after the run); {why}"
            )
        if meta["epoch"] > m.cfg.epochs:
            raise RunError(f"{d}: already trained {meta['epoch']} epochs, more than epochs={m.cfg.epochs}")
        metas[m.name] = meta
    return metas


# --- signals ------------------------------------------------------------------------------


class _Signals:
    """SIGINT and SIGTERM stop the training at a safe point: the handler only records the
    signal, and the engine stops (KeyboardInterrupt in the main thread) after a chunk was
    dispatched, after an epoch was recorded, or between groups. A KeyboardInterrupt
    raised by the handler itself could land anywhere — inside JAX's gc callback, where
    Python swallows it (the run went on to the end, exit 0), or inside JAX's Python code
    between two native calls. Inside `recording()` (an epoch's checkpoint and metrics
    line) the stop waits for the record to be complete; after the first stop
    (`stopping()`) further signals are ignored so that the summaries are written whole.

    A process stuck in native code (XLA compiling a program, or running the first chunk)
    runs no Python handler until that returns, possibly minutes later. Run from the
    command line (`interrupts.STATE`, `python -m ...`), a watcher thread woken by the
    signal (`signal.set_wakeup_fd`) then stops the run itself if the main thread reached
    no safe point within `GRACE` seconds: it waits for any record in progress, runs
    `on_abort` (the engine writes the `interrupted` summaries; the last finished epoch's
    checkpoint is kept) and ends the process with the line `interrupted` and exit status
    130 (`interrupts.hard_exit`)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    GRACE = 1.0

    def __init__(self, watch: bool | None = None):
        self.watch = watch

    def __enter__(self):
        from ep_jax.experiments import interrupts

        self.old, self.depth, self.pending, self.stopped = {}, 0, bool(interrupts.STATE["signal"]), False
        self.lock = threading.RLock()
        self.on_abort: list[Callable] = []
        self._pipe, self._thread, self._closing, self._old_fd = None, None, False, None
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.old[s] = signal.signal(s, self._handle)
            if self.watch if self.watch is not None else interrupts.STATE["command_line"]:
                self._start_watcher()
        return self

    def _handle(self, signum, frame):
        if not self.stopped:
            self.pending = True

    def check(self):
        """A safe point: stop here (KeyboardInterrupt) if a signal arrived."""
        if self.pending and not self.stopped and not self.depth:
            with self.lock:  # the watcher may be stopping the run: then wait for its exit
                if self.stopped:
                    return
                self.stopped = True
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def recording(self):
        """A section that a signal does not cut (class docstring)."""
        with self.lock:
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
        self.check()

    def stopping(self):
        """From now on signals are ignored (the stop is under way)."""
        self.stopped = True

    def _start_watcher(self):
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            os.close(r)
            os.close(w)
            return
        self._pipe = (r, w)
        self._thread = threading.Thread(target=self._watch, name="ep_jax-signals", daemon=True)
        self._thread.start()

    def _watch(self):
        import time

        r = self._pipe[0]
        while True:
            try:
                got = os.read(r, 64)
            except OSError:
                return
            if self._closing or not got:
                return
            if self.stopped or not any(b in (int(s) for s in self.SIGNALS) for b in got):
                continue
            self.pending = True
            until = time.monotonic() + self.GRACE
            while time.monotonic() < until and not (self.stopped or self._closing):
                time.sleep(0.02)
            if self.stopped or self._closing:
                continue
            with self.lock:  # a record in progress is finished first
                if self.stopped or self._closing:
                    continue
                self.stopped = True
                for fn in self.on_abort:
                    try:
                        fn()
                    except Exception:  # noqa: BLE001 — the checkpoint of the last epoch is what counts
                        pass
                from ep_jax.experiments import interrupts

                interrupts.hard_exit(interrupts.INTERRUPTED, "interrupted")

    def __exit__(self, *exc):
        if self._pipe is not None:
            self._closing = True
            try:
                signal.set_wakeup_fd(self._old_fd if self._old_fd is not None else -1)
                os.write(self._pipe[1], b"\0")
            except (OSError, ValueError):
                pass
            self._thread.join(timeout=5)
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
        for s, h in self.old.items():
            signal.signal(s, h)
        # a signal that came after the last safe point: the command stops now
        if exc[0] is None and self.pending and not self.stopped:
            raise KeyboardInterrupt


class _StopAtChunks(Hook):
    """The loop's safe points: after each chunk was dispatched (and at its start)."""

    def __init__(self, sig: _Signals):
        self.sig = sig

    def start(self, loop, state, rx):
        """Before the first epoch."""
        self.sig.check()

    def after_chunk(self, loop, state, rx, chunk):
        """A chunk was handed to the device."""
        self.sig.check()


# --- the run --------------------------------------------------------------------------------


@dataclasses.dataclass
class _Context:
    mode: str
    metas: dict
    folders: dict
    runtime: object
    signals: _Signals
    progress: bool
    print_fn: Callable
    deadline: float | None
    data: tuple | None
    loggers: tuple
    live: dict = dataclasses.field(default_factory=dict)
    reported: set = dataclasses.field(default_factory=set)
    said_stopped: bool = False


def run(
    members: Sequence[Member],
    mode: str = "new",
    *,
    progress: bool = True,
    print_fn: Callable = print,
    deadline: float | None = None,
    data=None,
    runtime=None,
    loggers: Sequence[str] = (),
) -> list[dict]:
    """Train `members` (see the module docstring); returns one summary per member.

    deadline: a `time.time()` by which training stops cleanly at an epoch boundary (an
    epoch starts only if the last one's duration still fits; status interrupted,
    resumable). data: `(x_train, y_train, x_test, y_test)` to use instead of loading the
    configs' dataset (tests). runtime: where to train and who writes (`runtime.Local()`,
    `runtime.Distributed(...)`; default `runtime.current()`). loggers: optional writers
    ("tensorboard", "wandb")."""
    rt = runtime if runtime is not None else runtimes.current()
    check_loggers(loggers)  # an optional writer missing: refused before any folder
    members = list(members)
    if mode not in ("new", "resume", "overwrite"):
        raise ValueError(f"mode must be new, resume or overwrite, got {mode!r}")
    check_members(members)
    groups = group_members(members)
    rt.check_layout(groups)  # distributed: refuse what does not divide
    for g in groups:  # refuse what cannot fit before allocating
        configs.check_memory(g.cfg, available=_device_memory(), members=g.M)
    # distributed: every process must train the same members with the same configs
    rt.agree(
        json.dumps(
            [[m.name, {k: v for k, v in m.cfg.to_json().items() if k != "data_dir"}] for m in members], sort_keys=True
        ),
        "config (or members)",
    )
    folders = {m.name: RunFolder(m.dir) for m in members}
    summaries: dict[str, dict] = {}
    started: set[str] = set()
    with _Signals() as sig, contextlib.ExitStack() as held:

        def take_and_check():
            if rt.is_main:  # one process writes, so one holds the folders
                for m in members:
                    lock = folders[m.name].lock
                    held.callback(lock.undo_created)  # after release: the folders a refusal left empty
                    held.callback(lock.release)
                    lock.acquire()
            return check_folders(members, mode)

        metas = rt.together(take_and_check)  # distributed: every process checks, one decision
        for m in members:
            for w in warnings_for(m.cfg):
                print_fn(f"warning ({m.name}): {w}")
        ctx = _Context(mode, metas, folders, rt, sig, progress and rt.is_main, print_fn, deadline, data, tuple(loggers))
        live: dict = {}  # the loop of the group in flight, for a stop from the signal watcher
        ctx.live = live

        def stopped_summaries():
            """The `interrupted` summaries that the group in flight did not write itself
            (a stop before its loop ran, or from the signal watcher), and those of the
            groups that never started."""
            for m in members:
                if m.name in summaries or m.name in ctx.reported or not (m.dir / CONFIG).is_file():
                    continue
                loop, i = live.get(m.name, (None, None))
                if loop is not None:
                    status = "interrupted" if loop.status[i] == "running" else loop.status[i]
                    message = (
                        f"interrupted; checkpoint of epoch {loop.start[i]} kept, continue with --resume"
                        if status == "interrupted"
                        else loop.message[i]
                    )
                    summaries[m.name] = _write_summary(
                        m, loop.history[i], status, message, loop.diverged_step[i], rt.is_main
                    )
                else:
                    summaries[m.name] = _write_summary(
                        m,
                        read_metrics(m.dir / METRICS),
                        "interrupted",
                        "stopped before this member's group finished; continue with --resume",
                        is_main=rt.is_main,
                    )
            if not ctx.said_stopped:
                ctx.said_stopped = True
                print_fn("stopped (interrupted); continue with --resume")

        def abort():
            """The signal watcher stops the process while the main thread is in native code."""
            for loop, _ in {id(v[0]): v for v in live.values()}.values():
                for h in loop.hooks:  # the progress bar leaves its line, so `interrupted` has its own
                    if isinstance(h, ProgressBar):
                        h.stop(loop, "interrupted")
            stopped_summaries()
            if rt.is_main:
                for f in folders.values():
                    f.lock.release()
                    f.lock.undo_created()

        sig.on_abort.append(abort)
        try:
            for gi, g in enumerate(groups):
                sig.check()
                started.update(m.name for m in g.members)
                label = f"group {gi + 1}/{len(groups)}" if len(groups) > 1 else ""
                with _x64(g.cfg):
                    summaries.update(_train_group(g, ctx, label))
        except (Interrupted, KeyboardInterrupt):
            sig.stopping()
            # the group in flight wrote its own summaries if its loop ran; later groups never started
            stopped_summaries()
            raise
    return [summaries[m.name] for m in members]


def _device_memory() -> int | None:
    """The accelerator's memory limit (None on a CPU: `check_memory` then takes the host's)."""
    try:
        d = jax.devices()[0]
        if d.platform == "cpu":
            return None
        return int((d.memory_stats() or {}).get("bytes_limit")) or None
    except Exception:  # noqa: BLE001 — a backend without memory_stats: use the host's
        return None


def _write_summary(m: Member, history, status, message="", diverged_step=None, is_main: bool = True) -> dict:
    s = summarize(history, status, message, diverged_step)
    try:
        if m.dir.is_dir() and is_main:
            ckpt.atomic_write_text(m.dir / SUMMARY, json.dumps(s, indent=1) + "\n")
    except OSError:
        pass  # the original error (disk full, permissions) is what the user needs to see
    return s


def _x64(cfg):
    # both ways: a float32 config stays float32 under JAX_ENABLE_X64=1 (the run is its config)
    return jax.enable_x64(bool(cfg.float64))


def group_data(g: Group, data=None):
    """The group's data on the device, checked against the model."""
    xtr, ytr, xte, yte = data if data is not None else load_data(g.cfg)
    ep_jax.estimators.check_labels(g.model, ytr)
    ep_jax.estimators.check_labels(g.model, yte)
    if xtr.shape[1] != g.model.sizes[0]:
        raise RunError(f"sizes[0] = {g.model.sizes[0]} but the data has {xtr.shape[1]} features")
    dtype = ep_jax.models.base.default_float()
    return (jnp.asarray(xtr, dtype), jnp.asarray(ytr, jnp.int32), jnp.asarray(xte, dtype), jnp.asarray(yte, jnp.int32))


def _restore(g: Group, metas: dict):
    """Initial state of every member, with the checkpoints of those that resume."""
    state, rx = g.initial()
    start = np.zeros(g.M, int)
    histories = [[] for _ in range(g.M)]
    for i, m in enumerate(g.members):
        if m.name in metas:
            meta, tree = ckpt.load(m.dir / CHECKPOINT, _member_tree(state, rx, i))
            state = jax.tree.map(lambda a, b: a.at[i].set(b), state, tree["sweep"])
            rx = jax.tree.map(lambda a, b: a.at[i].set(b), rx, tree["relaxation"])
            start[i], histories[i] = meta["epoch"], meta["history"]
    return state, rx, start, histories


def _prepare(g: Group, ctx: _Context, state, rx, histories):
    """From here on the folders change (on the writing process only)."""
    for i, m in enumerate(g.members):
        f = ctx.folders[m.name]
        f.prepare(ctx.mode, ("tensorboard",) if "tensorboard" in ctx.loggers else ())
        f.write_json(CONFIG, m.cfg.to_json())
        f.write_metrics(histories[i])
        if m.name not in ctx.metas:  # a fresh member: epoch 0 is a good state to come back to
            _save(m, state, rx, i, 0, [])
        _write_summary(m, histories[i], "running")


class _Record(Hook):
    """Each finished epoch made safe: its checkpoint first (then the loop counts it done),
    and the figures (every epoch for up to 4 members, at the end for more)."""

    def __init__(self, g: Group, ctx: _Context):
        self.g, self.rt = g, ctx.runtime

    def after_epoch(self, loop, state, rx, end):
        """Save every member's checkpoint of this epoch."""
        host = None
        for i, row in enumerate(end.rows):
            if row is None:
                continue
            m = self.g.members[i]
            if self.rt.is_main:
                host = host or self.rt.host((state, rx))
                _save(m, *host, i, end.epoch, loop.history[i] + [row])
            loop.done(i, row)
            if self.g.M <= 4:
                _figures(m, loop.history[i], self.rt)

    def stop(self, loop, reason):
        """The figures of a large group, once."""
        if reason == "interrupted" or (reason == "ok" and self.g.M > 4):
            for i, m in enumerate(self.g.members):
                _figures(m, loop.history[i], self.rt)


# --- compile notice ------------------------------------------------------------------------
#
# XLA's compile time of a group's training program grows faster than linearly with the
# network's depth: measured on 2 CPU cores shared with other jobs (dendritic 16-12xL-4,
# T1=8, T2=3, batch 32, chunk 3; tracing + compiling `sweep_steps_jit`): L = 2, 5, 10, 20
# hidden layers took 7, 11, 19, 108 s; on the machine of issue 29 20 layers took 86 s and
# 100 layers 24 minutes. COMPILE_FIT is a fit
# a + b * L ** p through those points (seconds), rough by design: it decides whether to
# say "this will take a while" before a compile, not a promise.
COMPILE_FIT = (4.0, 0.45, 1.75)
#: print the estimate line when a compile is expected to take this long (EP_JAX_COMPILE_NOTICE)
COMPILE_NOTICE_S = 60.0
#: with progress output, a line every this many seconds while the compile runs (EP_JAX_COMPILE_TICK)
COMPILE_TICK_S = 15.0


def expected_compile_s(cfg: RunConfig) -> float:
    """A rough estimate of the seconds XLA takes to compile a group's training program
    (`COMPILE_FIT`, from the number of hidden layers)."""
    a, b, p = COMPILE_FIT
    return a + b * _hidden(cfg) ** p


def _hidden(cfg: RunConfig) -> int:
    """Hidden (state) layers, the output layer not counted."""
    return max(1, cfg.n_layers - 1)


def _env_seconds(name: str, default: float) -> float:
    v = os.environ.get(name, "")
    try:
        return float(v) if v.strip() else default
    except ValueError:
        raise configs.ConfigError(f"{name}={v!r} is not a number of seconds") from None


class _CompileNotice(Hook):
    """Says what is being compiled before the first chunk: one line with the expected time
    when the compile is expected to take long (`COMPILE_NOTICE_S`), and, with progress
    output, a line every `COMPILE_TICK_S` s while it runs (`loop.Ticker`, stopped when the
    first chunk was dispatched, or when the loop ends)."""

    def __init__(self, what: str, cfg: RunConfig, ticks: bool, print_line: bool):
        self.what, self.cfg, self.ticks, self.print_line = what, cfg, ticks, print_line
        self.notice_s = _env_seconds("EP_JAX_COMPILE_NOTICE", COMPILE_NOTICE_S)
        self.tick_s = _env_seconds("EP_JAX_COMPILE_TICK", COMPILE_TICK_S)
        self.ticker = None

    def start(self, loop, state, rx):
        """Before the first epoch: the estimate, and the ticker."""
        if loop.first_epoch() > self.cfg.epochs:
            return
        if self.print_line:
            est = expected_compile_s(self.cfg)
            if est >= self.notice_s:
                print(
                    f"compiling the training program of {self.what} ({plural(_hidden(self.cfg), 'hidden layer')}): expected to take "
                    f"about {_duration(est)} (a rough estimate from the depth); the first epoch starts after "
                    "that",
                    file=sys.stderr,
                    flush=True,
                )
        if self.ticks and self.tick_s > 0:
            self.ticker = Ticker(f"still compiling the training program of {self.what}", self.tick_s)

    def after_chunk(self, loop, state, rx, chunk):
        """The first chunk was dispatched: its program is compiled."""
        self._stop()

    def stop(self, loop, reason):
        """The loop ended (also by an error or an interrupt)."""
        self._stop()

    def _stop(self):
        if self.ticker is not None:
            self.ticker.stop()
            self.ticker = None


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} minutes"


def _figures(m: Member, history: list, rt):
    if rt.is_main:
        figures.learning_curve(m.dir, history, _title(m))
        if m.cfg.align_every:
            figures.alignment(m.dir, history, _title(m))


def _train_group(g: Group, ctx: _Context, label: str) -> dict:
    data = group_data(g, ctx.data)
    runner = ctx.runtime.runner(g, int(data[1].shape[0]))
    state, rx, start, histories = _restore(g, ctx.metas)  # still nothing on disk changed
    if ctx.runtime.is_main:
        with ctx.signals.recording():  # a signal waits for the folders to be whole
            _prepare(g, ctx, state, rx, histories)
    folders = [ctx.folders[m.name] for m in g.members]
    names = [m.name for m in g.members]
    hooks: list[Hook] = []
    if g.cfg.align_every:
        hooks.append(AlignmentHook(g, data[0], data[1], state, ctx.runtime))
    what = (label + " " if label else "") + (repr(names[0]) if g.M == 1 else f"{g.M} members")
    hooks += [
        _CompileNotice(what, g.cfg, ctx.progress, ctx.runtime.is_main),
        _StopAtChunks(ctx.signals),
        _Record(g, ctx),
        JsonlLogger(folders, ctx.runtime.is_main),
        ConsoleLogger(names, label or g.members[0].dir.parent.name, ctx.print_fn),
        ProgressBar((label + " " if label else "") + (names[0] if g.M == 1 else f"{g.M} members"), ctx.progress),
    ]
    if ctx.runtime.is_main:
        hooks += optional_loggers(ctx.loggers, folders, names, [m.cfg for m in g.members])
    batches = lambda i, epoch, n: epoch_batches(g.members[i].cfg, epoch, n)
    loop = Loop(g, runner, data, batches, start, histories, hooks, ctx.deadline, guard=ctx.signals.recording)
    ctx.live.clear()
    ctx.live.update({m.name: (loop, i) for i, m in enumerate(g.members)})
    is_main = ctx.runtime.is_main
    try:
        loop.run(state, rx)
    except (Interrupted, KeyboardInterrupt) as e:
        ctx.signals.stopping()
        why = str(e) if isinstance(e, Interrupted) and str(e) else "interrupted"
        for i, m in enumerate(g.members):
            if loop.status[i] == "running":
                loop.status[i] = "interrupted"
                loop.message[i] = f"{why}; checkpoint of epoch {loop.start[i]} kept, continue with --resume"
            _write_summary(m, loop.history[i], loop.status[i], loop.message[i], loop.diverged_step[i], is_main)
            ctx.reported.add(m.name)
        ctx.print_fn(f"stopped ({why}); continue with --resume")
        ctx.said_stopped = True
        raise
    except BaseException as e:
        for i, m in enumerate(g.members):
            _write_summary(m, loop.history[i], "failed", f"{type(e).__name__}: {e}", loop.diverged_step[i], is_main)
        raise
    out = {}
    for i, m in enumerate(g.members):
        status = "ok" if loop.status[i] == "running" else loop.status[i]
        out[m.name] = s = _write_summary(m, loop.history[i], status, loop.message[i], loop.diverged_step[i], is_main)
        if g.M == 1 and loop.history[i]:
            ctx.print_fn(
                f"summary: {_title(m)}: final test {s['final_test_acc']:.2f}% (best "
                f"{s['best_test_acc']:.2f}% at epoch {s['best_epoch']}), {plural(s['epochs_done'], 'epoch')}, "
                f"{s['train_time_s']:.0f} s training -> {m.dir}"
            )
    return out


def _save(m: Member, state, rx, i: int, epoch: int, history: list):
    """Member i's checkpoint of `epoch` (host copies of the state)."""
    meta = {
        "epoch": epoch,
        "digest": m.cfg.digest(),
        "run_digest": m.cfg.digest(exclude=NOT_IDENTITY),
        "name": m.name,
        "history": history,
        "ep_jax": "0.2.0",
        "backend": jax.default_backend(),
    }
    ckpt.save(m.dir / CHECKPOINT, _member_tree(state, rx, i), meta)


# --- restoring a finished run (analysis tools) ------------------------------------------


def load_run(run_dir: Path):
    """`(cfg, model, est, params, buffers, rx, meta)` of a run folder's checkpoint; a
    RunError when its `config.json` is not the one the checkpoint was written for
    (`files.check_config_digest`: edited after the run, or another run's)."""
    run_dir = Path(run_dir)
    cfg = files.read_config(run_dir)
    g = Group([Member(cfg, run_dir.name, run_dir)])
    with _x64(cfg):
        state, rx = g.initial()
        meta, tree = ckpt.load(run_dir / CHECKPOINT, _member_tree(state, rx, 0))
    files.check_config_digest(run_dir, cfg, meta, files.read_json(run_dir / CONFIG))  # the checkpoint's config
    tr = tree["sweep"].train
    return cfg, g.model, g.est, tr.params, tr.buffers, tree["relaxation"], meta
