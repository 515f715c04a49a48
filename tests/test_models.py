"""Models against independently written energies (docs/equations.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_state

import ep_jax
from ep_jax import activations, dendrites, dynamics, losses

SIZES = [(7, 6, 5, 4), (9, 8, 3)]


def phi_ep(params, x, s, y1h, beta, loss="mse"):
    """Φ of the standard network (docs/equations.md) written out directly, summed over the batch."""
    prev = x
    total = 0.0
    for p, sl in zip(params, s):
        total = total + jnp.sum(sl * (jnp.einsum("bi,ij->bj", prev, p["w"]) + p["b"]))
        prev = sl
    if loss == "mse":
        return total - beta * jnp.sum(0.5 * (s[-1] - y1h) ** 2)
    logp = s[-1] - jnp.log(jnp.sum(jnp.exp(s[-1]), axis=-1, keepdims=True))
    return total + beta * jnp.sum(y1h * logp)


@pytest.mark.parametrize("sizes,loss", [(SIZES[0], "mse"), (SIZES[1], "mse"), (SIZES[0], "ce")])
def test_ep_drive_is_grad_of_independent_phi(sizes, loss, x64):
    model = ep_jax.build_model("ep", sizes=sizes, loss=loss)
    # cross-entropy reads the raw output drive; MSE passes it through σ
    assert model.out_activation_name == ("identity" if loss == "ce" else "hard_sigmoid")
    params, buffers = model.init(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, sizes[0]), jnp.float64)
    y1h = model.one_hot(jnp.array([0, 2, 1]), jnp.float64)
    s = random_state(jax.random.PRNGKey(2), model, 3, jnp.float64)

    def prim(p, beta):
        eff = model.prepare(p, buffers)
        return model.primitive(eff, model.input_drive(eff, x), s, y1h, beta)

    @jax.jit
    def library_and_reference(beta):
        eff = model.prepare(params, buffers)
        return (
            (
                model.drives(eff, model.input_drive(eff, x), s, y1h, beta),
                prim(params, beta),
                jax.grad(prim)(params, beta),
            ),
            (
                jax.grad(phi_ep, argnums=2)(params, x, s, y1h, beta, loss),
                phi_ep(params, x, s, y1h, beta, loss) / 3,
                jax.grad(lambda p: phi_ep(p, x, s, y1h, beta, loss) / 3)(params),
            ),
        )

    for beta in (0.0, 0.3):
        (h, phi, g), (ref, phi_ref, g_ref) = library_and_reference(beta)
        for hl, rl in zip(h, ref):
            np.testing.assert_allclose(hl, rl, rtol=1e-12, atol=1e-12)
        # the primitive the estimators differentiate is the same Φ, batch-averaged,
        np.testing.assert_allclose(phi, phi_ref, rtol=1e-12)
        # and its parameter gradient too
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14), g, g_ref)


def test_ep_feedback_scale_gamma(x64):
    """γ scales only the top-down term (paper 003): h_l = W_l s_{l−1} + b_l + γ W_{l+1}ᵀ s_{l+1}."""
    model = ep_jax.build_model("ep", sizes=(5, 4, 3))
    params, buffers = model.init(jax.random.PRNGKey(0), jnp.float64, gamma=0.37)
    assert float(buffers["gamma"]) == 0.37 and buffers["gamma"].dtype == jnp.float64
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 5), jnp.float64)
    s = random_state(jax.random.PRNGKey(2), model, 2, jnp.float64)
    eff = model.prepare(params, buffers)
    h = model.drives(eff, model.input_drive(eff, x), s, None, 0.0)
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
    """Per-layer primitives φ_l of the dendritic network (docs/equations.md) with the loop-written dendritic maps
    (params and masks converted to the reference layout, branch (j, k) in column j·K+k)."""
    L = model.n_layers
    K_b, K_a = model.basal_branches, model.apical_branches
    ref = lambda a, n, K: np.asarray(dendrites.to_reference_layout(a, n, K))
    prev = [x] + list(s[:-1])
    phis = []
    for l in range(L):
        b, n = params["basal"][l], model.sizes[l + 1]
        h = dendritic_map_loops(ref(b["w"], n, K_b), ref(masks["basal"][l], n, K_b), ref(b["c"], n, K_b), prev[l], K_b)
        if l < L - 1:
            h = h + alpha * dendritic_map_loops(
                ref(params["apical"][l]["w"], n, K_a), ref(masks["apical"][l], n, K_a), None, s[l + 1], K_a
            )
        phis.append(h)
    return phis


@pytest.mark.parametrize("apical_dense", [False, True])
def test_dendritic_drives_match_loop_formula(apical_dense, x64):
    model = ep_jax.build_model(
        "dendritic", sizes=(7, 6, 5, 4), basal_branches=3, apical_branches=2, sparsity=0.5, apical_dense=apical_dense
    )
    params, buffers = model.init(jax.random.PRNGKey(3), jnp.float64, alpha=0.2)
    masks = buffers["masks"]
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 7), jnp.float64)
    y1h = model.one_hot(jnp.array([0, 3, 1]), jnp.float64)
    s = random_state(jax.random.PRNGKey(2), model, 3, jnp.float64)
    eff = model.prepare(params, buffers)
    h = model.drives(eff, model.input_drive(eff, x), s, y1h, 0.25)
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

    partials = jax.jit(lambda s: [jax.grad(phi_l)(s[l], l) for l in range(model.n_layers)])(s)
    for l in range(model.n_layers):
        np.testing.assert_allclose(partials[l], h[l], rtol=1e-12, atol=1e-12)
    if apical_dense:
        assert all(np.all(np.asarray(m) == 1) for m in masks["apical"])


def test_layout_conversion_indices():
    """Branch-major column k·n + j holds reference column j·K + k; the two maps invert."""
    n, K = 5, 3
    ref = jnp.arange(2 * n * K).reshape(2, n * K)
    bm = np.asarray(dendrites.from_reference_layout(ref, n, K))
    for j in range(n):
        for k in range(K):
            np.testing.assert_array_equal(bm[:, k * n + j], np.asarray(ref)[:, j * K + k])
    np.testing.assert_array_equal(dendrites.to_reference_layout(bm, n, K), ref)


@pytest.mark.parametrize(
    "m,n,K,bias,dense",
    [(13, 6, 3, True, False), (9, 4, 2, False, False), (7, 5, 1, True, False), (6, 4, 2, False, True)],
)
def test_init_is_reference_draw_permuted(m, n, K, bias, dense):
    """Init in the branch-major layout, converted back, equals a draw in the reference
    layout (branch (j, k) in column j·K + k) written out independently."""
    key = jax.random.PRNGKey(11)
    params, mask = dendrites.init(key, m, n, K, 0.5, bias=bias, dense=dense)
    k_w, k_c, k_m = jax.random.split(key, 3)
    keep = m if dense else max(1, round(0.5 * m))
    w_ref = jax.random.uniform(k_w, (m, n * K), jnp.float32, -1 / np.sqrt(m), 1 / np.sqrt(m))
    mask_ref = jnp.ones((m, n * K)) if dense else dendrites.sample_mask(k_m, m, n * K, keep)
    back = lambda a: np.asarray(dendrites.to_reference_layout(a, n, K))
    assert params["w"].shape == mask.shape == (m, K * n)
    np.testing.assert_array_equal(back(params["w"]), w_ref)
    np.testing.assert_array_equal(back(mask), mask_ref)
    if bias:
        c_ref = jax.random.uniform(k_c, (n * K,), jnp.float32, -1 / np.sqrt(keep), 1 / np.sqrt(keep))
        np.testing.assert_array_equal(back(params["c"]), c_ref)
    else:
        assert "c" not in params


@pytest.mark.parametrize("n,K,bias", [(6, 3, True), (4, 8, True), (5, 2, False), (3, 1, True)])
def test_apply_matches_loop_formula_on_reference_layout(n, K, bias, x64):
    m = 11
    params, mask = dendrites.init(jax.random.PRNGKey(5), m, n, K, 0.5, bias=bias, dtype=jnp.float64)
    u = jax.random.normal(jax.random.PRNGKey(6), (4, m), jnp.float64)
    c = params.get("c")
    out = dendrites.apply(dendrites.masked_kernel(params, mask), c, u, K)
    back = lambda a: np.asarray(dendrites.to_reference_layout(a, n, K))
    ref = dendritic_map_loops(back(params["w"]), back(mask), None if c is None else back(c), u, K)
    assert out.shape == (4, n)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


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
    params, buffers = model.init(jax.random.PRNGKey(0))
    masks = buffers["masks"]
    assert set(buffers) == {"masks", "alpha"} and float(buffers["alpha"]) == pytest.approx(0.2)
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
    mk = np.asarray(dendrites.to_reference_layout(masks["basal"][0], 256, 8))
    assert len({tuple(np.flatnonzero(mk[:, j])) for j in range(64)}) == 64


@pytest.mark.parametrize("kind", ["ep", "dendritic"])
def test_same_seed_same_params_and_masks(kind):
    model = ep_jax.build_model(kind, sizes=(12, 10, 8, 4))
    a = model.init(jax.random.PRNGKey(7))
    b = model.init(jax.random.PRNGKey(7))
    c = model.init(jax.random.PRNGKey(8))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(jax.tree.leaves(a[0])[0], jax.tree.leaves(c[0])[0])


def test_step_at_dt_one_is_exactly_reference_update():
    model = ep_jax.build_model("dendritic", sizes=(12, 10, 8, 4))
    params, buffers = model.init(jax.random.PRNGKey(0))
    rx = ep_jax.make_relaxation(model, dt=1.0)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 12))
    s = random_state(jax.random.PRNGKey(2), model, 4)
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    new = dynamics.step(model, eff, ctx, s, None, 0.0, rx.dt)
    h = model.drives(eff, ctx, s, None, 0.0)
    for nl, hl, act in zip(new, h, model.layer_activations()):
        np.testing.assert_array_equal(nl, act(hl))


def test_per_neuron_dt_hand_computed_step(x64):
    model = ep_jax.build_model("ep", sizes=(3, 4, 2), activation="tanh")
    params, buffers = model.init(jax.random.PRNGKey(0), jnp.float64)
    dt1 = jnp.array([0.1, 0.5, 1.0, 0.25])
    rx = ep_jax.make_relaxation(model, dt=[dt1, 0.3])
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 3), jnp.float64)
    s = random_state(jax.random.PRNGKey(2), model, 2, jnp.float64)
    eff = model.prepare(params, buffers)
    new = dynamics.step(model, eff, model.input_drive(eff, x), s, None, 0.0, rx.dt)
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


@pytest.mark.parametrize("apical_dense", [False, True])
def test_dendritic_parameter_and_input_gradients_match_loop_formula(apical_dense, x64):
    """∂_θ Φ and ∂_x Φ of the dendritic primitive (what every EP estimator differences)
    against the loop-written derivative of the maps in the reference layout:
    ∂/∂w_{i,jk} = (1/B) Σ_b s_bj/K · 1[z_bjk > 0] m_{i,jk} u_bi, and likewise for c and u."""
    from conftest import NumpyNet

    model = ep_jax.build_model(
        "dendritic", sizes=(7, 6, 5, 4), basal_branches=3, apical_branches=2, apical_dense=apical_dense
    )
    params, buffers = model.init(jax.random.PRNGKey(4), jnp.float64, alpha=0.3)
    x = jax.random.uniform(jax.random.PRNGKey(1), (5, 7), jnp.float64)
    y1h = model.one_hot(jnp.array([0, 3, 1, 2, 2]), jnp.float64)
    s = random_state(jax.random.PRNGKey(2), model, 5, jnp.float64)

    def prim(p, x):
        eff = model.prepare(p, buffers)
        return model.primitive(eff, model.input_drive(eff, x), s, y1h, 0.25)

    g, gx = jax.jit(jax.grad(prim, argnums=(0, 1)))(params, x)
    net = NumpyNet(model, params, buffers)
    ref, ref_x = net.phi_grads(x, [np.asarray(a) for a in s])
    ref = net.to_lib(ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14), g, ref)
    np.testing.assert_allclose(gx, ref_x, rtol=1e-11, atol=1e-14)
    # every leaf is exercised (no all-zero leaf hiding a broken formula)
    assert all(np.abs(np.asarray(a)).max() > 1e-3 for a in jax.tree.leaves(ref))


@pytest.mark.parametrize("kind", ["ep", "dendritic"])
def test_unhoisted_reference_computes_the_same(kind, x64):
    """`reference.Unhoisted` (every loop invariant recomputed per step) gives the model's
    drives, primitive and feedforward drives, and the same relaxed states."""
    model = ep_jax.build_model(kind, sizes=(20, 16, 12, 5))
    ref = ep_jax.reference.Unhoisted(model)
    assert isinstance(model, ep_jax.Model) and isinstance(ref, ep_jax.Model)
    assert (ref.sizes, ref.n_layers, ref.state_sizes, ref.n_classes) == (
        model.sizes,
        model.n_layers,
        model.state_sizes,
        model.n_classes,
    )
    params, buffers = ref.init(jax.random.PRNGKey(0), jnp.float64)
    jax.tree.map(np.testing.assert_array_equal, (params, buffers), model.init(jax.random.PRNGKey(0), jnp.float64))
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 20), jnp.float64)
    y1h = model.one_hot(jnp.array([0, 1, 4, 1]), jnp.float64)
    s = random_state(jax.random.PRNGKey(2), model, 4, jnp.float64)
    rx = ep_jax.make_relaxation(model, dt=0.5)

    @jax.jit
    def everything(params):
        out = []
        for m in (model, ref):
            e = m.prepare(params, buffers)
            c = m.input_drive(e, x)
            out.append(
                (
                    m.drives(e, c, s, y1h, 0.2),
                    m.feedforward(e, c, s),
                    m.primitive(e, c, s, y1h, 0.2),
                    dynamics.free_phase(m, e, c, rx.dt, 15),
                )
            )
        return out

    a, b = everything(params)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-13, atol=1e-15), a, b)


def test_settings_are_validated_and_stored_in_buffers():
    ep = ep_jax.build_model("ep", sizes=(4, 3))
    den = ep_jax.build_model("dendritic", sizes=(12, 10, 8, 4))
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['alpha'\] for the 'ep' model"):
        ep.init(jax.random.PRNGKey(0), alpha=0.2)
    with pytest.raises(ValueError, match="unknown setting"):
        den.init(jax.random.PRNGKey(0), gamma=0.5)
    with pytest.raises(ValueError, match="gamma must be finite"):
        ep.init(jax.random.PRNGKey(0), gamma=float("nan"))
    with pytest.raises(ValueError, match="alpha must be a scalar"):
        den.init(jax.random.PRNGKey(0), alpha=jnp.ones(2))
    with pytest.raises(ValueError, match="bad option for the 'ep' model"):
        ep_jax.build_model("ep", sizes=(4, 3), basal_branches=2)
    assert float(ep.init(jax.random.PRNGKey(0))[1]["gamma"]) == 1.0
    assert float(den.init(jax.random.PRNGKey(0), alpha=0.7)[1]["alpha"]) == pytest.approx(0.7)
