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
budget stop at a safe point (a second signal while an epoch is being recorded waits for
the record to be complete).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import ep_jax
from ep_jax import sweep as S
from ep_jax.experiments import checkpoint as ckpt
from ep_jax.experiments import config as configs, figures, files, runtime as runtimes
from ep_jax.experiments.alignment_hook import AlignmentHook
from ep_jax.experiments.build import (augment_key, build_augment, build_estimator, build_model,  # noqa: F401
                                      build_optimizer, build_relaxation, epoch_batches, epoch_order,
                                      group_optimizer, keys, load_data, model_settings, opt_hyperparams)
from ep_jax.experiments.config import RunConfig, warnings_for
from ep_jax.experiments.errors import Interrupted, RunError
from ep_jax.experiments.loggers import (ConsoleLogger, JsonlLogger, ProgressBar, check_loggers, optional_loggers,
                                        plural)
from ep_jax.experiments.loop import Hook, Loop
from ep_jax.experiments.runfolder import CHECKPOINT, CONFIG, METRICS, SUMMARY, RunFolder

STATUSES = files.STATUSES
#: fields that are not part of a run's identity (a resume may change them)
NOT_IDENTITY = ("epochs", "data_dir")


@dataclasses.dataclass(frozen=True)
class Member:
    """One run: its config, its name (in a sweep) and its folder."""
    cfg: RunConfig
    name: str
    dir: Path


def same_run(meta: dict, cfg: RunConfig, saved: dict | None) -> bool:
    """Whether a checkpoint's meta belongs to `cfg`'s run: its digest is the config's
    (`RunConfig.digest`, all but epochs), with `data_dir` as the run folder's config.json
    saved it — where the data lives is not part of a run's identity — or its `run_digest`
    (all but `NOT_IDENTITY`; checkpoints written since it exists) is the config's."""
    if meta.get("digest") == cfg.digest():
        return True
    if isinstance(meta.get("run_digest"), str) and meta["run_digest"] == cfg.digest(exclude=NOT_IDENTITY):
        return True   # written since checkpoints carry it: data_dir is not part of the run
    if isinstance(saved, dict) and "data_dir" in saved:
        try:
            return meta.get("digest") == cfg.replace(data_dir=saved["data_dir"]).digest()
        except Exception:   # noqa: BLE001 — a damaged config.json: not the same run
            return False
    return False


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
        self.aug_keys = (jnp.stack([augment_key(m.cfg) for m in self.members]) if self.augment is not None
                         else None)

    def initial(self):
        """`(SweepState, stacked Relaxation)` from the members' configs and seeds."""
        cfgs = [m.cfg for m in self.members]
        ks = [keys(c) for c in cfgs]
        settings = {k: jnp.asarray([model_settings(c)[k] for c in cfgs]) for k in model_settings(self.cfg)}
        hps = [opt_hyperparams(c, self.model) for c in cfgs]
        hps = {k: jnp.stack([h[k] for h in hps]) for k in hps[0]}
        state = S.init_sweep(self.model, self.est, self.opt, [k["init"] for k in ks], [k["step"] for k in ks],
                             settings=settings, opt_hyperparams=hps)
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
        "status": status, "message": message, "epochs_done": len(history),
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
        f.check_manifest()   # a damaged manifest is refused here, before anything changes
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
                raise RunError(f"{d}: the checkpoint belongs to another config{detail}; only epochs (and data_dir) "
                               "may change on --resume")
            why = ("only epochs may change on --resume, and where the data lives (--data-dir)"
                   if isinstance(meta.get("run_digest"), str) else
                   "a checkpoint this old cannot tell which field, and counts data_dir too: restore config.json "
                   "and give --data-dir (or EP_JAX_DATA_DIR) for data that moved")
            raise RunError(f"{d}: the checkpoint belongs to another config than config.json's (another run's "
                           f"checkpoint, or config.json edited after the run); {why}")
        if meta["epoch"] > m.cfg.epochs:
            raise RunError(f"{d}: already trained {meta['epoch']} epochs, more than epochs={m.cfg.epochs}")
        metas[m.name] = meta
    return metas


# --- signals ------------------------------------------------------------------------------

class _Signals:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread while training —
    except inside `recording()` (an epoch's checkpoint and metrics line), where the stop
    waits for the record to be complete, and after the first stop (`stopping()`), when
    further signals are ignored so that the summaries are written whole."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.old, self.depth, self.pending, self.stopped = {}, 0, False, False
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.stopped:
            return
        if self.depth:
            self.pending = True
            return
        self.stopped = True
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def recording(self):
        """A section that a signal does not cut (module docstring)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending and not self.stopped:
            self.pending, self.stopped = False, True
            raise KeyboardInterrupt

    def stopping(self):
        """From now on signals are ignored (the stop is under way)."""
        self.stopped = True

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


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


def run(members: Sequence[Member], mode: str = "new", *, progress: bool = True, print_fn: Callable = print,
        deadline: float | None = None, data=None, runtime=None, loggers: Sequence[str] = ()) -> list[dict]:
    """Train `members` (see the module docstring); returns one summary per member.

    deadline: a `time.time()` by which training stops cleanly at an epoch boundary (an
    epoch starts only if the last one's duration still fits; status interrupted,
    resumable). data: `(x_train, y_train, x_test, y_test)` to use instead of loading the
    configs' dataset (tests). runtime: where to train and who writes (`runtime.Local()`,
    `runtime.Distributed(...)`; default `runtime.current()`). loggers: optional writers
    ("tensorboard", "wandb")."""
    rt = runtime if runtime is not None else runtimes.current()
    check_loggers(loggers)                                # an optional writer missing: refused before any folder
    members = list(members)
    if mode not in ("new", "resume", "overwrite"):
        raise ValueError(f"mode must be new, resume or overwrite, got {mode!r}")
    check_members(members)
    groups = group_members(members)
    rt.check_layout(groups)                               # distributed: refuse what does not divide
    for g in groups:                                      # refuse what cannot fit before allocating
        configs.check_memory(g.cfg, available=_device_memory(), members=g.M)
    # distributed: every process must train the same members with the same configs
    rt.agree(json.dumps([[m.name, {k: v for k, v in m.cfg.to_json().items() if k != "data_dir"}]
                         for m in members], sort_keys=True), "config (or members)")
    folders = {m.name: RunFolder(m.dir) for m in members}
    summaries: dict[str, dict] = {}
    started: set[str] = set()
    with _Signals() as sig, contextlib.ExitStack() as held:
        def take_and_check():
            if rt.is_main:   # one process writes, so one holds the folders
                for m in members:
                    lock = folders[m.name].lock
                    held.callback(lock.undo_created)   # after release: the folders a refusal left empty
                    held.callback(lock.release)
                    lock.acquire()
            return check_folders(members, mode)

        metas = rt.together(take_and_check)              # distributed: every process checks, one decision
        for m in members:
            for w in warnings_for(m.cfg):
                print_fn(f"warning ({m.name}): {w}")
        ctx = _Context(mode, metas, folders, rt, sig, progress and rt.is_main, print_fn, deadline, data,
                       tuple(loggers))
        try:
            for gi, g in enumerate(groups):
                started.update(m.name for m in g.members)
                label = f"group {gi + 1}/{len(groups)}" if len(groups) > 1 else ""
                with _x64(g.cfg):
                    summaries.update(_train_group(g, ctx, label))
        except (Interrupted, KeyboardInterrupt):
            sig.stopping()
            # the group in flight wrote its own summaries; later groups never started
            for m in members:
                if m.name not in started and (m.dir / CONFIG).is_file():
                    summaries[m.name] = _write_summary(m, read_metrics(m.dir / METRICS), "interrupted",
                                                       "stopped before this member's group finished; "
                                                       "continue with --resume", is_main=rt.is_main)
            raise
    return [summaries[m.name] for m in members]


def _device_memory() -> int | None:
    """The accelerator's memory limit (None on a CPU: `check_memory` then takes the host's)."""
    try:
        d = jax.devices()[0]
        if d.platform == "cpu":
            return None
        return int((d.memory_stats() or {}).get("bytes_limit")) or None
    except Exception:   # noqa: BLE001 — a backend without memory_stats: use the host's
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
    return (jnp.asarray(xtr, dtype), jnp.asarray(ytr, jnp.int32), jnp.asarray(xte, dtype),
            jnp.asarray(yte, jnp.int32))


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


def _figures(m: Member, history: list, rt):
    if rt.is_main:
        figures.learning_curve(m.dir, history, _title(m))
        if m.cfg.align_every:
            figures.alignment(m.dir, history, _title(m))


def _train_group(g: Group, ctx: _Context, label: str) -> dict:
    data = group_data(g, ctx.data)
    runner = ctx.runtime.runner(g, int(data[1].shape[0]))
    state, rx, start, histories = _restore(g, ctx.metas)       # still nothing on disk changed
    if ctx.runtime.is_main:
        _prepare(g, ctx, state, rx, histories)
    folders = [ctx.folders[m.name] for m in g.members]
    names = [m.name for m in g.members]
    hooks: list[Hook] = []
    if g.cfg.align_every:
        hooks.append(AlignmentHook(g, data[0], data[1], state, ctx.runtime))
    hooks += [_Record(g, ctx), JsonlLogger(folders, ctx.runtime.is_main),
              ConsoleLogger(names, label or g.members[0].dir.parent.name, ctx.print_fn),
              ProgressBar((label + " " if label else "") + (names[0] if g.M == 1 else f"{g.M} members"),
                          ctx.progress)]
    if ctx.runtime.is_main:
        hooks += optional_loggers(ctx.loggers, folders, names, [m.cfg for m in g.members])
    batches = lambda i, epoch, n: epoch_batches(g.members[i].cfg, epoch, n)
    loop = Loop(g, runner, data, batches, start, histories, hooks, ctx.deadline, guard=ctx.signals.recording)
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
        ctx.print_fn(f"stopped ({why}); continue with --resume")
        raise
    except BaseException as e:
        for i, m in enumerate(g.members):
            _write_summary(m, loop.history[i], "failed", f"{type(e).__name__}: {e}", loop.diverged_step[i], is_main)
        raise
    out = {}
    for i, m in enumerate(g.members):
        status = "ok" if loop.status[i] == "running" else loop.status[i]
        out[m.name] = s = _write_summary(m, loop.history[i], status, loop.message[i], loop.diverged_step[i],
                                         is_main)
        if g.M == 1 and loop.history[i]:
            ctx.print_fn(f"summary: {_title(m)}: final test {s['final_test_acc']:.2f}% (best "
                         f"{s['best_test_acc']:.2f}% at epoch {s['best_epoch']}), {plural(s['epochs_done'], 'epoch')}, "
                         f"{s['train_time_s']:.0f} s training -> {m.dir}")
    return out


def _save(m: Member, state, rx, i: int, epoch: int, history: list):
    """Member i's checkpoint of `epoch` (host copies of the state)."""
    meta = {"epoch": epoch, "digest": m.cfg.digest(), "run_digest": m.cfg.digest(exclude=NOT_IDENTITY),
            "name": m.name, "history": history,
            "ep_jax": "0.2.0", "backend": jax.default_backend()}
    ckpt.save(m.dir / CHECKPOINT, _member_tree(state, rx, i), meta)


# --- restoring a finished run (analysis tools) ------------------------------------------

def load_run(run_dir: Path):
    """`(cfg, model, est, params, buffers, rx, meta)` of a run folder's checkpoint."""
    run_dir = Path(run_dir)
    cfg = files.read_config(run_dir)
    g = Group([Member(cfg, run_dir.name, run_dir)])
    with _x64(cfg):
        state, rx = g.initial()
        meta, tree = ckpt.load(run_dir / CHECKPOINT, _member_tree(state, rx, 0))
    tr = tree["sweep"].train
    return cfg, g.model, g.est, tr.params, tr.buffers, tree["relaxation"], meta
