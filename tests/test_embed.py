"""EP as a layer: custom VJP, pipelines, the Flax wrapper, jit/vmap/grad together."""
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ep_jax
from ep_jax import checks
from ep_jax.layer import make_ep_block
from ep_jax.nn import EPBlock
from conftest import assert_trees_close, synthetic_problem


def setup(kind, beta, activation="sigmoid"):
    m = ep_jax.build_model(kind, sizes=(20, 16, 12, 5), activation=activation)
    h = ep_jax.make_hyper(m, beta=beta, lr=0.1)
    p, b = m.init(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 20), jnp.float64)
    y = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 5)
    return m, h, p, b, x, y


def rel_err(a, b):
    a, b = (np.concatenate([np.ravel(l) for l in jax.tree.leaves(t)]) for t in (a, b))
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("kind", ["ep", "dendritic"])
def test_custom_vjp_matches_direct_symmetric_estimate(kind, x64):
    """Downstream MSE: the VJP nudges with the cost linearised at the free state, the
    direct estimate with the MSE itself; the two differ by O(β) relatively."""
    errs = []
    for beta in (1e-2, 1e-3):
        m, h, p, b, x, y = setup(kind, beta)
        blk = make_ep_block(m, 200, 20)
        g = jax.grad(lambda p: jnp.mean(m.cost(blk(p, b, x, h), m.one_hot(y, jnp.float64))))(p)
        gd, _ = ep_jax.estimate(ep_jax.Estimator("symmetric", 200, 20), m, p, b, x, y, h)
        errs.append(rel_err(g, gd))
    assert errs[0] < 1e-3 and errs[1] < errs[0] / 5, errs
    # forward value is the free equilibrium itself
    s = ep_jax.predict(m, p, b, x, h, 200)
    np.testing.assert_array_equal(blk(p, b, x, h), s[-1])


def test_custom_vjp_is_exact_for_a_linear_downstream_cost(x64):
    """For C = ⟨c, s_L⟩ the VJP's nudged phases are written out here step by step."""
    m, h, p, b, x, _ = setup("ep", 0.05)
    c = jax.random.normal(jax.random.PRNGKey(5), (32, 5), jnp.float64)
    blk = make_ep_block(m, 100, 15)
    g = jax.grad(lambda p: jnp.sum(c * blk(p, b, x, h)))(p)
    act = jax.nn.sigmoid
    s0 = ep_jax.predict(m, p, b, x, h, 100)

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
    ref = tuple({"w": -(prev(sp)[l].T @ sp[l] - prev(sm)[l].T @ sm[l]) / (2 * 0.05 * 32),
                 "b": -(sp[l].sum(0) - sm[l].sum(0)) / (2 * 0.05 * 32)} for l in range(3))
    assert_trees_close(g, ref, rtol=1e-9, atol=1e-12)


def test_custom_vjp_matches_bptt(x64):
    m, h, p, b, x, y = setup("ep", 0.01)
    blk = make_ep_block(m, 200, 20)
    g = jax.grad(lambda p: jnp.mean(m.cost(blk(p, b, x, h), m.one_hot(y, jnp.float64))))(p)
    gb, _ = ep_jax.estimate(ep_jax.Estimator("bptt", 200, 20), m, p, b, x, y, h)
    for name, r in checks.compare(g, gb).items():
        assert r["cosine"] > 0.99, (name, r)


def test_pipeline_gradients_upstream_and_in_block(x64):
    """A trainable feature map before the block gets ordinary gradients through the EP
    estimate of ∂C/∂x; compare with BPTT through the whole free phase."""
    m, h, p, b, x, y = setup("ep", 0.01)
    wf = 0.3 * jax.random.normal(jax.random.PRNGKey(7), (20, 20), jnp.float64)
    blk = make_ep_block(m, 200, 20)
    y1h = m.one_hot(y, jnp.float64)

    def loss_ep(wf, p):
        return jnp.mean(m.cost(blk(p, b, jnp.tanh(x @ wf), h), y1h))

    def loss_bptt(wf, p):
        s = ep_jax.predict(m, p, b, jnp.tanh(x @ wf), h, 200)
        return jnp.mean(m.cost(s[-1], y1h))
    g_ep = jax.grad(loss_ep, argnums=(0, 1))(wf, p)
    g_bp = jax.grad(loss_bptt, argnums=(0, 1))(wf, p)
    for name, r in checks.compare(g_ep, g_bp).items():
        assert r["cosine"] > 0.99, (name, r)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.sigmoid(nn.Dense(16)(x))
        return EPBlock(sizes=(16, 24, 4), kind="dendritic", t_free=20, t_nudge=5, beta=0.2,
                       model_kwargs=(("basal_branches", 4),))(h)


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
    for epoch in range(6):
        for i in range(0, len(ytr), 32):
            params, opt, l = step(params, opt, xtr[i:i + 32], ytr[i:i + 32])
    assert acc(params) > 0.85 and acc(params) > acc0 + 0.3, (acc0, acc(params))
    # round trip through flax.serialization, bit for bit, masks included
    full = {"params": params, "buffers": buffers}
    blob = flax.serialization.to_bytes(full)
    back = flax.serialization.from_bytes(jax.tree.map(jnp.zeros_like, full), blob)
    jax.tree.map(np.testing.assert_array_equal, back, full)
    state = flax.serialization.msgpack_restore(blob)
    np.testing.assert_array_equal(state["buffers"]["EPBlock_0"]["masks"]["basal"]["0"],
                                  buffers["EPBlock_0"]["masks"]["basal"][0])


def test_jit_vmap_grad_together():
    """A batch of 3 models (stacked params), gradients of each via the EP VJP, under jit."""
    m = ep_jax.build_model("ep", sizes=(8, 10, 3))
    h = ep_jax.make_hyper(m, beta=0.1)
    blk = make_ep_block(m, 20, 5)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    ps = jax.vmap(lambda k: m.init(k)[0])(keys)
    x = jax.random.uniform(jax.random.PRNGKey(1), (6, 8))
    y1h = jax.nn.one_hot(jnp.arange(6) % 3, 3)
    loss = lambda p: jnp.mean(jnp.sum((blk(p, {}, x, h) - y1h) ** 2, -1)) / 2
    g = jax.jit(jax.vmap(jax.grad(loss)))(ps)
    for i in range(3):
        gi = jax.grad(loss)(jax.tree.map(lambda a: a[i], ps))
        assert_trees_close(jax.tree.map(lambda a: a[i], g), gi, rtol=1e-5, atol=1e-7)
    assert not np.allclose(g[0]["w"][0], g[0]["w"][1])
