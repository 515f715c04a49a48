"""Models against independently written energies (SPEC §2, §3)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ep_jax
from ep_jax import activations, dendrites, dynamics, losses
from conftest import random_state

SIZES = [(7, 6, 5, 4), (9, 8, 3)]


def phi_ep(params, x, s, y1h, beta):
    """Φ of SPEC §2 written out directly, summed over the batch."""
    prev = x
    total = 0.0
    for p, sl in zip(params, s):
        total = total + jnp.sum(sl * (jnp.einsum("bi,ij->bj", prev, p["w"]) + p["b"]))
        prev = sl
    return total - beta * jnp.sum(0.5 * (s[-1] - y1h) ** 2)


@pytest.mark.parametrize("sizes", SIZES)
def test_ep_drive_is_grad_of_independent_phi(sizes, x64):
    model = ep_jax.build_model("ep", sizes=sizes)
    params, buffers = model.init(jax.random.PRNGKey(0), jnp.float64)
    hyper = ep_jax.make_hyper(model, beta=0.3)
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, sizes[0]), jnp.float64)
    y1h = model.one_hot(jnp.array([0, 2, 1]), jnp.float64)
    s = random_state(jax.random.PRNGKey(2), model, 3, jnp.float64)
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    for beta in (0.0, 0.3):
        h = model.drives(eff, ctx, s, y1h, beta, hyper)
        ref = jax.grad(phi_ep, argnums=2)(params, x, s, y1h, beta)
        for hl, rl in zip(h, ref):
            np.testing.assert_allclose(hl, rl, rtol=1e-12, atol=1e-12)
        # the primitive the estimators differentiate is the same Φ, batch-averaged
        np.testing.assert_allclose(model.primitive(eff, ctx, s, y1h, beta, hyper),
                                   phi_ep(params, x, s, y1h, beta) / 3, rtol=1e-12)
    # and its parameter gradient too
    g = jax.grad(lambda p: model.primitive(p, model.input_drive(p, x), s, y1h, 0.3, hyper))(params)
    gr = jax.grad(lambda p: phi_ep(p, x, s, y1h, 0.3) / 3)(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), g, gr)


def test_ep_feedback_scale_gamma(x64):
    """γ scales only the top-down term (paper 003): h_l = W_l s_{l−1} + b_l + γ W_{l+1}ᵀ s_{l+1}."""
    model = ep_jax.build_model("ep", sizes=(5, 4, 3))
    params, _ = model.init(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 5), jnp.float64)
    s = random_state(jax.random.PRNGKey(2), model, 2, jnp.float64)
    h = model.drives(params, model.input_drive(params, x), s, None, 0.0,
                     ep_jax.make_hyper(model, gamma=0.37))
    w1, b1, w2, b2 = (np.asarray(params[i][k]) for i in (0, 1) for k in ("w", "b"))
    np.testing.assert_allclose(h[0], x @ w1 + b1 + 0.37 * np.asarray(s[1]) @ w2.T, rtol=1e-12)
    np.testing.assert_allclose(h[1], np.asarray(s[0]) @ w2 + b2, rtol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_loss_grad_is_autodiff(loss, x64):
    s = jax.random.normal(jax.random.PRNGKey(0), (4, 6), jnp.float64)
    y1h = jax.nn.one_hot(jnp.array([0, 5, 2, 2]), 6, dtype=jnp.float64)
    ref = jax.grad(lambda s: jnp.sum(losses.loss(loss, s, y1h)))(s)
    np.testing.assert_allclose(losses.loss_grad(loss, s, y1h), ref, rtol=1e-12, atol=1e-14)


def test_hard_sigmoid_is_clip():
    u = jnp.linspace(-2, 3, 1001)
    np.testing.assert_allclose(activations.hard_sigmoid(u), np.clip(np.asarray(u), 0, 1), atol=1e-7)


def dendritic_map_loops(w, mask, c, u, K):
    """D(u)_j = (1/K) Σ_k ReLU((m_jk ⊙ w_jk)·u + c_jk), one branch at a time (numpy)."""
    w, mask, u = np.asarray(w), np.asarray(mask), np.asarray(u)
    m, nK = w.shape
    out = np.zeros((u.shape[0], nK // K))
    for j in range(nK // K):
        for k in range(K):
            col = j * K + k
            z = u @ (mask[:, col] * w[:, col]) + (0.0 if c is None else np.asarray(c)[col])
            out[:, j] += np.maximum(z, 0.0) / K
    return out


def phi_dendritic_layers(model, params, masks, x, s, y1h, beta, alpha):
    """Per-layer primitives φ_l of SPEC §3 with the loop-written dendritic maps."""
    L = model.n_layers
    K_b, K_a = model.basal_branches, model.apical_branches
    prev = [x] + list(s[:-1])
    phis = []
    for l in range(L):
        b = params["basal"][l]
        h = dendritic_map_loops(b["w"], masks["basal"][l], b["c"], prev[l], K_b)
        if l < L - 1:
            h = h + alpha * dendritic_map_loops(params["apical"][l]["w"], masks["apical"][l], None, s[l + 1], K_a)
        phis.append(h)
    return phis


@pytest.mark.parametrize("apical_dense", [False, True])
def test_dendritic_drives_match_loop_formula(apical_dense, x64):
    model = ep_jax.build_model("dendritic", sizes=(7, 6, 5, 4), basal_branches=3,
                               apical_branches=2, sparsity=0.5, apical_dense=apical_dense)
    params, masks = model.init(jax.random.PRNGKey(3), jnp.float64)
    hyper = ep_jax.make_hyper(model, alpha=0.2)
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 7), jnp.float64)
    y1h = model.one_hot(jnp.array([0, 3, 1]), jnp.float64)
    s = random_state(jax.random.PRNGKey(2), model, 3, jnp.float64)
    eff = model.prepare(params, masks)
    h = model.drives(eff, model.input_drive(eff, x), s, y1h, 0.25, hyper)
    ref = phi_dendritic_layers(model, params, masks, x, s, y1h, 0.25, 0.2)
    ref[-1] = ref[-1] - 0.25 * (np.asarray(s[-1]) - np.asarray(y1h))
    for hl, rl in zip(h, ref):
        np.testing.assert_allclose(hl, rl, rtol=1e-12, atol=1e-12)
    # each drive is the partial of its own layer primitive: h_l = ∂φ_l/∂s_l
    def phi_l(sl, l):
        s2 = tuple(sl if i == l else si for i, si in enumerate(s))
        ff = model.feedforward(eff, model.input_drive(eff, x), s2)
        if l < model.n_layers - 1:
            return jnp.sum(sl * (ff[l] + 0.2 * model._apical(eff, l, s2[l + 1])))
        return jnp.sum(sl * ff[l]) + model.output_term(sl, y1h, 0.25)
    for l in range(model.n_layers):
        np.testing.assert_allclose(jax.grad(phi_l)(s[l], l), h[l], rtol=1e-12, atol=1e-12)
    if apical_dense:
        assert all(np.all(np.asarray(m) == 1) for m in masks["apical"])


@pytest.mark.parametrize("m,p", [(784, 0.5), (256, 0.5), (10, 0.5), (7, 0.5), (13, 0.3), (5, 0.01), (9, 1.0)])
def test_mask_has_exactly_round_pm_ones_per_branch(m, p):
    keep = max(1, round(p * m))
    mask = np.asarray(dendrites.sample_mask(jax.random.PRNGKey(m), m, 40, keep))
    assert mask.shape == (m, 40)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    np.testing.assert_array_equal(mask.sum(axis=0), keep)
    assert dendrites.n_kept(m, p) == keep


def test_model_masks_and_init_ranges():
    model = ep_jax.build_model("dendritic", sizes=(784, 256, 256, 10))
    params, masks = model.init(jax.random.PRNGKey(0))
    for l, (m, n) in enumerate(zip(model.sizes, model.sizes[1:])):
        mk = np.asarray(masks["basal"][l])
        assert mk.shape == (m, n * 8)
        np.testing.assert_array_equal(mk.sum(0), round(0.5 * m))
        w, c = np.asarray(params["basal"][l]["w"]), np.asarray(params["basal"][l]["c"])
        assert np.abs(w).max() <= 1 / np.sqrt(m) and np.abs(w).max() > 0.9 / np.sqrt(m)
        assert np.abs(c).max() <= 1 / np.sqrt(round(0.5 * m)) and np.abs(c).max() > 0.9 / np.sqrt(round(0.5 * m))
    for l in range(model.n_layers - 1):
        mk = np.asarray(masks["apical"][l])
        assert mk.shape == (model.sizes[l + 2], model.sizes[l + 1] * 2)
        np.testing.assert_array_equal(mk.sum(0), round(0.5 * model.sizes[l + 2]))
    # branches of one soma draw different positions (independent per branch)
    mk = np.asarray(masks["basal"][0])
    assert len({tuple(np.flatnonzero(mk[:, j])) for j in range(64)}) == 64


@pytest.mark.parametrize("kind", ["ep", "dendritic"])
def test_same_seed_same_params_and_masks(kind):
    model = ep_jax.build_model(kind, sizes=(20, 16, 8))
    a = model.init(jax.random.PRNGKey(7))
    b = model.init(jax.random.PRNGKey(7))
    c = model.init(jax.random.PRNGKey(8))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(jax.tree.leaves(a[0])[0], jax.tree.leaves(c[0])[0])


def test_step_at_dt_one_is_exactly_reference_update():
    model = ep_jax.build_model("dendritic", sizes=(12, 10, 6))
    params, masks = model.init(jax.random.PRNGKey(0))
    hyper = ep_jax.make_hyper(model, dt=1.0)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 12))
    s = random_state(jax.random.PRNGKey(2), model, 4)
    eff = model.prepare(params, masks)
    ctx = model.input_drive(eff, x)
    new = dynamics.step(model, eff, ctx, s, None, 0.0, hyper)
    h = model.drives(eff, ctx, s, None, 0.0, hyper)
    for nl, hl, act in zip(new, h, model.layer_activations()):
        np.testing.assert_array_equal(nl, act(hl))


def test_per_neuron_dt_hand_computed_step(x64):
    model = ep_jax.build_model("ep", sizes=(3, 4, 2), activation="tanh")
    params, _ = model.init(jax.random.PRNGKey(0), jnp.float64)
    dt1 = jnp.array([0.1, 0.5, 1.0, 0.25])
    hyper = ep_jax.make_hyper(model, dt=[dt1, 0.3])
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 3), jnp.float64)
    s = random_state(jax.random.PRNGKey(2), model, 2, jnp.float64)
    new = dynamics.step(model, params, model.input_drive(params, x), s, None, 0.0, hyper)
    w1, b1, w2, b2 = (np.asarray(params[i][k]) for i in (0, 1) for k in ("w", "b"))
    s1, s2 = np.asarray(s[0]), np.asarray(s[1])
    h1 = x @ w1 + b1 + s2 @ w2.T
    h2 = s1 @ w2 + b2
    np.testing.assert_allclose(new[0], (1 - np.asarray(dt1)) * s1 + np.asarray(dt1) * np.tanh(h1), rtol=1e-12)
    np.testing.assert_allclose(new[1], 0.7 * s2 + 0.3 * np.tanh(h2), rtol=1e-12)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="activation"):
        ep_jax.build_model("ep", sizes=(4, 3), activation="swish")
    with pytest.raises(ValueError, match="model"):
        ep_jax.build_model("transformer", sizes=(4, 3))
    with pytest.raises(ValueError, match="loss"):
        ep_jax.build_model("ep", sizes=(4, 3), loss="hinge")
    with pytest.raises(ValueError, match="sizes"):
        ep_jax.build_model("ep", sizes=(4,))
    with pytest.raises(ValueError, match="sparsity"):
        ep_jax.build_model("dendritic", sizes=(4, 3), sparsity=0.0)
