"""The experiment engine (experiments.engine) through its commands: one run is a sweep of
one; run folders are never destroyed; a summary on every exit path.

Most runs use `exp_helpers.TINY` (synthetic data, compiled once per process); the
interrupt/kill tests that need a second process are in test_interrupt.py, the
checkpoint format in test_checkpoint.py, bad input in test_cli_errors.py.
"""

import contextlib
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from exp_helpers import (
    ROOT,
    SPE,
    TINY,
    TINY_REM,
    assert_one_line_error,
    assert_same_arrays,
    checkpoint_arrays,
    max_abs_diff,
    metrics,
    run_cli,
    snapshot,
    strip_time,
    summary,
    tiny,
    tiny_args,
)

import ep_jax
from ep_jax import sweep as S
from experiments import checkpoint as ckpt
from experiments import engine, sweep, train
from experiments.config import RunConfig

QUIET = dict(progress=False, print_fn=lambda *a: None)


def toml_spec(path: Path, base: dict, members: list[dict] = (), grid: dict | None = None, name="spec") -> Path:
    lines = [f'name = "{name}"', "[base]"] + [f"{k} = {json.dumps(v)}" for k, v in base.items()]
    if grid:
        lines += ["[grid]"] + [f"{k} = {json.dumps(v)}" for k, v in grid.items()]
    for m in members:
        lines += ["[[members]]"] + [f"{k} = {json.dumps(v)}" for k, v in m.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- 1. one seed, one set of numbers: train, sweep member, plain loop ----------------------------


def x64(cfg):
    return jax.enable_x64(True) if cfg.float64 else contextlib.nullcontext()


def plain_loop(cfg, epochs):
    """`cfg` trained by a plain loop over the (jitted) core `train_step`, from the engine's
    documented keys, data order and builders. Returns (state, rx, per-epoch train rows)."""
    with x64(cfg):
        return _plain_loop(cfg, epochs)


def _plain_loop(cfg, epochs):
    k = engine.keys(cfg)
    # the documented derivation: init, dt, step, data = split(PRNGKey(seed), 4)
    for name, key in zip(("init", "dt", "step", "data"), jax.random.split(jax.random.PRNGKey(cfg.seed), 4)):
        np.testing.assert_array_equal(k[name], key)
    model, est = engine.build_model(cfg), engine.build_estimator(cfg)
    opt = engine.build_optimizer(cfg, model)
    state = ep_jax.init_state(model, est, opt, k["init"], **engine.model_settings(cfg))
    state = state._replace(
        opt_state=ep_jax.optim.with_hyperparams(state.opt_state, **engine.opt_hyperparams(cfg, model))
    )
    rx = engine.build_relaxation(cfg, model)
    # the data, built here from its definition (no subset: every example, in order)
    ds = ep_jax.synthetic.make_synthetic(
        jax.random.PRNGKey(cfg.subset_seed),
        n_features=cfg.sizes[0],
        n_classes=cfg.sizes[-1],
        n_train=cfg.synthetic_train,
        n_test=cfg.synthetic_test,
        noise=cfg.synthetic_noise,
    )
    dtype = ep_jax.models.base.default_float()
    x, y = ds.x_train.astype(dtype), ds.y_train
    n = len(y)
    step = jax.jit(ep_jax.train_step, static_argnums=(0, 1, 2))
    rows = []
    for epoch in range(1, epochs + 1):
        full, rest = engine.epoch_batches(cfg, epoch, n)
        assert full.shape == (n // cfg.batch_size, cfg.batch_size) and rest.shape == (n % cfg.batch_size,)
        np.testing.assert_array_equal(np.sort(np.concatenate([full.ravel(), rest])), np.arange(n))
        correct = 0
        for idx in list(full) + ([rest] if len(rest) else []):
            state, info = step(
                model,
                est,
                opt,
                ep_jax.step_key(k["step"], state.step),
                state,
                jnp.asarray(x[idx]),
                jnp.asarray(y[idx]),
                rx,
            )
            assert bool(info.finite)
            correct += int(info.correct)
        ev = ep_jax.evaluate_jit(
            model, est, state.params, state.buffers, jnp.asarray(ds.x_test, dtype), jnp.asarray(ds.y_test), rx
        )
        rows.append(
            {
                "epoch": epoch,
                "train_acc": 100.0 * correct / n,
                "test_acc": 100.0 * int(ev.correct) / len(ds.y_test),
                "steps": int(state.step),
            }
        )
    return state, rx, rows


def stored_member(run_dir, state, rx, cfg):
    """The checkpoint of `run_dir` restored into the structure of a plain loop's state."""
    template = {
        "sweep": S.SweepState(state, engine.keys(cfg)["step"], jnp.bool_(True), jnp.int32(-1)),
        "relaxation": rx,
    }
    meta, sd = ckpt.decode((Path(run_dir) / engine.CHECKPOINT).read_bytes())
    with x64(cfg):
        return meta, ckpt.restore(template, sd)


# Measured on CPU (jax 0.10.2, 2 cores), max |Δparam| after 14 steps over seeds 0-3:
#   float32: train vs plain loop and train vs sweep member up to 1.5e-7 (EP) / 3e-8
#            (dendritic); some 10-60 % of the weights differ in the last bits. For the EP
#            model the plain loop and the 3-member sweep agree bit for bit, the sweep of
#            one (train) is the odd one out: XLA compiles the member axis of size 1 away.
#   float64: the same comparisons differ by <= 2.2e-16: float rounding, not a different
#            computation (a wrong key or data order moves params by ~1e-2).
# So the three paths are asserted equal within these float tolerances, and bitwise where
# the program is the same (the same run twice, resume vs straight, member order).
TOL = {False: 1e-6, True: 1e-13}


@pytest.mark.parametrize("float64", [False, True], ids=["float32", "float64"])
def test_train_sweep_member_and_plain_loop_agree(tmp_path, float64):
    # TINY_REM: every epoch has 6 full batches, scanned as chunks of 4 and 2, then a batch of 8;
    # random nudge signs make every step's key matter
    base = dict(TINY_REM, estimator="one_sided", nudge="random_sign", float64=float64)
    cfg = tiny(**base, seed=3)
    rc, _, err = run_cli(train.main, tiny_args(**base, seed=3) + ["--out", tmp_path / "train"])
    assert rc == 0, err
    # the same config as one member of a sweep, beside members with other seeds and settings
    spec = toml_spec(
        tmp_path / "s.toml",
        base,
        members=[
            {"name": "other", "seed": 0, "beta": 0.1, "lr": [0.3, 0.05]},
            {"name": "target", "seed": 3},
            {"name": "third", "seed": 7, "lr": 0.1, "momentum": 0.5, "alpha": 0.4},
        ],
    )
    rc, out, err = run_cli(sweep.main, [spec, "--out", tmp_path / "sweep", "--no-progress"])
    assert rc == 0, err
    assert "3 member(s) in 1 group(s)" in out  # one vmapped program
    assert RunConfig.from_dict(json.loads((tmp_path / "sweep/target/config.json").read_text())) == cfg
    assert RunConfig.from_dict(json.loads((tmp_path / "train/config.json").read_text())) == cfg

    state, rx, rows = plain_loop(cfg, cfg.epochs)
    assert int(state.step) == 2 * 7
    meta_t, stored_t = stored_member(tmp_path / "train", state, rx, cfg)
    meta_s, stored_s = stored_member(tmp_path / "sweep/target", state, rx, cfg)
    assert meta_t["epoch"] == meta_s["epoch"] == cfg.epochs
    want_dtype = np.dtype(np.float64 if float64 else np.float32)
    assert {np.asarray(l).dtype for l in jax.tree.leaves(stored_t["sweep"].train.params)} == {want_dtype}
    assert np.asarray(stored_t["sweep"].train.opt_state.hyperparams["lr"]).dtype == want_dtype

    loop = {"sweep": S.SweepState(state, engine.keys(cfg)["step"], jnp.bool_(True), jnp.int32(-1)), "relaxation": rx}
    diffs = {
        "train vs loop": max_abs_diff(stored_t["sweep"].train, loop["sweep"].train),
        "sweep vs loop": max_abs_diff(stored_s["sweep"].train, loop["sweep"].train),
        "train vs sweep": max_abs_diff(stored_t["sweep"].train, stored_s["sweep"].train),
    }
    print({k: f"{v:.3g}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL[float64], diffs
    # what is not computed (masks, settings, keys, relaxation, step counters) is identical
    for stored in (stored_t, stored_s):
        assert_trees_equal(stored["sweep"].train.buffers, state.buffers)
        assert_trees_equal(stored["relaxation"], rx)
        assert_trees_equal(
            (stored["sweep"].key, stored["sweep"].alive, stored["sweep"].diverged_step, stored["sweep"].train.step),
            (loop["sweep"].key, True, -1, state.step),
        )
    # the epochs' numbers: accuracies (counts) identical on all three paths
    got, ms = metrics(tmp_path / "train"), metrics(tmp_path / "sweep/target")
    assert got == meta_t["history"] and ms == meta_s["history"]
    for a, b, want in zip(got, ms, rows, strict=True):
        assert {k: a[k] for k in want} == want and {k: b[k] for k in want} == want
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # the other members really are other runs
    other = engine.load_run(tmp_path / "sweep/other")[3]
    assert max_abs_diff(other, stored_t["sweep"].train.params) > 1e-3


def test_sweep_member_order_does_not_matter(tmp_path):
    """The same members in another order: each member's checkpoint bit for bit."""
    members = [{"name": "p", "seed": 0, "beta": 0.1}, {"name": "q", "seed": 3}, {"name": "r", "seed": 7, "lr": 0.1}]
    for tag, ms in (("fwd", members), ("rev", members[::-1])):
        rc, _, err = run_cli(
            sweep.main, [toml_spec(tmp_path / f"{tag}.toml", TINY, ms), "--out", tmp_path / tag, "--no-progress"]
        )
        assert rc == 0, err
    for m in members:
        a, b = tmp_path / "fwd" / m["name"], tmp_path / "rev" / m["name"]
        assert strip_time(metrics(a)) == strip_time(metrics(b))
        assert_same_arrays(checkpoint_arrays(a)[1], checkpoint_arrays(b)[1])


def assert_trees_equal(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_epoch_order_and_keys_depend_on_seed_and_epoch():
    a, b = tiny(seed=0), tiny(seed=1)
    fa1, ra1 = engine.epoch_batches(a, 1, 200)
    fa2, _ = engine.epoch_batches(a, 2, 200)
    fb1, _ = engine.epoch_batches(b, 1, 200)
    assert fa1.shape == (6, 32) and ra1.shape == (8,)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(engine.keys(a)["data"], 1), 200))
    np.testing.assert_array_equal(np.concatenate([fa1.ravel(), ra1]), perm)  # the documented order
    assert not np.array_equal(fa1, fa2) and not np.array_equal(fa1, fb1)
    # numeric settings other than the seed do not change the order (only seeds pick data)
    np.testing.assert_array_equal(engine.epoch_batches(tiny(seed=0, beta=0.3, lr=0.5), 1, 200)[0], fa1)
    ka, kb = engine.keys(a), engine.keys(b)
    assert len({tuple(np.asarray(v).tolist()) for v in list(ka.values()) + list(kb.values())}) == 8


# --- 3. run folders are never destroyed ------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished TINY run (seed 0, 2 epochs) and one of seed 1; tests work on copies."""
    root = tmp_path_factory.mktemp("finished")
    for seed in (0, 1):
        rc, _, err = run_cli(train.main, tiny_args(seed=seed) + ["--out", root / f"seed{seed}"])
        assert rc == 0, err
    return root


@pytest.fixture
def run_copy(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished / "seed0", d)
    return d


def test_finished_run_folder_layout(finished):
    d = finished / "seed0"
    assert sorted(p.name for p in d.iterdir()) == [
        ".ep_jax-files.json",
        "checkpoint.msgpack",
        "config.json",
        "learning_curve.png",
        "metrics.jsonl",
        "summary.json",
    ]
    rows = metrics(d)
    assert [r["epoch"] for r in rows] == [1, 2] and [r["steps"] for r in rows] == [SPE, 2 * SPE]
    assert set(rows[0]) == {
        "epoch",
        "train_acc",
        "loss",
        "test_acc",
        "test_loss",
        "time_s",
        "steps",
        "residual_free",
        "residual_nudge",
    }
    assert all(0 <= r["residual_free"] < 1 and 0 <= r["residual_nudge"] < 1 for r in rows)
    s = summary(d)
    assert s["status"] == "ok" and s["epochs_done"] == 2 and s["final_test_acc"] == rows[-1]["test_acc"]
    assert s["best_test_acc"] == max(r["test_acc"] for r in rows)
    assert checkpoint_arrays(d)[0]["history"] == rows


def test_new_run_into_a_finished_run_refused_untouched(run_copy):
    before = snapshot(run_copy)
    for extra in ([], ["--seed", "5"], ["--epochs", "3"]):
        rc, _, err = run_cli(train.main, tiny_args() + extra + ["--out", run_copy])
        assert_one_line_error(rc, err, "already holds a run", "--resume", "--overwrite")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("mode", [[], ["--overwrite"]])
def test_invalid_config_on_existing_folder_touches_nothing(run_copy, mode):
    before = snapshot(run_copy)
    rc, _, err = run_cli(train.main, tiny_args(batch_size=0) + mode + ["--out", run_copy])
    assert_one_line_error(rc, err, "batch_size: must be >= 1, got 0")
    assert snapshot(run_copy) == before


def test_overwrite_with_unloadable_data_touches_nothing(run_copy, tmp_path):
    """--overwrite deletes only after the config and the data were read without error."""
    before = snapshot(run_copy)
    rc, _, err = run_cli(
        train.main,
        [
            "--preset",
            "fmnist-dep-1h",
            "--data-dir",
            tmp_path / "nowhere",
            "--overwrite",
            "--out",
            run_copy,
            "--no-progress",
        ],
    )
    assert_one_line_error(rc, err, "not found", str(tmp_path / "nowhere"))
    assert snapshot(run_copy) == before


def test_resume_without_checkpoint_refused_untouched(run_copy):
    (run_copy / "checkpoint.msgpack").unlink()
    before = snapshot(run_copy)
    rc, _, err = run_cli(train.main, ["--resume", "--out", run_copy, "--epochs", "3"])
    assert_one_line_error(rc, err, "no checkpoint to resume from")
    assert snapshot(run_copy) == before
    # an old pickle checkpoint is not a checkpoint either (it is never opened)
    (run_copy / "checkpoint.pkl").write_bytes(b"\x80\x04K\x01.")
    rc, _, err = run_cli(train.main, ["--resume", "--out", run_copy])
    assert_one_line_error(rc, err, "no checkpoint to resume from")


def test_resume_with_another_runs_checkpoint_refused_untouched(run_copy, finished):
    shutil.copy(finished / "seed1" / "checkpoint.msgpack", run_copy / "checkpoint.msgpack")
    before = snapshot(run_copy)
    rc, _, err = run_cli(train.main, ["--resume", "--out", run_copy, "--epochs", "3"])
    assert_one_line_error(rc, err, "belongs to another config")
    assert snapshot(run_copy) == before
    # a config.json edited after the run: its checkpoint no longer matches it
    shutil.copy(finished / "seed0" / "checkpoint.msgpack", run_copy / "checkpoint.msgpack")
    cfg = json.loads((run_copy / "config.json").read_text())
    (run_copy / "config.json").write_text(json.dumps({**cfg, "beta": 0.3}))
    before = snapshot(run_copy)
    rc, _, err = run_cli(train.main, ["--resume", "--out", run_copy, "--epochs", "3"])
    # (the message cannot name the field: the checkpoint holds the config's digest only)
    assert_one_line_error(rc, err, "belongs to another config")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize(
    "extra,flag",
    [
        (["--set", "beta=0.3"], "--set"),
        (["--seed", "4"], "--seed"),
        (["--preset", "mnist-dep"], "--preset"),
        (["--subset", "100"], "--subset"),
        (["--test-subset", "32"], "--test-subset"),
        (["--overwrite"], "not allowed with argument"),
    ],
)
def test_resume_refuses_other_settings(run_copy, extra, flag):
    before = snapshot(run_copy)
    rc, _, err = run_cli(train.main, ["--resume", "--out", run_copy] + extra)
    assert rc == 2, err
    assert flag in err and "Traceback" not in err
    assert snapshot(run_copy) == before


def test_resume_fewer_epochs_than_done_refused(run_copy):
    before = snapshot(run_copy)
    rc, _, err = run_cli(train.main, ["--resume", "--out", run_copy, "--epochs", "1"])
    assert_one_line_error(rc, err, "already trained 2 epochs")
    assert snapshot(run_copy) == before


def test_resume_extends_equal_to_uninterrupted(run_copy, tmp_path):
    old_lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    rc, out, err = run_cli(train.main, ["--resume", "--out", run_copy, "--epochs", "3", "--no-progress"])
    assert rc == 0, err
    new_lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    assert new_lines[:2] == old_lines and len(new_lines) == 3  # history kept byte for byte
    assert json.loads((run_copy / "config.json").read_text())["epochs"] == 3
    rc, _, err = run_cli(train.main, tiny_args(epochs=3) + ["--out", tmp_path / "straight"])
    assert rc == 0, err
    assert strip_time(metrics(run_copy)) == strip_time(metrics(tmp_path / "straight"))
    assert_same_arrays(checkpoint_arrays(run_copy)[1], checkpoint_arrays(tmp_path / "straight")[1])
    assert summary(run_copy)["status"] == "ok" and summary(run_copy)["epochs_done"] == 3
    # resuming a finished run trains nothing and changes no number
    ck = (run_copy / "checkpoint.msgpack").read_bytes()
    m = (run_copy / "metrics.jsonl").read_bytes()
    rc, out, err = run_cli(train.main, ["--resume", "--out", run_copy, "--no-progress"])
    assert rc == 0, err
    assert (run_copy / "checkpoint.msgpack").read_bytes() == ck and (run_copy / "metrics.jsonl").read_bytes() == m


def test_overwrite_replaces(run_copy):
    # a file an older run wrote (its alignment figure; the new run draws none) goes; a user's
    # file would be refused (tests/test_hostile_outputs.py)
    (run_copy / "alignment.png").write_text("from an older run")
    rc, _, err = run_cli(train.main, tiny_args(seed=5, epochs=1) + ["--overwrite", "--out", run_copy])
    assert rc == 0, err
    assert not (run_copy / "alignment.png").exists()
    assert json.loads((run_copy / "config.json").read_text())["seed"] == 5
    assert [r["epoch"] for r in metrics(run_copy)] == [1]
    assert checkpoint_arrays(run_copy)[0]["epoch"] == 1


class Crash(BaseException):
    """A process dying between two writes (not an Exception: nothing may swallow it)."""


def test_metrics_equal_checkpoint_history_after_crash_between_writes(tmp_path, monkeypatch):
    real_save = engine._save

    def save_then_die(m, state, rx, i, epoch, history):
        real_save(m, state, rx, i, epoch, history)
        if epoch == 2:
            raise Crash("killed after the checkpoint write, before the metrics append")

    monkeypatch.setattr(engine, "_save", save_then_die)
    d = tmp_path / "crash"
    with pytest.raises(Crash):
        run_cli(train.main, tiny_args(epochs=3) + ["--out", d])
    meta, _ = checkpoint_arrays(d)
    assert meta["epoch"] == 2 and len(meta["history"]) == 2
    assert [r["epoch"] for r in metrics(d)] == [1]  # the append never happened
    assert summary(d)["status"] == "failed" and "Crash" in summary(d)["message"]
    monkeypatch.setattr(engine, "_save", real_save)

    rc, _, err = run_cli(train.main, ["--resume", "--out", d, "--no-progress"])
    assert rc == 0, err
    meta, arrays = checkpoint_arrays(d)
    assert metrics(d) == meta["history"] and [r["epoch"] for r in metrics(d)] == [1, 2, 3]
    rc, _, err = run_cli(train.main, tiny_args(epochs=3) + ["--out", tmp_path / "straight"])
    assert rc == 0, err
    assert strip_time(metrics(d)) == strip_time(metrics(tmp_path / "straight"))
    assert_same_arrays(arrays, checkpoint_arrays(tmp_path / "straight")[1])


# --- 5. a summary on every exit path (in-process paths; signals in test_interrupt.py) -------------


def test_summary_ok_with_one_learning_rate(tmp_path):
    """`lr=0.2` (one float for every synapse) is accepted and trains."""
    rc, out, err = run_cli(train.main, tiny_args(lr=0.2, epochs=3) + ["--out", tmp_path / "r"])
    assert rc == 0, err
    s = summary(tmp_path / "r")
    rows = metrics(tmp_path / "r")
    assert s["status"] == "ok" and s["message"] == "" and s["epochs_done"] == 3 and s["diverged_step"] is None
    assert s["final_test_acc"] == rows[-1]["test_acc"] and s["final_train_acc"] == rows[-1]["train_acc"]
    best = max(rows, key=lambda r: r["test_acc"])
    assert (s["best_test_acc"], s["best_epoch"]) == (best["test_acc"], best["epoch"])
    assert s["train_time_s"] == pytest.approx(sum(r["time_s"] for r in rows))
    assert json.loads((tmp_path / "r/config.json").read_text())["lr"] == 0.2
    assert "summary:" in out and "final test" in out


DIVERGE = dict(TINY, model="ep", activation="identity", epochs=5)
# Linear units: a larger rate grows the weights until the relaxation is unstable and the
# free state passes max_state (1e4). On this data (CPU scan of rates): 0.05 and 0.1
# train; 0.15 diverges at step 12, 0.14 at step 14 (epoch 3 of 6 steps each; 0.16 would
# at step 6, 0.18 at step 5). Divergence in epoch >= 2 makes "the last good checkpoint"
# a trained state, not the initial one.
DIVERGE_LRS = {"ok-a": 0.05, "boom-a": 0.15, "ok-b": 0.1, "boom-b": 0.14}


def test_diverging_member_frozen_others_continue(tmp_path):
    spec = toml_spec(tmp_path / "d.toml", DIVERGE, members=[{"name": n, "lr": lr} for n, lr in DIVERGE_LRS.items()])
    rc, out, err = run_cli(sweep.main, [spec, "--out", tmp_path / "sw", "--no-progress"])
    assert rc == 0, err  # diverged members are a result, not a failure
    late = []
    for name in DIVERGE_LRS:
        d = tmp_path / "sw" / name
        s = summary(d)
        meta, _ = checkpoint_arrays(d)
        rows = metrics(d)
        if name.startswith("ok"):
            assert s["status"] == "ok" and s["epochs_done"] == 5 and meta["epoch"] == 5
            assert s["final_test_acc"] >= 90, s  # they learn (4 classes: chance is 25 %)
            continue
        assert s["status"] == "diverged", (name, s)
        done = s["epochs_done"]
        assert f"diverged at epoch {done + 1}" in s["message"] and f"checkpoint of epoch {done} is kept" in s["message"]
        assert f"{name}: STOPPED" in out
        # frozen: nothing recorded after the divergence, the checkpoint is the last good epoch's
        assert meta["epoch"] == done == len(rows) and meta["history"] == rows
        assert s["diverged_step"] is not None and done * SPE <= s["diverged_step"] < (done + 1) * SPE
        if done >= 1:
            late.append(name)
            cfg, model, est, params, buffers, rx, meta2 = engine.load_run(d)
            assert all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree.leaves(params))
            # the stored state is the one after epoch `done` (not the initial one): equal
            # to a plain loop of that many epochs, within the vmapped-sweep tolerance
            state, _, loop_rows = plain_loop(cfg.replace(epochs=done), done)
            assert int(state.step) == done * SPE
            init = ep_jax.init_state(
                model, est, engine.build_optimizer(cfg, model), engine.keys(cfg)["init"], **engine.model_settings(cfg)
            )
            assert max_abs_diff(params, init.params) > 1e-2
            assert max_abs_diff(params, state.params) <= 1e-5
    assert late, "no member diverged in epoch >= 2: re-pick DIVERGE_LRS for this platform"
    table = (tmp_path / "sw" / "results.md").read_text()
    assert "diverged (not in the mean)" in table


def test_implicit_gradient_that_does_not_converge_is_named_so(tmp_path):
    """An implicit estimator whose free phase is far from its fixed point (2 steps of
    dt 0.1) refuses the very first step: the run stops as diverged, and the message names
    the residual against implicit_tol and what to raise, not a non-finite state."""
    spec = toml_spec(tmp_path / "i.toml", dict(TINY, estimator="implicit", t_free=2, t_nudge=1, dt=0.1))
    rc, out, err = run_cli(sweep.main, [spec, "--out", tmp_path / "sw", "--no-progress"])
    assert rc == 0, err
    (run,) = [d for d in (tmp_path / "sw").iterdir() if d.is_dir()]
    s = summary(run)
    assert s["status"] == "diverged" and s["diverged_step"] == 0, s
    assert "did not converge" in s["message"] and "implicit_tol=1e-05" in s["message"], s["message"]
    assert "raise t_free" in s["message"] and "non-finite" not in s["message"]


def test_divergence_cause_names_each_reason():
    """The loop's diagnosis reads the first refused step of the member (member 1 here;
    member 0 is fine), one reason per field of StepInfo that can refuse a step."""
    from ep_jax.experiments.loop import divergence_cause

    cfg = tiny(max_state=10.0)
    base = dict(
        loss=1.0,
        correct=0,
        accuracy=0.0,
        grad_norm=1.0,
        state_absmax=1.0,
        finite=True,
        beta=0.2,
        residual_free=1e-7,
        residual_nudge=1e-7,
    )

    def chunk(**bad):
        rows = [dict(base), {**base, "finite": False, **bad}]
        return [ep_jax.StepInfo(**{k: np.array([[base[k], r[k]] for r in rows]) for k in base})]

    assert "free state or the loss is not finite" in divergence_cause(cfg, chunk(state_absmax=np.inf), 1)
    assert "above max_state=10" in divergence_cause(cfg, chunk(state_absmax=11.0), 1)
    assert "non-finite gradient" in divergence_cause(cfg, chunk(grad_norm=np.nan), 1)
    assert "learning rate too large" in divergence_cause(cfg, chunk(), 1)
    icfg = tiny(estimator="implicit", implicit_tol=1e-6)
    assert "relative residual 0.001 > implicit_tol=1e-06" in divergence_cause(
        icfg, chunk(residual_free=1e-3, grad_norm=np.nan), 1
    )
    # the first refused step counts, in a later chunk too
    assert "above max_state" in divergence_cause(cfg, chunk(finite=True) + chunk(state_absmax=50.0), 1)


def test_time_budget_interrupts_with_summary_then_resume(tmp_path):
    d = tmp_path / "r"
    m = engine.Member(tiny(epochs=3), "r", d)
    with pytest.raises(engine.Interrupted):
        engine.run([m], "new", deadline=time.time() - 1, **QUIET)
    s = summary(d)
    assert s["status"] == "interrupted" and "time budget" in s["message"] and s["epochs_done"] == 0
    assert checkpoint_arrays(d)[0]["epoch"] == 0  # the initial state, resumable
    (s2,) = engine.run([m], "resume", **QUIET)
    assert s2["status"] == "ok" and s2["epochs_done"] == 3
    (ref,) = engine.run([engine.Member(tiny(epochs=3), "ref", tmp_path / "ref")], "new", **QUIET)
    assert strip_time(metrics(d)) == strip_time(metrics(tmp_path / "ref"))
    assert_same_arrays(checkpoint_arrays(d)[1], checkpoint_arrays(tmp_path / "ref")[1])


def test_summary_written_when_training_fails(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(S, "sweep_steps_jit", broken)
    d = tmp_path / "r"
    with pytest.raises(RuntimeError, match="device lost"):
        engine.run([engine.Member(tiny(), "r", d)], "new", **QUIET)
    s = summary(d)
    assert s["status"] == "failed" and s["message"] == "RuntimeError: device lost"
    assert checkpoint_arrays(d)[0]["epoch"] == 0 and metrics(d) == []


def test_synthetic_data_is_the_same_with_and_without_x64():
    """A float64 run trains on the same data as its float32 twin (was: other draws under
    x64, and the engine's data cache handed out whichever was made first)."""
    a = ep_jax.synthetic.make_synthetic(jax.random.PRNGKey(1), 16, 4, 50, 20)
    with jax.enable_x64(True):
        b = ep_jax.synthetic.make_synthetic(jax.random.PRNGKey(1), 16, 4, 50, 20)
    for u, v in zip(a[1:], b[1:], strict=True):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(u, v)


# --- 8. analysis commands write under runs/ (or --out), never into the source tree -----------------


def untrained_run(d, **changes):
    """A run folder holding the initial checkpoint only (the time budget stops it at once)."""
    with pytest.raises(engine.Interrupted):
        engine.run([engine.Member(tiny(**changes), d.name, d)], "new", deadline=time.time() - 1, **QUIET)
    return d


def test_hidden_states_writes_under_runs_by_default(tmp_path, monkeypatch):
    from experiments import hidden_states

    ep = untrained_run(tmp_path / "ep", model="ep")
    dep = untrained_run(tmp_path / "dep")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    source = ROOT / "experiments" / "results" / "hidden_states"
    before = snapshot(source)
    rc, out, err = run_cli(hidden_states.main, ["--ep", ep, "--dep", dep, "--examples", "16"])
    assert rc == 0, err
    assert sorted(p.name for p in (cwd / "runs" / "hidden_states").iterdir()) == [
        ".ep_jax-files.json",
        "hidden_states.json",
        "hidden_states.png",
    ]
    res = json.loads((cwd / "runs" / "hidden_states" / "hidden_states.json").read_text())
    assert set(res) == {"EP", "DEP"} and len(res["EP"]["layers"]) == 2 and len(res["EP"]["layers"][0]["mean_abs"]) == 8
    assert snapshot(source) == before and sorted(p.name for p in cwd.iterdir()) == ["runs"]
    rc, out, err = run_cli(hidden_states.main, ["--ep", ep, "--dep", dep, "--examples", "16", "--out", tmp_path / "o"])
    assert rc == 0, err
    assert (tmp_path / "o" / "hidden_states.png").is_file()


def test_plot_dt_hist_writes_under_runs_by_default(tmp_path, monkeypatch):
    from experiments import plot_dt_hist

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc, out, err = run_cli(plot_dt_hist.main, ["--n", "64"])
    assert rc == 0, err
    assert sorted(p.name for p in (cwd / "runs" / "hts").iterdir()) == [
        ".ep_jax-files.json",
        "dt_hist.json",
        "dt_hist.png",
    ]
    assert sorted(p.name for p in cwd.iterdir()) == ["runs"]
    summary_ = json.loads((cwd / "runs" / "hts" / "dt_hist.json").read_text())
    assert set(summary_) == set(ep_jax.timesteps.DISTRIBUTIONS)
    rc, out, err = run_cli(plot_dt_hist.main, ["--n", "64", "--out", tmp_path / "o"])
    assert rc == 0, err
    assert (tmp_path / "o" / "dt_hist.png").is_file()
    rc, _, err = run_cli(plot_dt_hist.main, ["--n", "0", "--out", tmp_path / "o2"])
    assert_one_line_error(rc, err, "--n must be >= 1")


# --- 9. the paper's Table 2 in one command (smoke size), resumable ---------------------------------

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (CI installs it)")
def test_reproduce_table2_smoke_end_to_end_and_rerun_trains_nothing(tmp_path, monkeypatch):
    from experiments import reproduce

    monkeypatch.delenv("EP_JAX_DATA_DIR", raising=False)
    out = tmp_path / "rep"
    argv = ["table2", "--smoke", "--seeds", "2", "--cells", "fmnist-ep", "--out", out, "--no-progress"]
    rc, text, err = run_cli(reproduce.main, argv)
    assert rc == 0, err
    assert "2 runs in 1 cells, 2 to train in 1 vmapped group(s)" in text
    for s in (0, 1):
        d = out / "fmnist-ep" / f"seed{s}"
        assert summary(d)["status"] == "ok" and summary(d)["epochs_done"] == 1
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["dataset"] == "fashion_mnist" and cfg["seed"] == s and cfg["subset"] == 512
    results = (out / "results.md").read_text()
    assert results.startswith("# table2 (smoke)")
    # a smoke run (512 examples, 1 epoch) is not the paper's cell: the paper's number is shown
    # for orientation, without a distance in published stds
    (row,) = [l for l in results.splitlines() if l.startswith("| FMNIST EP, other settings than Table 2")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["2", "0,1"] and cells[6] == "(85.27 ± 0.17: other settings)" and cells[7] == "–"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("checkpoint.msgpack")}
    assert len(before) == 2

    rc, text, err = run_cli(reproduce.main, argv)
    assert rc == 0, err
    assert "2 runs in 1 cells, 0 to train in 0 vmapped group(s)" in text
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("checkpoint.msgpack")} == before
    assert row in (out / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (CI installs it)")
def test_short_dep_run_on_real_fashion_mnist_learns(tmp_path, monkeypatch):
    """The command line end to end on real data: DEP (one hidden layer of 256, T1 = 60),
    4000 training examples, 2 epochs. Chance is 10 %."""
    monkeypatch.delenv("EP_JAX_DATA_DIR", raising=False)
    rc, out, err = run_cli(
        train.main,
        [
            "--preset",
            "fmnist-dep-1h",
            "--epochs",
            "2",
            "--subset",
            "4000",
            "--test-subset",
            "2000",
            "--out",
            tmp_path,
            "--no-progress",
        ],
    )
    assert rc == 0, err
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["sizes"] == [784, 256, 10] and cfg["dataset"] == "fashion_mnist" and cfg["subset"] == 4000
    assert summary(tmp_path)["final_test_acc"] > 65, summary(tmp_path)


def test_float32_run_stays_float32_under_global_x64(finished, tmp_path):
    """JAX_ENABLE_X64=1 (here: x64 switched on around the run) does not turn a float32
    config into a float64 run (was: float64 numbers, a config.json claiming float32, and a
    checkpoint that could not be resumed without the variable)."""
    d = tmp_path / "r"
    with jax.enable_x64(True):
        (s,) = engine.run([engine.Member(tiny(), "r", d)], "new", **QUIET)
    assert s["status"] == "ok"
    _, arrays = checkpoint_arrays(d)
    assert {str(a.dtype) for a in arrays.values()} <= {"float32", "int32", "uint32", "uint8", "bool"}
    assert strip_time(metrics(d)) == strip_time(metrics(finished / "seed0"))
    assert_same_arrays(arrays, checkpoint_arrays(finished / "seed0")[1])
    rc, _, err = run_cli(train.main, ["--resume", "--out", d, "--epochs", "3", "--no-progress"])
    assert rc == 0, err
