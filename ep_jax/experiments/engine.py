"""The experiment engine: every run is a sweep, a single run is a sweep of one.

`run(members, mode)` trains a list of `Member`s (a validated `RunConfig`, a name, a run
folder). Members that agree on every static field form a group; a group is ONE compiled
program, vmapped over its members, with the dataset resident on the device and the
epoch's steps run as `lax.scan`s over chunks of `cfg.chunk` steps.

Keys. Everything random derives from the member's seed:
`init, dt, step, data = split(PRNGKey(seed), 4)` — params and masks from `init`, sampled
heterogeneous time steps from `dt`, step t's key (random nudge signs) is
`fold_in(step, t)`, and epoch e's example order is `permutation(fold_in(data, e), n)`.
Each member has its own data order, so a member trained in a sweep, alone with
`train`, or by a plain loop over `ep_jax.train_step` goes through the same numbers. The
subset (`subset`) is `ep_jax.data.subset_indices(fold_in(PRNGKey(subset_seed), 0), ...)`:
the same examples for every seed. An epoch is every full batch, then the partial last
batch (as PyTorch's DataLoader, the reference's, does).

Run folder (one per member):
- `config.json`     the member's `RunConfig` (round-trips through `RunConfig.from_dict`);
- `metrics.jsonl`   one line per finished epoch: epoch, train_acc (running accuracy of the
                    free phase during the epoch, %), loss, test_acc (%), test_loss,
                    time_s, steps (and the alignment columns when `align_every` is set);
- `checkpoint.msgpack` the state after the last finished epoch (`experiments.checkpoint`),
                    with the metrics history; `metrics.jsonl` always equals that history;
- `summary.json`    status (ok | diverged | interrupted | failed | not started), message,
                    final/best test accuracy, epochs done — written on every exit path;
- `learning_curve.png`.

Modes: "new" refuses an existing, non-empty folder; "overwrite" replaces it (only after
the config, the data and the checkpoints were read without error); "resume" needs a
checkpoint of the same config (only `epochs` may differ) and continues bit for bit.
A diverging member (non-finite state or gradient, or a state above `max_state`) is
frozen at its last good step; its last checkpoint (previous epoch) is kept; the others
go on.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import ep_jax
from ep_jax import sweep as S
from ep_jax.experiments import checkpoint as ckpt
from ep_jax.experiments import distributed as dist
from ep_jax.experiments import figures
from ep_jax.experiments.config import RunConfig, warnings_for
from ep_jax.experiments.errors import Interrupted, RunError

CHECKPOINT = "checkpoint.msgpack"
STATUSES = ("ok", "diverged", "interrupted", "failed", "not started", "running")


@dataclasses.dataclass(frozen=True)
class Member:
    """One run: its config, its name (in a sweep) and its folder."""
    cfg: RunConfig
    name: str
    dir: Path


# --- building blocks from a config ------------------------------------------------------

def keys(cfg: RunConfig) -> dict:
    """The member's keys (module docstring)."""
    k = jax.random.split(jax.random.PRNGKey(cfg.seed), 4)
    return dict(zip(("init", "dt", "step", "data"), k))


def build_model(cfg: RunConfig):
    kw = dict(sizes=tuple(cfg.sizes), activation=cfg.activation, output_activation=cfg.output_activation,
              loss=cfg.loss)
    if cfg.model == "dendritic":
        kw.update(basal_branches=cfg.basal_branches, apical_branches=cfg.apical_branches,
                  sparsity=cfg.sparsity, apical_dense=cfg.apical_dense)
    return ep_jax.build_model(cfg.model, **kw)


def build_estimator(cfg: RunConfig) -> ep_jax.Estimator:
    return ep_jax.Estimator(cfg.estimator, t_free=cfg.t_free, t_nudge=cfg.t_nudge, nudge=cfg.nudge)


def build_optimizer(cfg: RunConfig, model):
    """The optimiser (its rates are set per member, see `opt_hyperparams`)."""
    if cfg.optimizer == "adam":
        return ep_jax.optim.adam(model, lr=cfg.lr)
    return ep_jax.optim.sgd(model, lr=cfg.lr, momentum=cfg.momentum)


_OPTIMIZERS: dict = {}


def group_optimizer(cfg: RunConfig, model):
    """The optimiser of a group, one object per (model, kind, precision): its rates are
    placeholders, every member's own are set through `opt_hyperparams`. Reusing the object
    lets `jit` reuse the compiled step across runs, resumes and groups of one process."""
    from ep_jax.models.base import default_float
    key = (model, cfg.optimizer, str(default_float()))
    if key not in _OPTIMIZERS:
        _OPTIMIZERS[key] = (ep_jax.optim.adam(model, lr=0.0) if cfg.optimizer == "adam"
                            else ep_jax.optim.sgd(model, lr=0.0, momentum=0.0))
    return _OPTIMIZERS[key]


def opt_hyperparams(cfg: RunConfig, model) -> dict:
    lr = ep_jax.optim.per_synapse_rates(model, cfg.lr)
    if cfg.optimizer == "adam":
        return {"lr": lr}
    return {"lr": lr, "momentum": jnp.asarray(cfg.momentum, lr.dtype)}


def model_settings(cfg: RunConfig) -> dict:
    return {"alpha": cfg.alpha} if cfg.model == "dendritic" else {"gamma": cfg.gamma}


def build_relaxation(cfg: RunConfig, model) -> ep_jax.Relaxation:
    """β and the time steps; heterogeneous hidden steps are sampled from the `dt` key."""
    spec = cfg.dt_spec()
    if spec is None:
        dt = cfg.dt if not isinstance(cfg.dt, tuple) else list(cfg.dt)
    else:
        dt_out = cfg.dt_out if cfg.dt_out is not None else cfg.dt
        dt = list(ep_jax.timesteps.layer_dts(keys(cfg)["dt"], model, spec, dt_out))
    return ep_jax.make_relaxation(model, beta=cfg.beta, dt=dt)


# --- data -------------------------------------------------------------------------------

_DATA_CACHE: dict = {}


def load_data(cfg: RunConfig):
    """`(x_train, y_train, x_test, y_test)` numpy arrays after the subsets (cached)."""
    key = (cfg.dataset, cfg.data_dir, cfg.subset, cfg.test_subset, cfg.subset_seed,
           cfg.synthetic_train, cfg.synthetic_test, cfg.synthetic_noise, cfg.sizes[0], cfg.sizes[-1])
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    if cfg.dataset == "synthetic":
        ds = ep_jax.synthetic.make_synthetic(jax.random.PRNGKey(cfg.subset_seed), n_features=cfg.sizes[0],
                                             n_classes=cfg.sizes[-1], n_train=cfg.synthetic_train,
                                             n_test=cfg.synthetic_test, noise=cfg.synthetic_noise)
    else:
        ds = ep_jax.data.load_dataset(cfg.dataset, data_dir=cfg.data_dir)
    base = jax.random.PRNGKey(cfg.subset_seed)
    i = ep_jax.data.subset_indices(jax.random.fold_in(base, 0), len(ds.y_train), cfg.subset)
    j = ep_jax.data.subset_indices(jax.random.fold_in(base, 1), len(ds.y_test), cfg.test_subset)
    out = (ds.x_train[i], ds.y_train[i], ds.x_test[j], ds.y_test[j])
    if len(_DATA_CACHE) > 2:
        _DATA_CACHE.clear()
    _DATA_CACHE[key] = out
    return out


def epoch_order(cfg: RunConfig, epoch: int, n: int) -> np.ndarray:
    """The example order of epoch `epoch` (1-based) for this member."""
    return np.asarray(jax.random.permutation(jax.random.fold_in(keys(cfg)["data"], epoch), n))


def epoch_batches(cfg: RunConfig, epoch: int, n: int):
    """`(full (n // B, B), rest (n % B,))` example indices of the epoch's batches."""
    perm = epoch_order(cfg, epoch, n)
    B = cfg.batch_size
    n_full = n // B
    return perm[: n_full * B].reshape(n_full, B), perm[n_full * B:]


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
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def summarize(history: list[dict], status: str, message: str = "", diverged_step=None) -> dict:
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


# --- preparing folders (read-only checks first, then changes) -----------------------------

def check_folders(members: Sequence[Member], mode: str) -> dict:
    """Read-only checks of every member folder for `mode`; returns `{name: checkpoint meta}`
    of the checkpoints a resume will load. Raises RunError before anything is changed."""
    if mode not in ("new", "resume", "overwrite"):
        raise ValueError(f"mode must be new, resume or overwrite, got {mode!r}")
    names = [m.name for m in members]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RunError(f"member names must be unique, repeated: {dup}")
    dirs = [m.dir.resolve() for m in members]
    if len(set(dirs)) != len(dirs):
        raise RunError("two members share a run folder")
    metas = {}
    for m in members:
        d = m.dir
        if d.exists() and not d.is_dir():
            raise RunError(f"{d} exists and is not a folder")
        busy = d.is_dir() and any(d.iterdir())
        if mode == "new" and busy:
            raise RunError(f"{d} already holds a run: pass --resume to continue it or --overwrite to replace it")
        if mode != "resume":
            continue
        path = d / CHECKPOINT
        if not path.exists():
            if len(members) == 1:
                raise RunError(f"{d}: no checkpoint to resume from ({CHECKPOINT} is missing)")
            if (d / "metrics.jsonl").exists() and read_metrics(d / "metrics.jsonl"):
                raise RunError(f"{d}: has metrics but no checkpoint; cannot resume it safely")
            continue  # a sweep member that never finished an epoch starts afresh
        meta = ckpt.read_meta(path)
        saved = read_json(d / "config.json")
        if meta.get("digest") != m.cfg.digest():
            detail = ""
            if saved is not None:
                diff = sorted(k for k, v in m.cfg.to_json().items() if k != "epochs" and saved.get(k) != v)
                detail = f" (differs in {diff})" if diff else ""
            raise RunError(f"{d}: the checkpoint belongs to another config{detail}; only epochs may change "
                           "on --resume")
        if meta["epoch"] > m.cfg.epochs:
            raise RunError(f"{d}: already trained {meta['epoch']} epochs, more than epochs={m.cfg.epochs}")
        metas[m.name] = meta
    return metas


# --- the training loop ------------------------------------------------------------------

class _Signals:
    """SIGTERM raises KeyboardInterrupt in the main thread while training."""

    def __enter__(self):
        self.old = None
        try:
            self.old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def run(members: Sequence[Member], mode: str = "new", *, progress: bool = True, print_fn: Callable = print,
        deadline: float | None = None, data=None) -> list[dict]:
    """Train `members` (see the module docstring); returns one summary per member.

    deadline: a `time.time()` by which training stops cleanly at an epoch boundary (an
    epoch starts only if the last one's duration still fits; status interrupted,
    resumable). data: `(x_train, y_train, x_test, y_test)`
    to use instead of loading the configs' dataset (tests)."""
    members = list(members)
    dist.check_layout(members)                            # distributed: refuse what does not divide
    metas = dist.together(check_folders, members, mode)   # distributed: every process checks, one decision
    progress = progress and dist.is_main()
    for m in members:
        for w in warnings_for(m.cfg):
            print_fn(f"warning ({m.name}): {w}")
    groups = group_members(members)
    summaries: dict[str, dict] = {}
    started: set[str] = set()
    with _Signals():
        try:
            for gi, g in enumerate(groups):
                started.update(m.name for m in g.members)
                summaries.update(_run_group(g, mode, metas, progress, print_fn, deadline, data,
                                            label=f"group {gi + 1}/{len(groups)}" if len(groups) > 1 else ""))
        except (Interrupted, KeyboardInterrupt):
            # the group in flight wrote its own summaries; later groups never started
            for m in members:
                if m.name not in started:
                    summaries[m.name] = _write_summary(m, read_metrics(m.dir / "metrics.jsonl"), "interrupted",
                                                       "stopped before this member's group finished; "
                                                       "continue with --resume")
            raise
    return [summaries[m.name] for m in members]


def _write_summary(m: Member, history, status, message="", diverged_step=None) -> dict:
    s = summarize(history, status, message, diverged_step)
    try:
        if m.dir.is_dir() and dist.is_main():
            ckpt.atomic_write_text(m.dir / "summary.json", json.dumps(s, indent=1) + "\n")
    except OSError:
        pass  # the original error (disk full, permissions) is what the user needs to see
    return s


def _x64(cfg):
    # both ways: a float32 config stays float32 under JAX_ENABLE_X64=1 (the run is its config)
    return jax.enable_x64(bool(cfg.float64))


def _run_group(g: Group, mode, metas, progress, print_fn, deadline, data, label=""):
    with _x64(g.cfg):
        return _train_group(g, mode, metas, progress, print_fn, deadline, data, label)


def _train_group(g: Group, mode, metas, progress, print_fn, deadline, data, label):
    cfg, M = g.cfg, g.M
    xtr, ytr, xte, yte = data if data is not None else load_data(cfg)
    ep_jax.estimators.check_labels(g.model, ytr)
    ep_jax.estimators.check_labels(g.model, yte)
    if xtr.shape[1] != g.model.sizes[0]:
        raise RunError(f"sizes[0] = {g.model.sizes[0]} but the data has {xtr.shape[1]} features")
    steps_fn = dist.steps_fn(g, len(ytr)) if dist.active() else S.sweep_steps_jit

    # templates, then the checkpoints into them: still nothing on disk changed
    state, rx = g.initial()
    start = np.zeros(M, int)
    histories = [[] for _ in range(M)]
    for i, m in enumerate(g.members):
        if m.name in metas:
            meta, tree = ckpt.load(m.dir / CHECKPOINT, _member_tree(state, rx, i))
            state = jax.tree.map(lambda a, b: a.at[i].set(b), state, tree["sweep"])
            rx = jax.tree.map(lambda a, b: a.at[i].set(b), rx, tree["relaxation"])
            start[i], histories[i] = meta["epoch"], meta["history"]

    # from here on the folders change (process 0 alone writes them)
    for i, m in enumerate(g.members if dist.is_main() else ()):
        if mode == "overwrite" and m.dir.exists():
            shutil.rmtree(m.dir)
        m.dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(m.dir / "config.json", json.dumps(m.cfg.to_json(), indent=1) + "\n")
        ckpt.atomic_write_text(m.dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in histories[i]))
        if m.name not in metas:  # a fresh member: epoch 0 is a good state to come back to
            _save(m, state, rx, i, 0, [])
        _write_summary(m, histories[i], "running")

    dtype = ep_jax.models.base.default_float()
    x_dev, y_dev = jnp.asarray(xtr, dtype), jnp.asarray(ytr, jnp.int32)
    xte_dev, yte_dev = jnp.asarray(xte, dtype), jnp.asarray(yte, jnp.int32)
    n, B, epochs = len(ytr), cfg.batch_size, cfg.epochs
    n_full = n // B
    max_state = jnp.asarray(cfg.max_state, dtype)
    status = ["running"] * M
    messages = [""] * M
    div_step = [None] * M
    single = M == 1

    align = _Aligner(g, x_dev, y_dev, state) if cfg.align_every else None
    pending = [[] for _ in range(M)]   # alignment records of the epoch in flight
    if align is not None:
        steps0 = np.asarray(state.train.step)
        fresh = [i for i in range(M) if steps0[i] == 0 and status[i] == "running"]
        if fresh:
            for i, rec in align.measure(state, rx, fresh).items():
                pending[i].append(rec)

    from tqdm.auto import tqdm
    first_epoch = int(start.min()) + 1
    total_steps = (epochs - first_epoch + 1) * (n_full + (n % B > 0))
    bar = tqdm(total=total_steps, unit="step", disable=not progress, leave=False, file=sys.stderr,
               desc=(label + " " if label else "") + (g.members[0].name if single else f"{M} members"))
    last_epoch_s = 0.0
    try:
        for epoch in range(first_epoch, epochs + 1):
            if deadline is not None and time.time() + last_epoch_s > deadline:
                raise Interrupted("time budget used up")
            # members already past this epoch (resumed from a later checkpoint) sit it out
            active = np.array([start[i] < epoch and status[i] == "running" for i in range(M)])
            if not active.any():
                continue
            alive_before = np.asarray(state.alive)
            state = state._replace(alive=jnp.asarray(alive_before & active))
            t0 = time.perf_counter()
            orders = [epoch_batches(m.cfg, epoch, n) for m in g.members]
            full = np.stack([o[0] for o in orders], axis=1)            # (n_full, M, B)
            rest = np.stack([o[1] for o in orders], axis=0)            # (M, n % B)
            correct, loss_sum, seen = np.zeros(M), np.zeros(M), 0
            align_s = 0.0
            chunks = [full[c0:c0 + cfg.chunk] for c0 in range(0, n_full, cfg.chunk)]
            if rest.shape[1]:
                chunks.append(rest[None])
            for idx in chunks:
                before = np.asarray(state.train.step) if align is not None else None
                state, info = steps_fn(g.model, g.est, g.opt, state, x_dev, y_dev, jnp.asarray(idx), rx, max_state)
                correct += np.asarray(info.correct).sum(0)
                loss_sum += (np.asarray(info.loss) * idx.shape[2]).sum(0)
                seen += idx.shape[0] * idx.shape[2]
                bar.update(idx.shape[0])
                if progress and single:
                    bar.set_postfix(acc=f"{100 * correct[0] / seen:.2f}%")
                if align is not None:
                    after = np.asarray(state.train.step)
                    due = [i for i in range(M) if active[i] and after[i] // cfg.align_every > before[i] // cfg.align_every]
                    if due:
                        ta = time.perf_counter()
                        for i, rec in align.measure(state, rx, due).items():
                            pending[i].append(rec)
                        align_s += time.perf_counter() - ta
            alive_now = np.asarray(state.alive)
            jax.block_until_ready(state)
            elapsed = time.perf_counter() - t0 - align_s
            test_acc, test_loss = _evaluate(g, state, xte_dev, yte_dev, rx, cfg.eval_batch)
            # restore the flags of members that sat this epoch out
            state = state._replace(alive=jnp.asarray(np.where(active, alive_now, alive_before)))
            dsteps = np.asarray(state.diverged_step)
            steps = np.asarray(state.train.step)
            for i, m in enumerate(g.members):
                if not active[i]:
                    continue
                if not alive_now[i]:
                    status[i] = "diverged"
                    div_step[i] = int(dsteps[i])
                    messages[i] = (f"diverged at epoch {epoch}, step {int(dsteps[i]) + 1} (non-finite state or "
                                   f"gradient, or a state above max_state={cfg.max_state:g}); the checkpoint of "
                                   f"epoch {start[i]} is kept")
                    print_fn(f"{m.name}: STOPPED: {messages[i]}")
                    continue
                row = {"epoch": epoch, "train_acc": 100.0 * correct[i] / seen, "loss": loss_sum[i] / seen,
                       "test_acc": 100.0 * test_acc[i], "test_loss": float(test_loss[i]), "time_s": elapsed,
                       "steps": int(steps[i])}
                if align is not None:
                    row["align_time_s"] = align_s
                    row["alignment"] = pending[i]
                    pending[i] = []
                # saved first: a failed write (disk full, Ctrl-C) leaves the history of the last
                # checkpoint, so summary.json and metrics.jsonl never claim an unsaved epoch
                _save(m, state, rx, i, epoch, histories[i] + [row])
                histories[i].append(row)
                if dist.is_main():
                    with open(m.dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                start[i] = epoch
                if single:
                    print_fn(f"epoch {epoch}: train {row['train_acc']:.2f}%  test {row['test_acc']:.2f}%  "
                             f"loss {row['loss']:.4f}  ({elapsed:.1f} s)")
                if M <= 4:
                    _plot(m, histories[i], "curves")
                    if align is not None:
                        _plot(m, histories[i], "alignment")
            if not single:
                ok = [i for i in range(M) if active[i] and alive_now[i]]
                if ok:
                    accs = 100 * test_acc[ok]
                    print_fn(f"{label or g.members[0].dir.parent.name}: epoch {epoch}: test accuracy mean {accs.mean():.2f}% "
                             f"(min {accs.min():.2f}, max {accs.max():.2f}) over {len(ok)} member(s) "
                             f"({elapsed:.1f} s)")
            last_epoch_s = time.perf_counter() - t0
            if not any(s == "running" for s in status):
                break
    except (Interrupted, KeyboardInterrupt) as e:
        bar.close()
        why = str(e) if isinstance(e, Interrupted) and str(e) else "interrupted"
        out = {}
        for i, m in enumerate(g.members):
            if status[i] == "running":
                status[i] = "interrupted"
                messages[i] = f"{why}; checkpoint of epoch {start[i]} kept, continue with --resume"
            out[m.name] = _write_summary(m, histories[i], status[i], messages[i], div_step[i])
            _plot(m, histories[i], "curves")
        print_fn(f"stopped ({why}); continue with --resume")
        raise
    except BaseException as e:
        bar.close()
        for i, m in enumerate(g.members):
            _write_summary(m, histories[i], "failed", f"{type(e).__name__}: {e}", div_step[i])
        raise
    bar.close()
    out = {}
    for i, m in enumerate(g.members):
        if status[i] == "running":
            status[i] = "ok"
        out[m.name] = _write_summary(m, histories[i], status[i], messages[i], div_step[i])
        if M > 4:
            _plot(m, histories[i], "curves")
            if align is not None:
                _plot(m, histories[i], "alignment")
        if single and histories[i]:
            s = out[m.name]
            print_fn(f"summary: {_title(m)}: final test {s['final_test_acc']:.2f}% (best "
                     f"{s['best_test_acc']:.2f}% at epoch {s['best_epoch']}), {s['epochs_done']} epochs, "
                     f"{s['train_time_s']:.0f} s training -> {m.dir}")
    return out


class _Aligner:
    """EP-vs-BPTT alignment of every member on a fixed probe batch (`align_batch`
    training examples, a seeded choice shared by the members: `subset_seed`)."""

    def __init__(self, g: Group, x, y, state):
        cfg = g.cfg
        n = x.shape[0]
        probe = ep_jax.data.subset_indices(jax.random.fold_in(jax.random.PRNGKey(cfg.subset_seed), 2), n,
                                           min(cfg.align_batch, n))
        xp, yp = x[jnp.asarray(probe)], y[jnp.asarray(probe)]
        self.names = ep_jax.alignment.leaf_names(S.take(state.train.params, 0))
        fn = lambda tr, r: ep_jax.alignment.measure(g.model, g.est, tr.params, tr.buffers, xp, yp, r)
        self.fn = jax.jit(jax.vmap(fn))

    def measure(self, state, rx, members) -> dict:
        a = jax.device_get(self.fn(*dist.host((state.train, rx))))
        steps = np.asarray(state.train.step)
        out = {}
        for i in members:
            leaf = lambda f: {n: float(np.asarray(v)[i]) for n, v in zip(self.names, f)}
            out[i] = {"step": int(steps[i]), "angle": float(np.asarray(a.angle)[i]), "cosine": leaf(a.cosine),
                      "rel_rmse": leaf(a.rel_rmse), "sign_agree": leaf(a.sign_agree)}
        return out


def _plot(m: Member, history: list, which: str):
    if dist.is_main():
        (figures.learning_curve if which == "curves" else figures.alignment)(m.dir, history, _title(m))


def _save(m: Member, state, rx, i: int, epoch: int, history: list):
    if not dist.is_main():
        return
    state, rx = dist.host((state, rx))
    meta = {"epoch": epoch, "digest": m.cfg.digest(), "name": m.name, "history": history,
            "ep_jax": "0.2.0", "backend": jax.default_backend()}
    ckpt.save(m.dir / CHECKPOINT, _member_tree(state, rx, i), meta)


def _evaluate(g: Group, state, x, y, rx, batch: int):
    """Per-member test accuracy (fraction) and mean loss."""
    if dist.active():
        return dist.evaluate(g, state, x, y, rx, batch)
    correct = np.zeros(g.M)
    loss = np.zeros(g.M)
    n = x.shape[0]
    for i in range(0, n, batch):
        ev = S.sweep_evaluate(g.model, g.est, state, x[i:i + batch], y[i:i + batch], rx)
        correct += np.asarray(ev.correct)
        loss += np.asarray(ev.loss) * min(batch, n - i)
    return correct / n, loss / n


# --- restoring a finished run (analysis tools) ------------------------------------------

def load_run(run_dir: Path):
    """`(cfg, model, est, params, buffers, rx, meta)` of a run folder's checkpoint."""
    from ep_jax.experiments.config import validate
    run_dir = Path(run_dir)
    saved = read_json(run_dir / "config.json")
    if saved is None:
        raise RunError(f"{run_dir}: no config.json (not a run folder)")
    cfg = validate(RunConfig.from_dict(saved, where=f"{run_dir}/config.json: "))
    g = Group([Member(cfg, run_dir.name, run_dir)])
    with _x64(cfg):
        state, rx = g.initial()
        meta, tree = ckpt.load(run_dir / CHECKPOINT, _member_tree(state, rx, 0))
    tr = tree["sweep"].train
    return cfg, g.model, g.est, tr.params, tr.buffers, tree["relaxation"], meta
