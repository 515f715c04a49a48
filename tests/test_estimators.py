"""Gradient estimators: EP vs BPTT (SPEC §5), consistency and input checks."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ep_jax
from ep_jax import checks, dynamics
from conftest import assert_trees_close

GDU_SIZES = (20, 16, 12, 5)


def gdu_setup(kind, activation, dt=1.0, seed=0):
    model = ep_jax.build_model(kind, sizes=GDU_SIZES, activation=activation)
    hyper = ep_jax.make_hyper(model, beta=0.01, lr=0.1, dt=dt)
    params, buffers = model.init(jax.random.PRNGKey(seed), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (32, GDU_SIZES[0]), jnp.float64)
    y = jax.random.randint(jax.random.PRNGKey(seed + 2), (32,), 0, GDU_SIZES[-1])
    return model, hyper, params, buffers, x, y


@pytest.mark.parametrize("activation,dt", [("sigmoid", 1.0), ("tanh", 0.5), ("hard_sigmoid", 1.0)])
def test_symmetric_ep_matches_bptt_float64(activation, dt, x64):
    """Converged free phase, β = 0.01: EP ≈ truncated BPTT, per layer, and the GDU curves
    (EP over the first k nudged steps vs BPTT over the last k) agree for every k."""
    model, hyper, params, buffers, x, y = gdu_setup("ep", activation, dt)
    est = ep_jax.Estimator("symmetric", t_free=200, t_nudge=20)
    res = checks.gdu(est, model, params, buffers, x, y, hyper)
    table = checks.gdu_table(res)
    final = checks.compare(jax.tree.map(lambda a: a[-1], res.ep), jax.tree.map(lambda a: a[-1], res.bptt))
    print(checks.format_comparison(final, f"EP {activation} dt={dt}"))
    for name, m in final.items():
        assert m["cosine"] > 0.99, (name, m)
    # GDU: for smooth activations the curves coincide step by step
    # (at dt = 1 the nudge needs k steps to reach a layer k below the output: both
    # sides are exactly zero for smaller k, which the curves must agree on too)
    tol = 0.99 if activation == "hard_sigmoid" else 0.999
    ep_leaves, bp_leaves = jax.tree.leaves(res.ep), jax.tree.leaves(res.bptt)
    for (name, c), e, b in zip(table.items(), ep_leaves, bp_leaves):
        scale = np.linalg.norm(np.asarray(b[-1]))
        for k, cos in enumerate(c["cosine"]):
            if np.linalg.norm(np.asarray(b[k])) < 1e-12 * scale:
                assert np.linalg.norm(np.asarray(e[k])) < 1e-6 * scale, (name, k)
            else:
                assert cos > tol, (name, k, c["cosine"])
    if activation != "hard_sigmoid":
        for name, m in final.items():
            assert m["rel_rmse"] < 0.02 and m["sign_err"] < 0.02, (name, m)


def test_one_sided_ep_is_biased_but_close(x64):
    model, hyper, params, buffers, x, y = gdu_setup("ep", "sigmoid")
    g_bptt, _ = ep_jax.estimate(ep_jax.Estimator("bptt", 200, 20), model, params, buffers, x, y, hyper)
    g_sym, _ = ep_jax.estimate(ep_jax.Estimator("symmetric", 200, 20), model, params, buffers, x, y, hyper)
    g_one, _ = ep_jax.estimate(ep_jax.Estimator("one_sided", 200, 20), model, params, buffers, x, y, hyper)
    c_sym, c_one = checks.compare(g_sym, g_bptt), checks.compare(g_one, g_bptt)
    for name in c_sym:
        assert c_one[name]["cosine"] > 0.98
        # symmetric nudging removes the O(β) bias of the one-sided estimate
        assert c_sym[name]["rel_rmse"] <= c_one[name]["rel_rmse"] + 1e-9


@pytest.mark.parametrize("kind", ["ep", "dendritic"])
def test_gdu_bptt_curve_equals_truncated_bptt_estimator(kind, x64):
    """The one-reverse-sweep truncated-BPTT curve equals jax.grad through the last k steps."""
    model, hyper, params, buffers, x, y = gdu_setup(kind, "hard_sigmoid")
    curve = checks.bptt_truncated_curve(model, params, buffers, x, y, hyper, t_free=40, k_max=10)
    for k in (1, 4, 10):
        g, _ = ep_jax.estimate(ep_jax.Estimator("bptt", t_free=40, t_nudge=k), model, params, buffers, x, y, hyper)
        assert_trees_close(jax.tree.map(lambda a: a[k - 1], curve), g, rtol=1e-9, atol=1e-13)
    # the EP curve's last entry is the symmetric estimate itself
    est = ep_jax.Estimator("symmetric", t_free=40, t_nudge=10)
    ep_curve = checks.ep_curve(est, model, params, buffers, x, y, hyper)
    g, _ = ep_jax.estimate(est, model, params, buffers, x, y, hyper)
    assert_trees_close(jax.tree.map(lambda a: a[-1], ep_curve), g, rtol=1e-9, atol=1e-13)


def test_full_bptt_is_grad_of_explicit_unrolled_loss(x64):
    model, hyper, params, buffers, x, y = gdu_setup("ep", "tanh", dt=0.5)

    def loss(p):  # written without the library's relaxation
        s = [jnp.zeros((x.shape[0], n)) for n in model.state_sizes]
        for _ in range(15):
            h1 = x @ p[0]["w"] + p[0]["b"] + s[1] @ p[1]["w"].T
            h2 = s[0] @ p[1]["w"] + p[1]["b"] + s[2] @ p[2]["w"].T
            h3 = s[1] @ p[2]["w"] + p[2]["b"]
            s = [0.5 * sl + 0.5 * jnp.tanh(h) for sl, h in zip(s, (h1, h2, h3))]
        return jnp.mean(0.5 * jnp.sum((s[2] - jax.nn.one_hot(y, 5)) ** 2, -1))

    g, aux = ep_jax.estimate(ep_jax.Estimator("bptt_full", 15, 3), model, params, buffers, x, y, hyper)
    assert_trees_close(g, jax.grad(loss)(params), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(aux.loss, loss(params), rtol=1e-12)


@pytest.mark.parametrize("kind", ["ep", "dendritic"])
def test_dendritic_masked_positions_get_no_gradient(kind):
    model = ep_jax.build_model("dendritic", sizes=(12, 10, 8, 4))
    hyper = ep_jax.make_hyper(model, beta=0.2, lr=0.5)
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 12))
    y = jax.random.randint(jax.random.PRNGKey(2), (16,), 0, 4)
    state = ep_jax.init_state(model, jax.random.PRNGKey(0), hyper)
    w0 = state.params
    for est_kind in ("symmetric", "one_sided", "chl", "bptt"):
        g, _ = ep_jax.estimate(ep_jax.Estimator(est_kind, 20, 5), model, state.params, state.buffers, x, y, hyper)
        for part in ("basal", "apical"):
            for gl, ml in zip(g[part], state.buffers[part]):
                assert np.all(np.asarray(gl["w"])[np.asarray(ml) == 0] == 0)
                assert np.any(np.asarray(gl["w"])[np.asarray(ml) == 1] != 0) or est_kind == "chl"
    est = ep_jax.Estimator("symmetric", 20, 5)
    for _ in range(3):
        state, _ = ep_jax.train_step_jit(model, est, state, x, y, hyper)
    for part in ("basal", "apical"):
        for a, b, ml in zip(state.params[part], w0[part], state.buffers[part]):
            off = np.asarray(ml) == 0
            np.testing.assert_array_equal(np.asarray(a["w"])[off], np.asarray(b["w"])[off])


@pytest.mark.parametrize("kind", ["ep", "dendritic"])
def test_batched_and_separate_nudged_phases_agree(kind, x64):
    model, hyper, params, buffers, x, y = gdu_setup(kind, "hard_sigmoid")
    g1, _ = ep_jax.estimate(ep_jax.Estimator("symmetric", 30, 8, batched_nudge=True), model, params, buffers, x, y, hyper)
    g2, _ = ep_jax.estimate(ep_jax.Estimator("symmetric", 30, 8, batched_nudge=False), model, params, buffers, x, y, hyper)
    assert_trees_close(g1, g2, rtol=1e-10, atol=1e-14)


def test_scalar_dt_equals_constant_vector():
    model = ep_jax.build_model("dendritic", sizes=(12, 10, 4))
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 12))
    y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 4)
    h_s = ep_jax.make_hyper(model, dt=0.3)
    h_v = ep_jax.make_hyper(model, dt=[jnp.full((10,), 0.3), jnp.full((4,), 0.3)])
    params, buffers = model.init(jax.random.PRNGKey(0))
    for kind in ("symmetric", "chl", "bptt"):
        est = ep_jax.Estimator(kind, 25, 6)
        (ga, aa), (gb, ab) = (ep_jax.estimate(est, model, params, buffers, x, y, h) for h in (h_s, h_v))
        jax.tree.map(np.testing.assert_array_equal, (ga, aa.s_free), (gb, ab.s_free))


class JitVariantsTest(chex.TestCase):
    """Same numbers with and without jit."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_estimate_and_train_step(self):
        for kind in ("ep", "dendritic"):
            model = ep_jax.build_model(kind, sizes=(12, 10, 4))
            hyper = ep_jax.make_hyper(model, beta=0.2, lr=0.1)
            x = jax.random.uniform(jax.random.PRNGKey(1), (8, 12))
            y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 4)
            state = ep_jax.init_state(model, jax.random.PRNGKey(0), hyper)
            for est_kind in ("symmetric", "bptt"):
                est = ep_jax.Estimator(est_kind, 20, 5)
                step = self.variant(lambda st, x, y, h: ep_jax.train_step(model, est, st, x, y, h))
                new, metrics = step(state, x, y, hyper)
                ref, ref_m = jax.jit(lambda st, x, y, h: ep_jax.train_step(model, est, st, x, y, h))(state, x, y, hyper)
                with jax.disable_jit():
                    nojit, _ = ep_jax.train_step(model, est, state, x, y, hyper)
                assert_trees_close(new.params, ref.params, rtol=1e-5, atol=1e-6)
                assert_trees_close(new.params, nojit.params, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(metrics["loss"], ref_m["loss"], rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = ep_jax.build_model("ep", sizes=(12, 10, 4))
    hyper = ep_jax.make_hyper(model, beta=0.2)
    params, buffers = model.init(jax.random.PRNGKey(0))
    x = jnp.zeros((8, 12))
    y = jnp.zeros((8,), jnp.int32)
    est = ep_jax.Estimator()
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 12\)"):
        ep_jax.estimate(est, model, params, buffers, jnp.zeros((8, 13)), y, hyper)
    with pytest.raises(ValueError, match="y must have shape"):
        ep_jax.estimate(est, model, params, buffers, x, jnp.zeros((7,), jnp.int32), hyper)
    with pytest.raises(ValueError, match=r"y holds labels in \[0, 4\], outside \[0, 4\)"):
        ep_jax.estimate(est, model, params, buffers, x, y.at[3].set(4), hyper)
    with pytest.raises(ValueError, match="labels"):
        ep_jax.estimate(est, model, params, buffers, x, y.at[0].set(-1), hyper)
    with pytest.raises(ValueError, match="integer"):
        ep_jax.estimate(est, model, params, buffers, x, y.astype(jnp.float32), hyper)
    with pytest.raises(ValueError, match="beta must be nonzero"):
        ep_jax.init_state(model, jax.random.PRNGKey(0), ep_jax.make_hyper(model, beta=0.0), est)
    ep_jax.init_state(model, jax.random.PRNGKey(0), ep_jax.make_hyper(model, beta=0.0),
                      ep_jax.Estimator("bptt"))  # fine for BPTT
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"dt of layer 1 must lie in \(0, 1\]"):
            ep_jax.make_hyper(model, dt=bad)
    with pytest.raises(ValueError, match=r"dt of layer 2 must lie in \(0, 1\]"):
        ep_jax.make_hyper(model, dt=[0.5, jnp.array([0.5, 0.5, 0.0, 0.5])])
    with pytest.raises(ValueError, match=r"dt of layer 1 must be a scalar or shape \(10,\)"):
        ep_jax.make_hyper(model, dt=[jnp.full((9,), 0.5), 0.5])
    with pytest.raises(ValueError, match="one per layer"):
        ep_jax.make_hyper(model, dt=[0.5])
    with pytest.raises(ValueError, match="lr"):
        ep_jax.make_hyper(model, lr=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="unknown estimator"):
        ep_jax.Estimator("hebbian")
    with pytest.raises(ValueError, match="t_nudge <= t_free"):
        ep_jax.Estimator("bptt", t_free=5, t_nudge=6)
    with pytest.raises(ValueError, match="finite"):
        ep_jax.make_hyper(model, lr=float("nan"))


def test_non_finite_step_is_refused():
    model = ep_jax.build_model("ep", sizes=(12, 10, 4), activation="relu")
    hyper = ep_jax.make_hyper(model, beta=0.2, lr=1e30)
    state = ep_jax.init_state(model, jax.random.PRNGKey(0), hyper)
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 12)) * 1e30
    y = jnp.zeros((8,), jnp.int32)
    new, m = ep_jax.train_step_jit(model, ep_jax.Estimator("symmetric", 20, 4), state, x, y, hyper)
    assert not bool(m["finite"])
    jax.tree.map(np.testing.assert_array_equal, new, state)
