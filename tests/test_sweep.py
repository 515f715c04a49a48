"""Vmapped sweeps (ep_jax.sweep) and the sweep command (experiments.sweep).

The reference for every sweep member is the same config trained alone with the core
`train_step_jit`, from `init_state` with the member's documented init key.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ep_jax
from ep_jax import sweep as S
from experiments import sweep as cmd

SMALL = dict(sizes=(10, 8, 4), t_free=12, t_nudge=4, batch_size=8)


def batches(n_steps, batch=8, n_in=10, n_classes=4, seed=0):
    out = []
    for t in range(n_steps):
        kx, ky = jax.random.split(jax.random.PRNGKey(1000 * seed + t))
        out.append((jax.random.uniform(kx, (batch, n_in)), jax.random.randint(ky, (batch,), 0, n_classes)))
    return out


def train_alone(cfg, data, betas=None):
    """The member trained on its own: init from its init key, core train step."""
    model, est = cfg.build_model(), cfg.build_estimator()
    hyper = S.member_hyper(cfg, model)
    state = ep_jax.init_state(model, S.member_keys(cfg.seed)[0], hyper, est)
    metrics = []
    for t, (x, y) in enumerate(data):
        h = hyper if betas is None else hyper._replace(beta=jnp.asarray(betas[t], hyper.beta.dtype))
        state, m = ep_jax.train_step_jit(model, est, state, x, y, h)
        metrics.append(m)
    return state, metrics


def run_sweep(configs, data):
    (group,) = S.group_members(configs)
    state, sh = S.build_sweep(group)
    metrics = []
    for x, y in data:
        state, m = S.sweep_step(group.model, group.estimator, state, x, y, sh)
        metrics.append(m)
    return group, state, sh, metrics


def assert_close(a, b, rtol=2e-5, atol=1e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@pytest.mark.parametrize("model,estimator", [("ep", "symmetric"), ("dendritic", "symmetric"),
                                             ("dendritic", "one_sided")])
def test_member_equals_member_trained_alone(model, estimator):
    configs = [
        S.MemberConfig(name="a", model=model, estimator=estimator, seed=0, beta=0.1, lr=[0.2, 0.05], **SMALL),
        S.MemberConfig(name="b", model=model, estimator=estimator, seed=1, beta=0.3, lr=0.1, momentum=0.5,
                       alpha=0.5, dt=[np.linspace(0.3, 1.0, 8), 0.7], **SMALL),
        S.MemberConfig(name="c", model=model, estimator=estimator, seed=2, beta=0.2, lr=[0.05, 0.3],
                       dt=0.6, **SMALL),
    ]
    data = batches(4)
    _, state, _, metrics = run_sweep(configs, data)
    for i, cfg in enumerate(configs):
        alone, alone_metrics = train_alone(cfg, data)
        assert_close(S.take(state.train.params, i), alone.params)
        assert_close(S.take(state.train.opt_state, i), alone.opt_state)
        for t in range(len(data)):
            for k in ("loss", "correct", "grad_norm", "finite"):
                np.testing.assert_allclose(metrics[t][k][i], alone_metrics[t][k], rtol=2e-5, err_msg=f"{k} step {t}")
    assert bool(jnp.all(state.alive)) and np.all(np.asarray(state.train.step) == len(data))
    # the members really differ (different seeds and settings)
    w = jax.tree.leaves(state.train.params)[0]
    assert not np.allclose(w[0], w[1])


def test_random_nudge_sign_is_the_documented_sign_sequence():
    common = dict(estimator="one_sided", beta=0.2, lr=[0.2, 0.1], **SMALL)
    configs = [S.MemberConfig(name="rand", seed=3, nudge="random_sign", **common),
               S.MemberConfig(name="fixed", seed=3, **common)]
    data = batches(6)
    _, state, _, metrics = run_sweep(configs, data)
    sign_key = S.member_keys(3)[2]
    signs = [float(jax.random.rademacher(jax.random.fold_in(sign_key, t), (), jnp.float32)) for t in range(6)]
    assert set(signs) == {-1.0, 1.0}, "pick a seed whose sign sequence has both signs"
    np.testing.assert_allclose([m["beta"][0] for m in metrics], 0.2 * np.array(signs), rtol=1e-6)
    np.testing.assert_allclose([m["beta"][1] for m in metrics], 0.2, rtol=1e-6)
    rand_alone, _ = train_alone(configs[0], data, betas=[0.2 * s for s in signs])
    fixed_alone, _ = train_alone(configs[1], data)
    assert_close(S.take(state.train.params, 0), rand_alone.params)
    assert_close(S.take(state.train.params, 1), fixed_alone.params)
    # same seed, same data: only the sign schedule separates the two members
    assert not np.allclose(jax.tree.leaves(rand_alone.params)[0], jax.tree.leaves(fixed_alone.params)[0])


def test_random_sign_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="nudge='random_sign' needs estimator"):
        S.MemberConfig(name="x", estimator="symmetric", nudge="random_sign")
    with pytest.raises(ValueError, match="nudge must be one of"):
        S.MemberConfig(name="x", nudge="sometimes")


def test_diverging_member_is_marked_and_others_unaffected():
    leaky = dict(activation="leaky_relu", model_options={"output_activation": "sigmoid"}, dt=0.5, **SMALL)
    configs = [S.MemberConfig(name="ok1", seed=0, lr=0.1, **leaky),
               S.MemberConfig(name="boom", seed=1, lr=1e30, **leaky),
               S.MemberConfig(name="ok2", seed=2, lr=0.05, **leaky)]
    data = batches(6)
    _, state, _, metrics = run_sweep(configs, data)
    finite = np.array([np.asarray(m["finite"]) for m in metrics])     # (steps, M)
    assert not finite[:, 1].all(), "the huge-lr member should produce a non-finite step"
    first_bad = int(np.argmin(finite[:, 1]))
    assert np.asarray(state.alive).tolist() == [True, False, True]
    assert int(state.diverged_step[1]) == first_bad and np.asarray(state.diverged_step)[[0, 2]].tolist() == [-1, -1]
    assert all(not bool(m["alive"][1]) for m in metrics[first_bad:])
    assert int(state.train.step[1]) == first_bad            # frozen: no step counted after divergence
    for i in (0, 2):
        alone, _ = train_alone(configs[i], data)
        assert_close(S.take(state.train.params, i), alone.params)
        assert bool(jnp.all(jnp.isfinite(jax.tree.leaves(S.take(state.train.params, i))[0])))


def test_member_stays_frozen_after_a_transient_non_finite_step():
    # Member 0 gets one NaN batch (per-member batches), then clean ones again; the core step
    # alone would refuse only that step and carry on, the sweep freezes the member for good.
    configs = [S.MemberConfig(name=f"m{i}", seed=i, **SMALL) for i in range(2)]
    (group,) = S.group_members(configs)
    state, sh = S.build_sweep(group)
    data = batches(5)
    for t, (x, y) in enumerate(data):
        x0 = x.at[0, 0].set(jnp.nan) if t == 2 else x
        state, m = S.sweep_step(group.model, group.estimator, state, jnp.stack([x0, x]), jnp.stack([y, y]), sh)
        if t == 1:
            before = S.take(state.train, 0)
    assert np.asarray(state.alive).tolist() == [False, True] and int(state.diverged_step[0]) == 2
    for u, v in zip(jax.tree.leaves(before), jax.tree.leaves(S.take(state.train, 0))):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    alone, _ = train_alone(configs[1], data)
    assert_close(S.take(state.train.params, 1), alone.params)


def test_per_member_batches():
    configs = [S.MemberConfig(name=f"m{i}", seed=i, **SMALL) for i in range(2)]
    (group,) = S.group_members(configs)
    state, sh = S.build_sweep(group)
    d0, d1 = batches(1, seed=0)[0], batches(1, seed=1)[0]
    x, y = jnp.stack([d0[0], d1[0]]), jnp.stack([d0[1], d1[1]])
    state, _ = S.sweep_step(group.model, group.estimator, state, x, y, sh)
    for i, d in enumerate((d0, d1)):
        alone, _ = train_alone(configs[i], [d])
        assert_close(S.take(state.train.params, i), alone.params)


def test_group_members_by_static_structure():
    base = dict(sizes=(10, 8, 4), t_free=12, t_nudge=4, batch_size=8)
    cfgs = [
        S.MemberConfig(name="a", seed=0, **base),
        S.MemberConfig(name="b", seed=1, beta=0.5, lr=[0.3, 0.1], dt=0.5, momentum=0.0, **base),  # numeric only
        S.MemberConfig(name="wide", **{**base, "sizes": (10, 9, 4)}),
        S.MemberConfig(name="deep", **{**base, "sizes": (10, 8, 8, 4)}),
        S.MemberConfig(name="t1", **{**base, "t_free": 13}),
        S.MemberConfig(name="t2", **{**base, "t_nudge": 5}),
        S.MemberConfig(name="dend", model="dendritic", **base),
        S.MemberConfig(name="tanh", activation="tanh", **base),
        S.MemberConfig(name="bptt", estimator="bptt", **base),
        S.MemberConfig(name="bs", **{**base, "batch_size": 16}),
        S.MemberConfig(name="c", seed=5, alpha=0.7, gamma=0.5, **base),                      # numeric only
        S.MemberConfig(name="k4", model="dendritic", model_options={"basal_branches": 4}, **base),
        S.MemberConfig(name="dend2", model="dendritic", seed=3, **base),
    ]
    groups = S.group_members(cfgs)
    got = [[c.name for c in g.members] for g in groups]
    assert got == [["a", "b", "c"], ["wide"], ["deep"], ["t1"], ["t2"], ["dend", "dend2"], ["tanh"],
                   ["bptt"], ["bs"], ["k4"]]
    assert [list(g.indices) for g in groups][0] == [0, 1, 10]
    g = groups[5]
    assert isinstance(g.model, ep_jax.DendriticModel) and g.model.sizes == (10, 8, 4)
    assert groups[9].model.basal_branches == 4 and groups[8].batch_size == 16
    assert groups[7].estimator == ep_jax.Estimator("bptt", t_free=12, t_nudge=4)
    with pytest.raises(ValueError, match="unique"):
        S.group_members([cfgs[0], cfgs[0]])


def test_stacking_mixed_dt_shapes_and_init_checks():
    model = ep_jax.build_model("ep", sizes=(10, 8, 4))
    est = ep_jax.Estimator("symmetric", 12, 4)
    h1 = ep_jax.make_hyper(model, dt=0.5)
    h2 = ep_jax.make_hyper(model, dt=[np.linspace(0.1, 1.0, 8), 0.3])
    stacked = S.stack_hypers(model, [h1, h2])
    assert stacked.dt[0].shape == (2, 8) and stacked.dt[1].shape == (2,)
    np.testing.assert_array_equal(stacked.dt[0][0], np.full(8, 0.5, np.float32))
    keys = [jax.random.PRNGKey(0), jax.random.PRNGKey(1)]
    state, sh = S.init_sweep(model, est, keys, [h1, h2])
    alone = ep_jax.init_state(model, keys[1], h2, est)
    assert_close(S.take(state.train.params, 1), alone.params, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one Hyper per key"):
        S.init_sweep(model, est, keys, [h1])
    with pytest.raises(ValueError, match="dt of layer 1 must lie in"):  # caught at construction
        ep_jax.make_hyper(model, dt=1.5)
    bad = h1._replace(dt=(np.float32(1.5), h1.dt[1]))  # a Hyper built by hand skips that check
    with pytest.raises(ValueError, match="member 1: dt of layer 1 must lie in"):
        S.init_sweep(model, est, keys, [h1, bad])
    with pytest.raises(ValueError, match="random_sign needs estimator"):
        S.init_sweep(model, est, keys, [h1, h2], random_sign=[True, False])


def test_dt_sampler_hook():
    calls = []

    def sampler(key, model, dt_dist, dt_out):
        calls.append(dict(dt_dist))
        hidden = dt_dist["lo"] + (1 - dt_dist["lo"]) * jax.random.uniform(key, (model.state_sizes[0],))
        return hidden, dt_out

    cfgs = [S.MemberConfig(name=f"s{s}", seed=s, dt_dist={"lo": 0.2}, dt_out=0.3, **SMALL) for s in (0, 1)]
    model = cfgs[0].build_model()
    h0, h1 = (S.member_hyper(c, model, dt_sampler=sampler) for c in cfgs)
    assert calls == [{"lo": 0.2}, {"lo": 0.2}]
    expect = 0.2 + 0.8 * jax.random.uniform(S.member_keys(0)[1], (8,))
    np.testing.assert_allclose(h0.dt[0], expect, rtol=1e-6)
    assert float(h0.dt[1]) == pytest.approx(0.3)
    assert not np.allclose(h0.dt[0], h1.dt[0])                # per-member (per-seed) dt
    with pytest.raises(ValueError, match="no dt_sampler"):
        S.member_hyper(cfgs[0], model, dt_sampler=None)
    with pytest.raises(ValueError, match="dt_dist needs dt_out"):
        S.MemberConfig(name="x", dt_dist={"lo": 0.2})


def test_expand_grid():
    cfgs = S.expand_grid({"sizes": [10, 8, 4], "lr": [0.1, 0.05]},
                         {"beta": [0.1, 0.2], "seed": [0, 1, 2]}, [{"name": "extra", "beta": 0.4}])
    assert len(cfgs) == 7
    assert [c.name for c in cfgs[:3]] == ["beta=0.1_seed=0", "beta=0.1_seed=1", "beta=0.1_seed=2"]
    assert {(c.beta, c.seed) for c in cfgs[:6]} == {(b, s) for b in (0.1, 0.2) for s in (0, 1, 2)}
    assert cfgs[6].name == "extra" and cfgs[6].beta == 0.4 and cfgs[6].lr == (0.1, 0.05)
    with pytest.raises(ValueError, match="unknown member setting"):
        S.expand_grid({"betta": 0.1})
    with pytest.raises(ValueError, match="grid.seed must be a non-empty list"):
        S.expand_grid({}, {"seed": 3})


# --- the command ----------------------------------------------------------------------------

TINY_SPEC = """
name = "tiny"
dataset = "synthetic"
epochs = 3
eval_batch_size = 64
[synthetic]
n_features = 12
n_classes = 3
n_train = 200
n_test = 96
seed = 1
[base]
sizes = [12, 10, 3]
t_free = 10
t_nudge = 3
batch_size = 32
lr = [0.2, 0.1]
[grid]
beta = [0.1, 0.3]
seed = [0, 1]
[[members]]
name = "dend"
model = "dendritic"
"""


def read_rows(path):
    return [{k: v for k, v in json.loads(l).items() if k != "time_s"} for l in path.read_text().splitlines()]


def test_command_end_to_end_and_resume(tmp_path):
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC)
    full = cmd.main([str(spec), "--out", str(tmp_path / "full"), "--no-progress"])
    names = ["beta=0.1_seed=0", "beta=0.1_seed=1", "beta=0.3_seed=0", "beta=0.3_seed=1", "dend"]
    assert [s["member"] for s in full] == names
    for n in names:
        d = tmp_path / "full" / n
        rows = read_rows(d / "metrics.jsonl")
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        assert set(rows[0]) == {"epoch", "train_acc", "test_acc", "loss", "alive"}
        summary = json.loads((d / "summary.json").read_text())
        assert summary["status"] == "ok"
        assert summary["final_test_acc"] == rows[-1]["test_acc"]
        assert summary["best_test_acc"] == max(r["test_acc"] for r in rows)
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["name"] == n and cfg["dataset"] == "synthetic"
    # the EP members learn the synthetic problem (3 classes: chance 1/3)
    assert max(s["best_test_acc"] for s in full[:4]) > 0.6
    table = (tmp_path / "full" / "results.md").read_text()
    assert all(n in table for n in names) and "Mean ± std over seeds" in table

    # interrupted after one epoch, then resumed to three: identical numbers
    part = tmp_path / "part"
    cmd.main([str(spec), "--out", str(part), "--epochs", "1", "--no-progress"])
    assert [r["epoch"] for r in read_rows(part / "dend" / "metrics.jsonl")] == [1]
    with pytest.raises(SystemExit, match="already holds a sweep"):
        cmd.main([str(spec), "--out", str(part), "--no-progress"])
    resumed = cmd.main([str(spec), "--out", str(part), "--resume", "--no-progress"])
    assert resumed == full
    for n in names:
        assert read_rows(part / n / "metrics.jsonl") == read_rows(tmp_path / "full" / n / "metrics.jsonl")


def test_command_dt_dist_members(tmp_path):
    spec = tmp_path / "hts.toml"
    spec.write_text(TINY_SPEC.replace("[grid]\nbeta = [0.1, 0.3]", "[grid]\ndt_dist = [{lo = 0.5}]\ndt_out = [0.6]"))

    def sampler(key, model, dt_dist, dt_out):
        return dt_dist["lo"] + 0.1 * jax.random.uniform(key, (model.state_sizes[0],)), dt_out

    try:
        import ep_jax.timesteps  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="need ep_jax.timesteps"):
            cmd.main([str(spec), "--out", str(tmp_path / "no"), "--epochs", "1", "--no-progress"])
    res = cmd.main([str(spec), "--out", str(tmp_path / "hts"), "--epochs", "1", "--no-progress"],
                   dt_sampler=sampler)
    assert [s["status"] for s in res] == ["ok"] * 3


def test_chunked_sweep_step_equals_vmapped():
    configs = [S.MemberConfig(name=f"m{i}", seed=i, beta=0.1 * (i + 1), **SMALL) for i in range(3)]
    (group,) = S.group_members(configs)
    state, sh = S.build_sweep(group)
    a = b = state
    for x, y in batches(2):
        a, ma = S.sweep_step(group.model, group.estimator, a, x, y, sh)
        b, mb = S.sweep_step(group.model, group.estimator, b, x, y, sh, 2)     # chunks of 2 and 1
    assert_close(a.train, b.train)
    assert_close(ma, mb)
