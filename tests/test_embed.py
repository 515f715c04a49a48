"""EP as a layer: custom VJP, pipelines, the Flax wrapper, jit/vmap/grad together."""

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import NumpyNet, assert_trees_close, rel_err, synthetic_problem

import ep_jax
from ep_jax import alignment
from ep_jax.layer import make_ep_block
from ep_jax.nn import EPBlock


def setup(kind, beta, activation="sigmoid"):
    m = ep_jax.build_model(kind, sizes=(20, 16, 12, 5), activation=activation)
    rx = ep_jax.make_relaxation(m, beta=beta)
    p, b = m.init(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 20), jnp.float64)
    y = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 5)
    return m, rx, p, b, x, y


def block(m, t_free, t_nudge):
    return make_ep_block(m, ep_jax.Estimator("symmetric", t_free, t_nudge))


@pytest.mark.parametrize("kind", ["ep", "dendritic"])
def test_custom_vjp_matches_direct_symmetric_estimate(kind, x64):
    """Downstream MSE: the VJP nudges with the cost linearised at the free state, the
    direct estimate with the MSE itself; the two differ by O(β) relatively."""
    errs = []
    est = ep_jax.Estimator("symmetric", 200, 20)
    m, _, p, b, x, y = setup(kind, 0.1)
    blk = make_ep_block(m, est)
    grad = jax.jit(jax.grad(lambda p, rx: jnp.mean(m.cost(blk(p, b, x, rx), m.one_hot(y, jnp.float64)))))
    direct = jax.jit(ep_jax.estimate, static_argnums=(0, 1))
    for beta in (1e-2, 1e-3):
        rx = ep_jax.make_relaxation(m, beta=beta)
        gd, _ = direct(m, est, None, p, b, x, y, rx)
        errs.append(rel_err(grad(p, rx), gd))
    assert errs[0] < 1e-3 and errs[1] < errs[0] / 5, errs
    # forward value is the free equilibrium itself
    s = ep_jax.predict(m, est, p, b, x, rx)
    np.testing.assert_array_equal(blk(p, b, x, rx), s[-1])


def test_custom_vjp_is_exact_for_a_linear_downstream_cost(x64):
    """For C = ⟨c, s_L⟩ the VJP's nudged phases are written out here step by step."""
    m, rx, p, b, x, _ = setup("ep", 0.05)
    c = jax.random.normal(jax.random.PRNGKey(5), (32, 5), jnp.float64)
    blk = block(m, 100, 15)
    g, g_x = jax.grad(lambda p, x: jnp.sum(c * blk(p, b, x, rx)), argnums=(0, 1))(p, x)
    act = jax.nn.sigmoid
    s0 = ep_jax.predict(m, ep_jax.Estimator("symmetric", 100, 15), p, b, x, rx)

    def nudged(beta):
        s = list(s0)
        for _ in range(15):
            h1 = x @ p[0]["w"] + p[0]["b"] + s[1] @ p[1]["w"].T
            h2 = s[0] @ p[1]["w"] + p[1]["b"] + s[2] @ p[2]["w"].T
            h3 = s[1] @ p[2]["w"] + p[2]["b"] - beta * 32 * c
            s = [act(v) for v in (h1, h2, h3)]
        return s

    sp, sm = nudged(0.05), nudged(-0.05)
    # ∂Φ/∂W_l = s_{l−1}ᵀ s_l / B, so the estimate is −(s⁺ terms − s⁻ terms) / (2β B)
    prev = lambda s: [x, s[0], s[1]]
    ref = tuple(
        {
            "w": -(prev(sp)[l].T @ sp[l] - prev(sm)[l].T @ sm[l]) / (2 * 0.05 * 32),
            "b": -(sp[l].sum(0) - sm[l].sum(0)) / (2 * 0.05 * 32),
        }
        for l in range(3)
    )
    assert_trees_close(g, ref, rtol=1e-9, atol=1e-12)
    # the input gradient, in scale and not only in direction: ∂Φ/∂x = s_1 W_1ᵀ / B
    ref_x = -(sp[0] - sm[0]) @ p[0]["w"].T / (2 * 0.05 * 32)
    np.testing.assert_allclose(g_x, ref_x, rtol=1e-9, atol=1e-12)
    assert np.linalg.norm(ref_x) > 1e-2


def test_custom_vjp_matches_bptt(x64):
    m, rx, p, b, x, y = setup("ep", 0.01)
    blk = block(m, 200, 20)
    g = jax.grad(lambda p: jnp.mean(m.cost(blk(p, b, x, rx), m.one_hot(y, jnp.float64))))(p)
    gb, _ = ep_jax.estimate(m, ep_jax.Estimator("bptt", 200, 20), None, p, b, x, y, rx)
    for name, r in alignment.compare(g, gb).items():
        assert r["cosine"] > 0.99, (name, r)


def test_pipeline_gradients_upstream_and_in_block(x64):
    """A trainable feature map before the block gets ordinary gradients through the EP
    estimate of ∂C/∂x; compare with BPTT through the whole free phase."""
    m, rx, p, b, x, y = setup("ep", 0.01)
    wf = 0.3 * jax.random.normal(jax.random.PRNGKey(7), (20, 20), jnp.float64)
    est = ep_jax.Estimator("symmetric", 200, 20)
    blk = make_ep_block(m, est)
    y1h = m.one_hot(y, jnp.float64)

    def loss_ep(wf, p):
        return jnp.mean(m.cost(blk(p, b, jnp.tanh(x @ wf), rx), y1h))

    def loss_bptt(wf, p):
        s = ep_jax.predict(m, est, p, b, jnp.tanh(x @ wf), rx)
        return jnp.mean(m.cost(s[-1], y1h))

    g_ep = jax.jit(jax.grad(loss_ep, argnums=(0, 1)))(wf, p)
    g_bp = jax.jit(jax.grad(loss_bptt, argnums=(0, 1)))(wf, p)
    for name, r in alignment.compare(g_ep, g_bp).items():
        assert r["cosine"] > 0.99, (name, r)
    # the upstream gradient has the right SCALE too (β = 0.01: O(β) from the linearised cost)
    assert rel_err(g_ep[0], g_bp[0]) < 0.02, rel_err(g_ep[0], g_bp[0])
    assert np.linalg.norm(g_ep[0]) / np.linalg.norm(g_bp[0]) == pytest.approx(1.0, abs=0.02)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.sigmoid(nn.Dense(16)(x))
        return EPBlock(
            sizes=(16, 24, 4), kind="dendritic", t_free=20, t_nudge=5, beta=0.2, model_kwargs=(("basal_branches", 4),)
        )(h)


def test_flax_wrapper_trains_in_user_loop_and_serialises(tmp_path):
    (xtr, ytr), (xte, yte) = synthetic_problem(jax.random.PRNGKey(3))
    net = Net()
    variables = net.init(jax.random.PRNGKey(0), xtr[:2])
    assert set(variables) == {"params", "buffers"}
    params, buffers = variables["params"], variables["buffers"]
    tx = optax.adam(3e-2)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss(pr):
            out = net.apply({"params": pr, "buffers": buffers}, x)
            return jnp.mean(jnp.sum((out - jax.nn.one_hot(y, 4)) ** 2, -1))

        l, g = jax.value_and_grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, l

    acc = lambda pr: float(jnp.mean(jnp.argmax(net.apply({"params": pr, "buffers": buffers}, xte), -1) == yte))
    acc0 = acc(params)
    for _ in range(6):
        for i in range(0, len(ytr), 32):
            params, opt, l = step(params, opt, xtr[i : i + 32], ytr[i : i + 32])
    assert acc(params) > 0.85 and acc(params) > acc0 + 0.3, (acc0, acc(params))
    # round trip through flax.serialization, bit for bit, masks included
    full = {"params": params, "buffers": buffers}
    blob = flax.serialization.to_bytes(full)
    back = flax.serialization.from_bytes(jax.tree.map(jnp.zeros_like, full), blob)
    jax.tree.map(np.testing.assert_array_equal, back, full)
    state = flax.serialization.msgpack_restore(blob)
    np.testing.assert_array_equal(
        state["buffers"]["EPBlock_0"]["state"]["masks"]["basal"]["0"],
        buffers["EPBlock_0"]["state"]["masks"]["basal"][0],
    )


def test_jit_vmap_grad_together():
    """A batch of 3 models (stacked params), gradients of each via the EP VJP, under jit."""
    m = ep_jax.build_model("ep", sizes=(8, 10, 3))
    rx = ep_jax.make_relaxation(m, beta=0.1)
    blk = block(m, 20, 5)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    ps = jax.vmap(lambda k: m.init(k)[0])(keys)
    buffers = m.init(keys[0])[1]
    x = jax.random.uniform(jax.random.PRNGKey(1), (6, 8))
    y1h = jax.nn.one_hot(jnp.arange(6) % 3, 3)
    loss = lambda p: jnp.mean(jnp.sum((blk(p, buffers, x, rx) - y1h) ** 2, -1)) / 2
    g = jax.jit(jax.vmap(jax.grad(loss)))(ps)
    solo = jax.jit(jax.grad(loss))
    for i in range(3):
        gi = solo(jax.tree.map(lambda a: a[i], ps))
        assert_trees_close(jax.tree.map(lambda a: a[i], g), gi, rtol=1e-5, atol=1e-7)
    assert not np.allclose(g[0]["w"][0], g[0]["w"][1])


@pytest.mark.parametrize("kind", ["ep", "dendritic"])
def test_block_gradients_equal_the_independent_symmetric_estimate_of_a_linear_cost(kind, x64):
    """C = Σ_b ⟨c_b, s_L,b⟩ downstream: the block's ∂C/∂θ and ∂C/∂x are exactly the
    symmetric EP estimate for that cost, −(∂Φ(s⁺) − ∂Φ(s⁻))/2β with the output force
    −β·B·c, here from the independent numpy relaxation and derivatives (dendritic maps
    as loops over branches). Checked in value, so a wrong scale (e.g. of the B factor or
    of 1/2β) fails; and the input gradient also against BPTT through the free phase."""
    m, rx, p, b, x, _ = setup(kind, 0.01)
    T1, T2, B = 150, 40, x.shape[0]
    c = jax.random.normal(jax.random.PRNGKey(5), (B, 5), jnp.float64)
    blk = block(m, T1, T2)
    grads = jax.jit(jax.grad(lambda p, x, rx: jnp.sum(c * blk(p, b, x, rx)), argnums=(0, 1)))
    g, g_x = grads(p, x, rx)
    net = NumpyNet(m, p, b)
    s0 = net.free(x, T1)
    sp = net.nudged_linear(x, s0, B * np.asarray(c), 0.01, T2)
    sm = net.nudged_linear(x, s0, B * np.asarray(c), -0.01, T2)
    (gp, xp), (gm, xm) = net.phi_grads(x, sp), net.phi_grads(x, sm)
    ref = net.to_lib(jax.tree.map(lambda u, v: -(u - v) / 0.02, gp, gm))
    ref_x = -(xp - xm) / 0.02
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-8, atol=1e-12), g, ref)
    np.testing.assert_allclose(g_x, ref_x, rtol=1e-8, atol=1e-12)
    # in scale against the true input gradient (BPTT through the converged free phase);
    # the force is β·B·c, so the O(β²) bias is that of an effective β·B = 0.32 at β = 0.01
    est = ep_jax.Estimator("symmetric", T1, T2)
    g_x_bptt = jax.jit(jax.grad(lambda x: jnp.sum(c * ep_jax.predict(m, est, p, b, x, rx)[-1])))(x)
    g_x_small = grads(p, x, rx._replace(beta=jnp.asarray(1e-3)))[1]
    for beta, gx in ((1e-2, g_x), (1e-3, g_x_small)):
        ratio = np.linalg.norm(gx) / np.linalg.norm(g_x_bptt)
        print(f"{kind} beta={beta}: |dC/dx| EP / BPTT = {ratio:.5f}, rel err {rel_err(gx, g_x_bptt):.2e}")
    if kind == "ep":  # an energy-based network: EP is the gradient up to O(β²)
        assert rel_err(g_x, g_x_bptt) < 0.05 and rel_err(g_x_small, g_x_bptt) < 1e-3
        assert np.linalg.norm(g_x_small) / np.linalg.norm(g_x_bptt) == pytest.approx(1.0, abs=1e-3)
    # (the dendritic network has no energy: the top-down signal reaching the input is scaled
    # by α per layer, so its EP input gradient is a different learning signal, ≈ α·|BPTT|)


def test_block_needs_the_symmetric_estimator():
    m = ep_jax.build_model("ep", sizes=(4, 3, 2))
    for est in (ep_jax.Estimator("one_sided"), ep_jax.Estimator("bptt"), ep_jax.Estimator("chl")):
        with pytest.raises(ValueError, match="Estimator\\('symmetric'"):
            make_ep_block(m, est)


def test_flax_block_initialises_the_model_once(monkeypatch):
    """Params and masks come from ONE `model.init` call with one key: the masks the block
    holds are exactly `model.init(that key)[1]["masks"]`, and the weights its params."""
    from ep_jax.models import DendriticModel

    calls = []
    original = DendriticModel.init

    def spy(self, key, dtype=None, **settings):
        if not isinstance(key, jax.core.Tracer):  # flax checks shapes with an abstract (eval_shape) call
            calls.append(key)
        return original(self, key, dtype, **settings)

    monkeypatch.setattr(DendriticModel, "init", spy)
    blk = EPBlock(
        sizes=(6, 8, 3),
        kind="dendritic",
        t_free=5,
        t_nudge=2,
        settings=(("alpha", 0.4),),
        model_kwargs=(("basal_branches", 3),),
    )
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 6))
    variables = blk.init(jax.random.PRNGKey(0), x)
    assert len(calls) == 1, f"model.init called {len(calls)} times"
    params, buffers = original(blk.model(), calls[0], jnp.float32, alpha=0.4)
    jax.tree.map(np.testing.assert_array_equal, variables["buffers"]["state"]["masks"], buffers["masks"])
    jax.tree.map(np.testing.assert_array_equal, variables["params"]["ep"], params)
    assert float(variables["buffers"]["state"]["alpha"]) == pytest.approx(0.4)
    calls.clear()
    blk.apply(variables, x)
    assert not calls  # applying never re-draws


@pytest.mark.parametrize(
    "x_dtype,param_dtype,expect",
    [("float64", None, "float64"), ("float32", None, "float32"), ("float64", "float32", "float32")],
)
def test_flax_block_dtypes(x_dtype, param_dtype, expect, x64):
    """Weights and buffers take `param_dtype`, by default the input's (float64 under
    jax.enable_x64 with float64 inputs); the output follows the computation."""
    blk = EPBlock(
        sizes=(6, 8, 3),
        kind="dendritic",
        t_free=5,
        t_nudge=2,
        model_kwargs=(("basal_branches", 3),),
        param_dtype=None if param_dtype is None else jnp.dtype(param_dtype),
    )
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 6), jnp.dtype(x_dtype))
    variables = jax.jit(blk.init)(jax.random.PRNGKey(0), x)
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.dtype(expect), leaf.dtype
    out, g = jax.jit(lambda v: (blk.apply(v, x), jax.grad(lambda v: jnp.sum(blk.apply(v, x)))(v)))(variables)
    assert out.shape == (2, 3) and out.dtype == jnp.result_type(jnp.dtype(x_dtype), jnp.dtype(expect))
    for leaf in jax.tree.leaves(g["params"]):
        assert leaf.dtype == jnp.dtype(expect)
