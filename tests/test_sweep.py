"""Vmapped sweeps (ep_jax.sweep) and the sweep command's spec format (experiments.sweep).

The reference for every member is the same network trained alone: `init_state` from the
member's init key and settings, its optimiser hyperparameters, and the core
`train_step` with key `step_key(member's step key, t)`.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from exp_helpers import (
    ROOT,
    TINY,
    assert_one_line_error,
    assert_same_arrays,
    checkpoint_arrays,
    metrics,
    run_cli,
    strip_time,
    summary,
)

import ep_jax
from ep_jax import sweep as S
from ep_jax.optim import with_hyperparams
from experiments import sweep as cmd
from experiments.config import RunConfig

SIZES = (10, 8, 4)


def batches(n_steps, batch=8, seed=0, n_in=10, n_classes=4):
    out = []
    for t in range(n_steps):
        kx, ky = jax.random.split(jax.random.PRNGKey(1000 * seed + t))
        out.append((jax.random.uniform(kx, (batch, n_in)), jax.random.randint(ky, (batch,), 0, n_classes)))
    return out


_OPT = {}


def optimizer(model):
    """One optimiser object per model: the compiled steps (opt is static) are reused
    across tests. Every member sets its own rates (opt_hyperparams)."""
    if model not in _OPT:
        _OPT[model] = ep_jax.optim.sgd(model, lr=[0.1, 0.1], momentum=0.9)
    return _OPT[model]


class Members:
    """M members of one static structure: keys, model settings, rates, relaxations."""

    def __init__(
        self, model_kind="ep", est=None, M=3, model_kw=None, lrs=None, momenta=None, betas=None, dts=None, settings=None
    ):
        self.model = ep_jax.build_model(model_kind, sizes=SIZES, **(model_kw or {}))
        self.est = est or ep_jax.Estimator("symmetric", t_free=12, t_nudge=4)
        self.opt = optimizer(self.model)
        self.M = M
        self.init_keys = [jax.random.PRNGKey(10 + i) for i in range(M)]
        self.step_keys = [jax.random.PRNGKey(100 + i) for i in range(M)]
        name = "alpha" if model_kind == "dendritic" else "gamma"
        default = [0.2, 0.5, 0.3][:M] if name == "alpha" else [1.0] * M
        self.settings = settings if settings is not None else {name: default}
        self.lrs = np.asarray(lrs if lrs is not None else [[0.2, 0.05], [0.1, 0.1], [0.05, 0.3]][:M], np.float32)
        self.momenta = np.asarray(momenta if momenta is not None else [0.9, 0.5, 0.0][:M], np.float32)
        betas = betas if betas is not None else [0.1, 0.3, 0.2][:M]
        dts = dts if dts is not None else [1.0, [np.linspace(0.3, 1.0, 8), 0.7], 0.6][:M]
        self.rxs = [ep_jax.make_relaxation(self.model, beta=b, dt=d) for b, d in zip(betas, dts)]

    def sweep(self):
        state = S.init_sweep(
            self.model,
            self.est,
            self.opt,
            self.init_keys,
            self.step_keys,
            settings={k: jnp.asarray(v) for k, v in self.settings.items()},
            opt_hyperparams={"lr": self.lrs, "momentum": self.momenta},
        )
        return state, S.stack_relaxations(self.model, self.rxs)

    def solo(self, i, data):
        """Member i trained alone; returns (state, [StepInfo])."""
        st = ep_jax.init_state(
            self.model, self.est, self.opt, self.init_keys[i], **{k: v[i] for k, v in self.settings.items()}
        )
        st = st._replace(opt_state=with_hyperparams(st.opt_state, lr=self.lrs[i], momentum=self.momenta[i]))
        infos = []
        for x, y in data:
            key = ep_jax.step_key(self.step_keys[i], st.step)
            st, info = ep_jax.train_step_jit(self.model, self.est, self.opt, key, st, x, y, self.rxs[i])
            infos.append(info)
        return st, infos


def close(a, b, rtol=2e-5, atol=1e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


CASES = {
    "ep-symmetric": ("ep", ep_jax.Estimator("symmetric", 12, 4)),
    "dendritic-symmetric": ("dendritic", ep_jax.Estimator("symmetric", 12, 4)),
    "dendritic-one_sided-random_sign": ("dendritic", ep_jax.Estimator("one_sided", 12, 4, nudge="random_sign")),
    "ep-chl-random_sign": ("ep", ep_jax.Estimator("chl", 12, 4, nudge="random_sign")),
    "dendritic-bptt": ("dendritic", ep_jax.Estimator("bptt", 12, 4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_members_equal_solo_runs(case):
    kind, est = CASES[case]
    ms = Members(kind, est)
    data = batches(4)
    state, rx = ms.sweep()
    infos = []
    for x, y in data:
        state, info = S.sweep_step(ms.model, est, ms.opt, state, x, y, rx)
        infos.append(info)
    assert np.asarray(state.alive).all() and (np.asarray(state.train.step) == 4).all()
    for i in range(ms.M):
        solo, solo_infos = ms.solo(i, data)
        close(S.take(state.train.params, i), solo.params)
        close(S.take(state.train.opt_state, i), solo.opt_state)
        for u, v in zip(jax.tree.leaves(S.take(state.train.buffers, i)), jax.tree.leaves(solo.buffers)):
            np.testing.assert_array_equal(u, v)  # masks, settings: exact
        for t in range(len(data)):
            for f in ("loss", "correct", "grad_norm", "beta"):
                np.testing.assert_allclose(
                    getattr(infos[t], f)[i], getattr(solo_infos[t], f), rtol=2e-5, err_msg=f"{f} step {t}"
                )
    w = np.asarray(jax.tree.leaves(state.train.params)[0])
    assert not np.allclose(w[0], w[1])  # really different members


def test_random_sign_follows_the_step_keys():
    est = ep_jax.Estimator("one_sided", 12, 4, nudge="random_sign")
    ms = Members("ep", est, betas=[0.2, 0.2, 0.2], dts=[1.0, 1.0, 1.0])
    state, rx = ms.sweep()
    data = batches(8)
    betas = []
    for x, y in data:
        state, info = S.sweep_step(ms.model, est, ms.opt, state, x, y, rx)
        betas.append(np.asarray(info.beta))
    betas = np.array(betas)  # (steps, M)
    for i in range(ms.M):
        signs = [float(jax.random.rademacher(ep_jax.step_key(ms.step_keys[i], t), (), jnp.float32)) for t in range(8)]
        np.testing.assert_allclose(betas[:, i], 0.2 * np.array(signs), rtol=1e-6)
    assert set(np.sign(betas).ravel()) == {-1.0, 1.0}
    assert not all(np.array_equal(betas[:, 0], betas[:, i]) for i in (1, 2))  # each member its own signs
    # the same members with a fixed nudge: other updates (the sign is the only difference)
    fixed = Members("ep", ep_jax.Estimator("one_sided", 12, 4), betas=[0.2] * 3, dts=[1.0] * 3)
    fs, frx = fixed.sweep()
    for x, y in data:
        fs, finfo = S.sweep_step(fixed.model, fixed.est, fixed.opt, fs, x, y, frx)
    np.testing.assert_allclose(np.asarray(finfo.beta), 0.2)
    assert not np.allclose(jax.tree.leaves(fs.train.params)[0], jax.tree.leaves(state.train.params)[0])


LEAKY = dict(activation="leaky_relu", output_activation="sigmoid")


def test_diverging_member_is_isolated():
    ms = Members("ep", model_kw=LEAKY, lrs=[[0.1, 0.1], [1e30, 1e30], [0.05, 0.05]], dts=[0.5] * 3)
    state, rx = ms.sweep()
    data = batches(6)
    finite = []
    for x, y in data:
        state, info = S.sweep_step(ms.model, ms.est, ms.opt, state, x, y, rx)
        finite.append(np.asarray(info.finite))
    finite = np.array(finite)
    assert not finite[:, 1].all(), "the huge-rate member should produce a non-finite step"
    first_bad = int(np.argmin(finite[:, 1]))
    assert not finite[first_bad:, 1].any()  # frozen: never finite again
    assert np.asarray(state.alive).tolist() == [True, False, True]
    assert np.asarray(state.diverged_step).tolist() == [-1, first_bad, -1]
    assert int(state.train.step[1]) == first_bad
    assert all(np.isfinite(np.asarray(l)[1]).all() for l in jax.tree.leaves(state.train.params))
    for i in (0, 2):
        solo, _ = ms.solo(i, data)
        close(S.take(state.train.params, i), solo.params)


def test_member_stays_frozen_after_a_transient_non_finite_step():
    """One NaN batch for member 0: the core step alone would skip it and go on; in a sweep
    the member is frozen for good (its state as before that step), member 1 unaffected."""
    ms = Members("ep", M=2)
    state, rx = ms.sweep()
    data = batches(5)
    for t, (x, y) in enumerate(data):
        x0 = x.at[0, 0].set(jnp.nan) if t == 2 else x
        state, info = S.sweep_step(ms.model, ms.est, ms.opt, state, jnp.stack([x0, x]), jnp.stack([y, y]), rx)
        if t == 1:
            before = S.take(state.train, 0)
        if t >= 2:
            assert np.asarray(info.finite).tolist() == [False, True]
    assert np.asarray(state.alive).tolist() == [False, True] and int(state.diverged_step[0]) == 2
    for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(S.take(state.train, 0)), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    solo, _ = ms.solo(1, data)
    close(S.take(state.train.params, 1), solo.params)
    # the core step alone skips only the bad step
    alone, infos = ms.solo(0, [(x.at[0, 0].set(jnp.nan) if t == 2 else x, y) for t, (x, y) in enumerate(data)])
    assert [bool(i.finite) for i in infos] == [True, True, False, True, True] and int(alone.step) == 4


def test_per_member_batches():
    ms = Members("ep", M=2)
    state, rx = ms.sweep()
    d0, d1 = batches(2, seed=0), batches(2, seed=1)
    for (x0, y0), (x1, y1) in zip(d0, d1):
        state, _ = S.sweep_step(ms.model, ms.est, ms.opt, state, jnp.stack([x0, x1]), jnp.stack([y0, y1]), rx)
    for i, d in enumerate((d0, d1)):
        solo, _ = ms.solo(i, d)
        close(S.take(state.train.params, i), solo.params)


def test_chunked_sweep_step_equals_vmapped():
    ms = Members("ep")
    a, rx = ms.sweep()
    b = a
    for x, y in batches(2):
        a, ia = S.sweep_step(ms.model, ms.est, ms.opt, a, x, y, rx)
        b, ib = S.sweep_step(ms.model, ms.est, ms.opt, b, x, y, rx, 2)  # chunks of 2 and 1
    close(a.train, b.train)
    close(ia, ib)


def test_sweep_steps_scan_equals_steps_and_max_state():
    ms = Members("ep")
    state, rx = ms.sweep()
    rng = np.random.default_rng(0)
    x_all = jnp.asarray(rng.uniform(size=(40, 10)), jnp.float32)
    y_all = jnp.asarray(rng.integers(0, 4, 40), jnp.int32)
    idx = jnp.asarray(rng.integers(0, 40, (3, ms.M, 8)))  # (T, M, B): own order per member
    a, info = S.sweep_steps_jit(ms.model, ms.est, ms.opt, state, x_all, y_all, idx, rx)
    assert info.loss.shape == (3, ms.M)
    b = state
    for t in range(3):
        b, _ = S.sweep_step(ms.model, ms.est, ms.opt, b, x_all[idx[t]], y_all[idx[t]], rx)
    close(a.train, b.train)
    # a state above max_state counts as divergence (states here lie in [0, 1])
    c, cinfo = S.sweep_steps_jit(ms.model, ms.est, ms.opt, state, x_all, y_all, idx, rx, jnp.float32(1e-3))
    assert not np.asarray(c.alive).any() and (np.asarray(c.diverged_step) == 0).all()
    assert (np.asarray(c.train.step) == 0).all()


def test_sweep_evaluate_per_member():
    ms = Members("dendritic")
    state, rx = ms.sweep()
    x, y = batches(1, batch=32)[0]
    ev = S.sweep_evaluate(ms.model, ms.est, state, x, y, rx)
    for i in range(ms.M):
        tr = S.take(state.train, i)
        solo = ep_jax.evaluate_jit(ms.model, ms.est, tr.params, tr.buffers, x, y, ms.rxs[i])
        assert int(ev.correct[i]) == int(solo.correct)
        np.testing.assert_allclose(ev.loss[i], solo.loss, rtol=1e-5)


def test_stacking_mixed_dt_shapes_and_init_checks():
    model = ep_jax.build_model("ep", sizes=SIZES)
    est = ep_jax.Estimator("symmetric", 12, 4)
    opt = ep_jax.optim.sgd(model, lr=0.1)
    r1 = ep_jax.make_relaxation(model, dt=0.5)
    r2 = ep_jax.make_relaxation(model, dt=[np.linspace(0.1, 1.0, 8), 0.3])
    stacked = S.stack_relaxations(model, [r1, r2])
    assert stacked.dt[0].shape == (2, 8) and stacked.dt[1].shape == (2,)
    np.testing.assert_array_equal(stacked.dt[0][0], np.full(8, 0.5, np.float32))
    keys = [jax.random.PRNGKey(0), jax.random.PRNGKey(1)]
    state = S.init_sweep(model, est, opt, keys, keys)
    alone = ep_jax.init_state(model, est, opt, keys[1])
    for u, v in zip(jax.tree.leaves(S.take(state.train.params, 1)), jax.tree.leaves(alone.params)):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError, match="one key per member"):
        S.init_sweep(model, est, opt, keys, keys[:1])
    with pytest.raises(ValueError, match="leading member axis of 2"):
        S.init_sweep(model, est, opt, keys, keys, opt_hyperparams={"lr": np.ones((3, 2), np.float32)})
    with pytest.raises(ValueError, match="leading member axis of 2"):
        S.init_sweep(model, est, opt, keys, keys, settings={"gamma": np.ones(3, np.float32)})


# --- the sweep command's spec format ---------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_TOML = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY.items())


def test_spec_expansion(tmp_path):
    spec = cmd.load_spec(
        write(
            tmp_path / "grid.toml",
            f"""
name = "g"
{TINY_TOML}
[base]
beta = 0.3
[grid]
lr = [[0.2, 0.1], 0.05]
seed = [0, 1]
[[members]]
name = "dend-ep"
model = "ep"
seed = 9
""",
        )
    )
    configs = cmd.expand(spec)
    names = [n for n, _ in configs]
    assert names == ["lr=0.2-0.1_seed=0", "lr=0.2-0.1_seed=1", "lr=0.05_seed=0", "lr=0.05_seed=1", "dend-ep"]
    assert [c.seed for _, c in configs] == [0, 1, 0, 1, 9]
    assert [c.lr for _, c in configs[:4]] == [(0.2, 0.1), (0.2, 0.1), 0.05, 0.05]
    assert all(c.beta == 0.3 and c.dataset == "synthetic" for _, c in configs)
    assert configs[4][1].model == "ep" and configs[4][1].lr == (0.2, 0.1)  # base, not the grid
    # a preset as the base, fields on top; no grid, no members: one member named after the spec
    (only,) = cmd.expand(cmd.load_spec(write(tmp_path / "p.json", json.dumps({"preset": "fmnist-dep", "epochs": 3}))))
    assert only[0] == "p" and only[1] == RunConfig.from_dict({**cmd.PRESETS["fmnist-dep"], "epochs": 3})


def test_shipped_specs_expand(tmp_path):
    specs = sorted((ROOT / "experiments" / "sweeps").glob("*.toml"))
    assert specs
    for path in specs:
        configs = cmd.expand(cmd.load_spec(path))
        assert configs and len({n for n, _ in configs}) == len(configs), path


def test_dry_run_trains_nothing(tmp_path):
    spec = write(
        tmp_path / "s.toml",
        f'name = "s"\n{TINY_TOML}\n[grid]\nseed = [0, 1]\n[[members]]\nname = "wide"\nsizes = [16, 20, 4]\n',
    )
    rc, out, err = run_cli(cmd.main, [spec, "--out", tmp_path / "o", "--dry-run"])
    assert rc == 0, err
    assert "3 member(s) in 2 group(s)" in out and "seed=0, seed=1" in out and ": wide" in out
    assert not (tmp_path / "o").exists()


def test_sweep_folders_resume_and_refusals(tmp_path):
    spec = write(tmp_path / "s.toml", f'name = "s"\n{TINY_TOML}\n[grid]\nseed = [0, 1]\n')
    part, full = tmp_path / "part", tmp_path / "full"
    rc, out, err = run_cli(cmd.main, [spec, "--out", part, "--epochs", "1", "--no-progress"])
    assert rc == 0, err
    saved = json.loads((part / "sweep.json").read_text())
    assert [m["name"] for m in saved["members"]] == ["seed=0", "seed=1"]
    assert (part / "results.md").read_text().startswith("# s")
    before = {p: p.read_bytes() for p in part.rglob("*") if p.is_file()}
    rc, _, err = run_cli(cmd.main, [spec, "--out", part, "--no-progress"])
    assert_one_line_error(rc, err, "already holds a sweep", "--resume")
    other = write(tmp_path / "other.toml", f'name = "s"\n{TINY_TOML}\n[grid]\nseed = [0, 2]\n')
    rc, _, err = run_cli(cmd.main, [other, "--out", part, "--resume", "--no-progress"])
    assert_one_line_error(rc, err, "the spec's members differ")
    changed = write(tmp_path / "changed.toml", f'name = "s"\n{TINY_TOML}\n[base]\nbeta = 0.3\n[grid]\nseed = [0, 1]\n')
    rc, _, err = run_cli(cmd.main, [changed, "--out", part, "--resume", "--no-progress"])
    assert_one_line_error(rc, err, "belongs to another config", "beta")  # a sweep names the field
    rc, _, err = run_cli(cmd.main, [spec, "--out", tmp_path / "none", "--resume", "--no-progress"])
    assert_one_line_error(rc, err, "no sweep to resume")
    assert {p: p.read_bytes() for p in part.rglob("*") if p.is_file()} == before

    rc, _, err = run_cli(cmd.main, [spec, "--out", part, "--resume", "--epochs", "2", "--no-progress"])
    assert rc == 0, err
    rc, _, err = run_cli(cmd.main, [spec, "--out", full, "--no-progress"])
    assert rc == 0, err
    for n in ("seed=0", "seed=1"):
        assert summary(part / n)["status"] == "ok" and summary(part / n)["epochs_done"] == 2
        assert strip_time(metrics(part / n)) == strip_time(metrics(full / n))
        assert_same_arrays(checkpoint_arrays(part / n)[1], checkpoint_arrays(full / n)[1])


def test_member_whose_update_overflows_dies_at_that_step():
    """Member 1's first update overflows its parameters (loss and gradients finite): it is
    dead at step 0, keeps its initial state, and the others train as alone."""
    from test_train import overflowing

    model = ep_jax.build_model("ep", sizes=SIZES)
    est = ep_jax.Estimator("symmetric", t_free=12, t_nudge=4)
    opt = overflowing(1.0)
    keys = [jax.random.PRNGKey(10 + i) for i in range(3)]
    skeys = [jax.random.PRNGKey(100 + i) for i in range(3)]
    factors = np.array([1.0, 1e30, 1.0], np.float32)
    state = S.init_sweep(model, est, opt, keys, skeys, opt_hyperparams={"factor": factors})
    init = state
    rx = S.stack_relaxations(model, [ep_jax.make_relaxation(model, beta=0.2, dt=0.7)] * 3)
    data = batches(3)
    for x, y in data:
        state, info = S.sweep_step(model, est, opt, state, x, y, rx)
        assert np.asarray(info.finite).tolist() == [True, False, True]
        assert np.isfinite(np.asarray(info.loss)).all()
    assert np.asarray(state.alive).tolist() == [True, False, True]
    assert np.asarray(state.diverged_step).tolist() == [-1, 0, -1]
    for u, v in zip(jax.tree.leaves(S.take(state.train, 1)), jax.tree.leaves(S.take(init.train, 1)), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    for i in (0, 2):
        solo = ep_jax.init_state(model, est, opt, keys[i])
        for x, y in data:
            solo, _ = ep_jax.train_step_jit(
                model,
                est,
                opt,
                ep_jax.step_key(skeys[i], solo.step),
                solo,
                x,
                y,
                rx=ep_jax.make_relaxation(model, beta=0.2, dt=0.7),
            )
        close(S.take(state.train.params, i), solo.params)
