"""One training run: data, loop, per-epoch metrics and checkpoints, resume, divergence.

A run folder holds:
- `config.json`     the resolved config (every field, after preset and overrides);
- `metrics.jsonl`   one JSON object per epoch: epoch, train_acc (running accuracy of the
                    free phase during the epoch, %), loss (mean train loss), test_acc (%),
                    test_loss, time_s (training time of the epoch), steps;
- `checkpoint.pkl`  the state after the last completed epoch (params, masks, optimizer,
                    the dt vectors, history), written atomically;
- `learning_curve.png`, and `summary.json` (status ok / diverged / interrupted,
  final_test_acc, best_test_acc, best_epoch, epochs_done).

Resuming continues bit for bit: epoch e's data order is a function of (seed, e) only.
"""
from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ep_jax
from experiments import config as C


class Diverged(RuntimeError):
    pass


def load_data(cfg: dict, key):
    from ep_jax.data import load_dataset
    ds = load_dataset(cfg["dataset"], data_dir=cfg["data_dir"])
    xtr, ytr, xte, yte = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    k_tr, k_te = jax.random.split(key)
    if cfg["subset"]:
        idx = np.sort(np.asarray(jax.random.permutation(k_tr, len(ytr)))[: int(cfg["subset"])])
        xtr, ytr = xtr[idx], ytr[idx]
    if cfg["test_subset"]:
        idx = np.sort(np.asarray(jax.random.permutation(k_te, len(yte)))[: int(cfg["test_subset"])])
        xte, yte = xte[idx], yte[idx]
    return xtr, ytr, xte, yte


def evaluate(model, state, x, y, hyper, t_free, batch):
    """Free-phase accuracy (%) and mean loss on `(x, y)`, `batch` examples at a time."""
    correct, loss = 0, 0.0
    for i in range(0, len(y), batch):
        c, l = ep_jax.evaluate_jit(model, state.params, state.buffers, x[i:i + batch], y[i:i + batch],
                                   hyper, t_free)
        correct += int(c)
        loss += float(l) * len(y[i:i + batch])
    return 100.0 * correct / len(y), loss / len(y)


def epoch_batches(key, epoch: int, n: int, batch: int):
    """Index array `(n_full, batch)` of full batches, and the trailing partial batch."""
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
    n_full = n // batch
    return perm[: n_full * batch].reshape(n_full, batch), perm[n_full * batch:]


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(run_dir: Path, state, hyper, epoch: int, history: list):
    blob = pickle.dumps({"state": jax.device_get(state), "hyper": jax.device_get(hyper),
                         "epoch": epoch, "history": history})
    _write_atomic(run_dir / "checkpoint.pkl", blob)


def load_checkpoint(run_dir: Path):
    with open(run_dir / "checkpoint.pkl", "rb") as f:
        ck = pickle.load(f)
    return jax.tree.map(jnp.asarray, ck["state"]), jax.tree.map(jnp.asarray, ck["hyper"]), ck["epoch"], ck["history"]


def plot_curves(run_dir: Path, history: list, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ep, [h["train_acc"] for h in history], "o-", label="train (running)")
    ax.plot(ep, [h["test_acc"] for h in history], "s-", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "learning_curve.png", dpi=120)
    plt.close(fig)


def write_summary(run_dir: Path, history: list, status: str, message: str = ""):
    best = max(history, key=lambda h: h["test_acc"]) if history else None
    summary = {
        "status": status, "message": message, "epochs_done": len(history),
        "final_test_acc": history[-1]["test_acc"] if history else None,
        "best_test_acc": best["test_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "final_train_acc": history[-1]["train_acc"] if history else None,
        "train_time_s": sum(h["time_s"] for h in history),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check(metrics, cfg, epoch, step0):
    finite = np.asarray(metrics["finite"])
    absmax = np.asarray(metrics["state_absmax"])
    bad = np.flatnonzero(~finite | ~(absmax <= cfg["max_state"]))
    if bad.size:
        i = int(bad[0])
        what = ("non-finite gradients or states" if not finite[i]
                else f"state magnitude {absmax[i]:.3g} > max_state={cfg['max_state']:g}")
        raise Diverged(f"diverged at epoch {epoch}, step {step0 + i + 1}: {what}")


def train(cfg: dict, run_dir, resume: bool = False, progress: bool = True, data=None, print_fn=print):
    """Run (or resume) the experiment `cfg` in `run_dir`; returns the summary dict."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg["float64"]:
        jax.config.update("jax_enable_x64", True)
    ks = C.keys(cfg)
    model, est = C.build_model(cfg), C.build_estimator(cfg)
    xtr, ytr, xte, yte = data if data is not None else load_data(cfg, ks["subset"])
    ep_jax.estimators.check_labels(model, jnp.asarray(ytr))
    ep_jax.estimators.check_labels(model, jnp.asarray(yte))
    dtype = ep_jax.hyper.default_float()
    xtr_d, ytr_d = jnp.asarray(xtr, dtype), jnp.asarray(ytr, jnp.int32)
    xte_d, yte_d = jnp.asarray(xte, dtype), jnp.asarray(yte, jnp.int32)

    metrics_path = run_dir / "metrics.jsonl"
    if resume and (run_dir / "checkpoint.pkl").exists():
        old = json.loads((run_dir / "config.json").read_text())
        if {k: v for k, v in old.items() if k != "epochs"} != {k: v for k, v in C.to_jsonable(cfg).items() if k != "epochs"}:
            raise ValueError(f"--resume: the config differs from the one saved in {run_dir}/config.json "
                             "(only `epochs` may change)")
        state, hyper, start, history = load_checkpoint(run_dir)
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
        print_fn(f"resuming {run_dir} after epoch {start}")
    else:
        hyper = C.build_hyper(cfg, model, ks["dt"])
        state = ep_jax.init_state(model, ks["init"], hyper, est)
        start, history = 0, []
        metrics_path.write_text("")
        save_checkpoint(run_dir, state, hyper, 0, history)  # a good state exists from the start
    (run_dir / "config.json").write_text(json.dumps(C.to_jsonable(cfg), indent=2) + "\n")

    title = f"{cfg['dataset']} {cfg['model']}/{cfg['estimator']} seed {cfg['seed']}"
    B, n = cfg["batch_size"], len(ytr)
    status, message = "ok", ""
    try:
        for epoch in range(start + 1, cfg["epochs"] + 1):
            t0 = time.perf_counter()
            full, rest = epoch_batches(ks["data"], epoch, n, B)
            correct, loss_sum, seen = 0, 0.0, 0
            bar = _bar(progress, len(full) + (1 if len(rest) else 0), f"epoch {epoch}/{cfg['epochs']}")
            for c0 in range(0, len(full), cfg["chunk"]):
                idx = jnp.asarray(full[c0:c0 + cfg["chunk"]])
                new, m = ep_jax.train_steps_jit(model, est, state, xtr_d, ytr_d, idx, hyper)
                m = jax.device_get(m)
                _check(m, cfg, epoch, c0)
                state = new
                correct += int(m["correct"].sum())
                loss_sum += float((m["loss"] * B).sum())
                seen += idx.size
                bar.update(len(idx))
                bar.set_postfix(acc=f"{100 * correct / seen:.2f}%")
            if len(rest):
                new, m = ep_jax.train_step_jit(model, est, state, xtr_d[rest], ytr_d[rest], hyper)
                m = jax.tree.map(lambda a: np.asarray(a)[None], jax.device_get(m))
                _check(m, cfg, epoch, len(full))
                state = new
                correct += int(m["correct"].sum())
                loss_sum += float(m["loss"].sum() * len(rest))
                seen += len(rest)
                bar.update(1)
            bar.close()
            jax.block_until_ready(state)
            elapsed = time.perf_counter() - t0
            test_acc, test_loss = evaluate(model, state, xte_d, yte_d, hyper, est.t_free, cfg["eval_batch"])
            rec = {"epoch": epoch, "train_acc": 100.0 * correct / seen, "loss": loss_sum / seen,
                   "test_acc": test_acc, "test_loss": test_loss, "time_s": elapsed, "steps": int(state.step)}
            history.append(rec)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            save_checkpoint(run_dir, state, hyper, epoch, history)
            plot_curves(run_dir, history, title)
            print_fn(f"epoch {epoch}: train {rec['train_acc']:.2f}%  test {test_acc:.2f}%  "
                     f"loss {rec['loss']:.4f}  ({elapsed:.1f} s)")
    except Diverged as e:
        status, message = "diverged", f"{e}; the last good checkpoint (epoch {len(history)}) is kept"
        print_fn(f"STOPPED: {message}")
    except KeyboardInterrupt:
        status, message = "interrupted", f"interrupted; checkpoint of epoch {len(history)} kept, continue with --resume"
        print_fn(message)
    summary = write_summary(run_dir, history, status, message)
    if history:
        print_fn(f"summary: {title}: final test {summary['final_test_acc']:.2f}% (best "
                 f"{summary['best_test_acc']:.2f}% at epoch {summary['best_epoch']}), "
                 f"{summary['epochs_done']} epochs, {summary['train_time_s']:.0f} s training -> {run_dir}")
    return summary


def _bar(enabled, total, desc):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=not enabled)
