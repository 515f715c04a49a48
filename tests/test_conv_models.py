"""Convolutional EP and dendritic convolutional EP models (ep_jax.models.conv,
ep_jax.models.dendritic_conv) against independent computations: numpy loops over positions
and branches (float64), `jax.grad` through the relaxation, and the solo training step."""

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ep_jax
from ep_jax import dynamics, parallel
from ep_jax import sweep as S
from ep_jax.models.conv import ConvEPModel
from ep_jax.models.dendritic_conv import DendriticConvModel

ROOT = Path(__file__).resolve().parents[1]

# 8x8x2 input; conv 3x3 stride 2 pad 1 -> 4x4x3, max pool -> 2x2x3; conv 2x2 stride 1 pad 1
# -> 3x3x2, avg pool -> 1x1x2 (the odd row/column dropped); fc 4
GEOM = dict(
    input_shape=(8, 8, 2),
    channels=(3, 2),
    kernels=(3, 2),
    strides=(2, 1),
    paddings=(1, 1),
    pools=("max", "avg"),
    fc=(4,),
)
# 7x7x1; conv 3x3 pad 1 -> 7x7x2, max pool -> 3x3x2 (odd dropped); conv 2x2 -> 2x2x3, no pool; fc 5, 3
GEOM2 = dict(
    input_shape=(7, 7, 1),
    channels=(2, 3),
    kernels=(3, 2),
    strides=(1, 1),
    paddings=(1, 0),
    pools=("max", "none"),
    fc=(5, 3),
)


def jinit(model, key, dtype=None, **settings):
    """`model.init` in one compiled call (eagerly, each random draw would compile apart)."""
    return ep_jax.train._jitted_init(model, dtype or ep_jax.models.base.default_float())(key, **settings)


def rand_state(key, model, batch, dtype=jnp.float64):
    keys = jax.random.split(key, model.n_layers)
    return tuple(jax.random.uniform(k, (batch,) + shape, dtype) for k, shape in zip(keys, model.state_shapes))


def tree_cos(a, b):
    u = np.concatenate([np.ravel(np.asarray(l, np.float64)) for l in jax.tree.leaves(a)])
    v = np.concatenate([np.ravel(np.asarray(l, np.float64)) for l in jax.tree.leaves(b)])
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v))), float(np.linalg.norm(u - v) / np.linalg.norm(v))


# --- an independent numpy implementation: explicit loops over output positions ------------


def np_conv(u, w, b, stride, pad):
    """z[b, i, j, o] = Σ_{di, dj, c} u_pad[b, i·s + di, j·s + dj, c] w[di, dj, c, o] + b[o]."""
    B, H, W, _ = u.shape
    k = w.shape[0]
    up = np.pad(u, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    Ho, Wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    z = np.zeros((B, Ho, Wo, w.shape[3]))
    for i in range(Ho):
        for j in range(Wo):
            patch = up[:, i * stride : i * stride + k, j * stride : j * stride + k, :]
            z[:, i, j, :] = np.einsum("bxyc,xyco->bo", patch, w) + (0.0 if b is None else b)
    return z


def np_conv_transpose(dz, w, stride, pad, in_hw):
    """∂/∂u of Σ dz · conv(u; w): each output position sends dz[b, i, j, :] · w back to its patch."""
    B, Ho, Wo, _ = dz.shape
    k = w.shape[0]
    H, W = in_hw
    out = np.zeros((B, H + 2 * pad, W + 2 * pad, w.shape[2]))
    for i in range(Ho):
        for j in range(Wo):
            out[:, i * stride : i * stride + k, j * stride : j * stride + k, :] += np.einsum(
                "bo,xyco->bxyc", dz[:, i, j, :], w
            )
    return out[:, pad : pad + H, pad : pad + W, :]


def np_pool(z, pool):
    """2x2 stride-2 pooling; for max also the one-hot of the first argmax of each window."""
    if pool == "none":
        return z, None
    B, H, W, C = z.shape
    out, onehot = np.zeros((B, H // 2, W // 2, C)), np.zeros((B, H // 2, W // 2, 4, C))
    for i in range(H // 2):
        for j in range(W // 2):
            win = z[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, :].reshape(B, 4, C)  # row-major (di, dj)
            if pool == "max":
                idx = win.argmax(1)  # first maximum
                onehot[:, i, j] = np.arange(4)[None, :, None] == idx[:, None, :]
                out[:, i, j] = win.max(1)
            else:
                out[:, i, j] = win.mean(1)
    return out, onehot


def np_unpool(g, z_shape, pool, onehot=None):
    """∂/∂z of Σ g · pool(z): to the argmax (max), a quarter to each (avg); unmoved (none)."""
    if pool == "none":
        return g
    dz = np.zeros(z_shape)
    B, Hp, Wp, C = g.shape
    for i in range(Hp):
        for j in range(Wp):
            share = onehot[:, i, j] if pool == "max" else np.full((B, 4, C), 0.25)
            dz[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2, :] += (share * g[:, i, j, None, :]).reshape(B, 2, 2, C)
    return dz


def np_conv_ep_drives(model, params, x, s, y1h, beta):
    """h_l = f_l(s_{l−1}) + (∂/∂s_l of s_{l+1}·f_{l+1}(s_l)) − [top] β (s_L − ŷ), by loops."""
    P = [{k: np.asarray(v, np.float64) for k, v in p.items()} for p in params]
    prev = [np.asarray(x, np.float64).reshape((-1,) + model.input_shape)] + [np.asarray(a) for a in s[:-1]]
    s = [np.asarray(a) for a in s]
    ff, fb = [], [np.zeros_like(a) for a in s]
    for l, sy in enumerate(model.synapses[: model.n_layers]):
        if hasattr(sy, "pool"):
            z = np_conv(prev[l], P[l]["w"], P[l]["b"], sy.stride, sy.padding)
            f, onehot = np_pool(z, sy.pool)
            if l > 0:
                dz = np_unpool(s[l], z.shape, sy.pool, onehot)
                fb[l - 1] = np_conv_transpose(dz, P[l]["w"], sy.stride, sy.padding, prev[l].shape[1:3])
        else:
            u = prev[l].reshape(prev[l].shape[0], -1)
            f = u @ P[l]["w"] + P[l]["b"]
            fb[l - 1] = (s[l] @ P[l]["w"].T).reshape(prev[l].shape)
        ff.append(f)
    h = [f + g for f, g in zip(ff, fb)]
    h[-1] = h[-1] - beta * (s[-1] - np.asarray(y1h))
    return h, ff


@pytest.mark.parametrize("geom", [GEOM, GEOM2])
def test_conv_drives_match_numpy_loops(geom, x64):
    """Oracle: numpy loops over output positions (conv, pooling with first-argmax routing,
    transposed conv), float64; also Φ's value and the flat/image input forms."""
    model = ConvEPModel(**geom, activation="sigmoid")
    params, buffers = jinit(model, jax.random.PRNGKey(0), jnp.float64)
    B = 3
    x = jax.random.uniform(jax.random.PRNGKey(1), (B, math.prod(model.input_shape)), jnp.float64)
    y1h = model.one_hot(jnp.array([0, 2, 1]), jnp.float64)
    s = rand_state(jax.random.PRNGKey(2), model, B)

    @jax.jit
    def library(params, x, s):
        eff = model.prepare(params, buffers)
        ctx = model.input_drive(eff, x)
        ctx_img = model.input_drive(eff, x.reshape((B,) + model.input_shape))
        return (
            model.drives(eff, ctx, s, y1h, 0.3),
            ctx,
            ctx_img,
            model.feedforward(eff, ctx, s),
            model.primitive(eff, ctx, s, y1h, 0.3),
        )

    h, ctx, ctx_img, f_lib, phi = library(params, x, s)
    ref, ff = np_conv_ep_drives(model, params, x, s, y1h, 0.3)
    for l, (hl, rl, shape) in enumerate(zip(h, ref, model.state_shapes)):
        assert hl.shape == (B,) + shape
        np.testing.assert_allclose(hl, rl, rtol=1e-12, atol=1e-12, err_msg=f"layer {l + 1}")
    # the image form of the input gives the same drive; Φ = Σ s_l·f_l − β ℓ, batch mean
    np.testing.assert_array_equal(ctx, ctx_img)
    for fl, rl in zip(f_lib, ff):
        np.testing.assert_allclose(fl, rl, rtol=1e-12, atol=1e-12)
    phi_ref = (
        sum(np.sum(np.asarray(a) * f) for a, f in zip(s, ff))
        - 0.3 * 0.5 * np.sum((np.asarray(s[-1]) - np.asarray(y1h)) ** 2)
    ) / B
    np.testing.assert_allclose(phi, phi_ref, rtol=1e-12)


def test_max_pool_feedback_routes_to_the_argmax_only(x64):
    """Layer 2 = 1x1 conv (weight w) + max pool of layer 1: the feedback into layer 1 is
    w·s_2 at the first argmax of each 2x2 window of s_1 and zero elsewhere (a tie goes to
    the first position in row-major order); average pooling spreads w·s_2/4 to all four."""
    for pool in ("max", "avg"):
        model = ConvEPModel(
            input_shape=(4, 4, 1),
            channels=(1, 1),
            kernels=(1, 1),
            strides=(1, 1),
            paddings=(0, 0),
            pools=("none", pool),
            fc=(2,),
            activation="identity",
        )
        params, buffers = jinit(model, jax.random.PRNGKey(0), jnp.float64)
        params = (params[0], {"w": jnp.full((1, 1, 1, 1), 2.0), "b": jnp.zeros(1)}, params[2])
        s1 = jnp.array([[1.0, 5.0, 2.0, 0.0], [3.0, 4.0, 7.0, 7.0], [0.0, 0.0, 9.0, 1.0], [0.0, 0.0, 2.0, 3.0]])[
            None, :, :, None
        ]
        s2 = jnp.array([[1.0, 2.0], [3.0, 4.0]])[None, :, :, None]
        s = (s1, s2, jnp.zeros((1, 2)))

        @jax.jit
        def feedback(params, s):
            eff = model.prepare(params, buffers)
            ctx = model.input_drive(eff, jnp.zeros((1, 16)))
            return model.drives(eff, ctx, s, None, 0.0)[0] - ctx

        fb = np.asarray(feedback(params, s))[0, :, :, 0]
        if pool == "max":
            # windows: [1 5; 3 4] -> (0, 1); [2 0; 7 7] -> the tie's first, (1, 2);
            # [0 0; 0 0] -> the first, (2, 0); [9 1; 2 3] -> (2, 2)
            expect = np.zeros((4, 4))
            expect[0, 1], expect[1, 2], expect[2, 0], expect[2, 2] = 2.0, 4.0, 6.0, 8.0
            np.testing.assert_array_equal(fb, expect)
            assert (fb != 0).sum() == 4
        else:
            np.testing.assert_allclose(fb, np.kron(2.0 * np.asarray(s2)[0, :, :, 0] / 4, np.ones((2, 2))))


@pytest.mark.parametrize("readout", ["none", "softmax"])
def test_symmetric_ep_equals_grad_through_relaxation(readout, x64):
    """Oracle: `jax.grad` of the mean cost through all T1 free steps (bptt_full), float64.

    Tiny energy-based conv net (8x8x2 -> conv/max pool -> conv/avg pool -> fc 3, sigmoid),
    converged free phase (T1 = 40), T2 = 20, β = 1e-3. Measured (2026-12-02): cosine 1 to 12
    digits, relative error ‖g_EP − g_grad‖/‖g_grad‖ = 6.8e-8 (MSE output) and 5.8e-9 (softmax
    readout, whose weights get the readout's gradient); required: cosine > 0.999 and
    relative error < 1e-5."""
    model = ConvEPModel(
        **dict(GEOM, fc=(3,)), activation="sigmoid", loss="ce" if readout == "softmax" else "mse", readout=readout
    )
    params, buffers = jinit(model, jax.random.PRNGKey(3), jnp.float64)
    x = jax.random.uniform(jax.random.PRNGKey(4), (5, 128), jnp.float64)
    y = jnp.array([0, 1, 2, 1, 0])
    rx = ep_jax.make_relaxation(model, beta=1e-3, dt=1.0)
    est = jax.jit(ep_jax.estimate, static_argnums=(0, 1))
    g_ep, aux = est(model, ep_jax.Estimator("symmetric", t_free=40, t_nudge=20), None, params, buffers, x, y, rx)
    g_bp, aux_bp = est(model, ep_jax.Estimator("bptt_full", t_free=40, t_nudge=20), None, params, buffers, x, y, rx)
    cos, rel = tree_cos(g_ep, g_bp)
    print(f"readout={readout}: cosine {cos:.12f}, relative error {rel:.3g}")
    assert cos > 0.999 and rel < 1e-5
    np.testing.assert_allclose(aux.loss, aux_bp.loss, rtol=1e-12)
    for leaf in jax.tree.leaves(g_ep):
        assert np.abs(np.asarray(leaf)).max() > 0


# --- the dendritic conv model ----------------------------------------------------------------


def np_dendritic_conv_basal(w, mask, c, u, sy, K):
    """B(u)[p, ch] = P((1/K) Σ_k ReLU(conv(u; w_{ch,k} ⊙ m_{ch,k})[p] + c_{ch,k})), one branch
    at a time; branch k of channel ch is output channel k·C + ch."""
    C = w.shape[3] // K
    soma = 0.0
    for k in range(K):
        zs = []
        for ch in range(C):
            col = k * C + ch
            zs.append(np_conv(u, (w * mask)[..., col : col + 1], c[col : col + 1], sy.stride, sy.padding))
        soma = soma + np.maximum(np.concatenate(zs, axis=-1), 0.0) / K
    return np_pool(soma, sy.pool)[0]


def np_dendritic_conv_apical(v, mask, u, above, in_hw, K):
    """A(u) = (1/K) Σ_k ReLU(convᵀ(U(u); v_{ch,k} ⊙ m_{ch,k})) with U the copy of each unit
    to its window (transpose of sum pooling), one branch at a time; the apical kernel is
    (k, k, C_above, K·C), branch k of channel ch in column k·C + ch."""
    C = v.shape[3] // K
    z_shape = (u.shape[0],) + tuple(above.conv_shape)
    up = u if above.pool == "none" else np_unpool(u, z_shape, "avg") * 4  # sum-pool transpose
    out = 0.0
    for k in range(K):
        chans = []
        for ch in range(C):
            col = k * C + ch
            kern = (v * mask)[..., col][:, :, None, :]  # (k, k, 1, C_above): one branch
            chans.append(np_conv_transpose(up, kern, above.stride, above.padding, in_hw))
        out = out + np.maximum(np.concatenate(chans, axis=-1), 0.0) / K
    return out


def np_dense_branches(w, mask, c, u, K):
    """(1/K) Σ_k ReLU(u · (m_jk ⊙ w_jk) + c_jk), branch k of soma j in column k·n + j."""
    n = w.shape[1] // K
    out = 0.0
    for k in range(K):
        cols = slice(k * n, (k + 1) * n)
        z = u @ (w * mask)[:, cols] + (0.0 if c is None else c[cols])
        out = out + np.maximum(z, 0.0) / K
    return out


@pytest.mark.parametrize("apical_dense", [False, True])
def test_dendritic_conv_maps_match_loop_over_branches(apical_dense, x64):
    """Oracle: numpy loops over branches and positions; drives h_l = B_l(s_{l−1}) + α A_l(s_{l+1})
    and each drive the partial of its own layer primitive (jax.grad)."""
    model = DendriticConvModel(
        **GEOM2, basal_branches=3, apical_branches=2, sparsity=0.5, apical_dense=apical_dense, activation="sigmoid"
    )
    params, buffers = jinit(model, jax.random.PRNGKey(5), jnp.float64, alpha=0.3)
    masks = buffers["masks"]
    B = 2
    x = jax.random.uniform(jax.random.PRNGKey(6), (B, 49), jnp.float64)
    s = rand_state(jax.random.PRNGKey(7), model, B)
    y1h = model.one_hot(jnp.array([1, 2]), jnp.float64)

    # h_l = ∂φ_l/∂s_l: φ_l = s_l·(B_l + α A_l) (hidden), φ_L = s_L·B_L − β ℓ
    def phi_l(eff, ctx, sl, l):
        s2 = tuple(sl if i == l else si for i, si in enumerate(s))
        ff = model.feedforward(eff, ctx, s2)
        if l < model.n_layers - 1:
            return jnp.sum(sl * (ff[l] + eff["alpha"] * model.apical(eff, l, s2[l + 1])))
        return jnp.sum(sl * ff[l]) + model.output_term(sl, y1h, 0.2)

    @jax.jit
    def library(params, buffers, x, s):
        eff = model.prepare(params, buffers)
        ctx = model.input_drive(eff, x)
        partials = [jax.grad(phi_l, argnums=2)(eff, ctx, s[l], l) for l in range(model.n_layers)]
        return model.drives(eff, ctx, s, y1h, 0.2), partials

    h, partials = library(params, buffers, x, s)
    f = lambda a: np.asarray(a, np.float64)
    prev = [f(x).reshape(B, 7, 7, 1)] + [f(a) for a in s[:-1]]
    ref = []
    for l, sy in enumerate(model.synapses):
        p, m = params["basal"][l], masks["basal"][l]
        if hasattr(sy, "pool"):
            ref.append(np_dendritic_conv_basal(f(p["w"]), f(m), f(p["c"]), prev[l], sy, 3))
        else:
            ref.append(np_dense_branches(f(p["w"]), f(m), f(p["c"]), prev[l].reshape(B, -1), 3))
    for l in range(model.n_layers - 1):
        above, v, m = model.synapses[l + 1], f(params["apical"][l]["w"]), f(masks["apical"][l])
        if hasattr(above, "pool"):
            a = np_dendritic_conv_apical(v, m, f(s[l + 1]), above, model.state_shapes[l][:2], 2)
        else:
            a = np_dense_branches(v, m, None, f(s[l + 1]), 2).reshape((B,) + model.state_shapes[l])
        ref[l] = ref[l] + 0.3 * a
    ref[-1] = ref[-1] - 0.2 * (f(s[-1]) - f(y1h))
    for l, (hl, rl) in enumerate(zip(h, ref)):
        np.testing.assert_allclose(hl, rl, rtol=1e-12, atol=1e-12, err_msg=f"layer {l + 1}")
    if apical_dense:
        assert all(np.all(np.asarray(m) == 1) for m in masks["apical"])
    else:  # every branch keeps exactly round(p·m) of its m inputs
        for mk in list(masks["basal"]) + list(masks["apical"]):
            mk = np.asarray(mk).reshape(-1, mk.shape[-1])
            np.testing.assert_array_equal(mk.sum(0), max(1, round(0.5 * mk.shape[0])))

    for l in range(model.n_layers):
        np.testing.assert_allclose(partials[l], h[l], rtol=1e-12, atol=1e-12)


def test_masks_keep_their_sparsity_through_training():
    """After SGD steps the masks are unchanged, the masked weights keep their init values
    (their gradients are exactly zero) and each effective branch kernel has round(p·m)
    nonzeros at most."""
    model = DendriticConvModel(
        input_shape=(6, 6, 1),
        channels=(3,),
        kernels=(3,),
        strides=(1,),
        paddings=(1,),
        pools=("max",),
        fc=(4, 3),
        basal_branches=2,
        apical_branches=2,
    )
    est = ep_jax.Estimator("symmetric", t_free=8, t_nudge=4)
    opt = ep_jax.optim.sgd(model, lr=0.5, momentum=0.9)
    rx = ep_jax.make_relaxation(model, beta=0.3)
    state0 = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0))
    state = state0
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 36))
    y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 3)
    for t in range(3):
        state, info = ep_jax.train_step_jit(model, est, opt, jax.random.PRNGKey(t), state, x, y, rx)
        assert bool(info.finite)
    jax.tree.map(np.testing.assert_array_equal, state.buffers, state0.buffers)
    masks = state.buffers["masks"]
    moved = 0
    for part in ("basal", "apical"):
        for p0, p1, m in zip(state0.params[part], state.params[part], masks[part]):
            m = np.asarray(m)
            w0, w1 = np.asarray(p0["w"]), np.asarray(p1["w"])
            np.testing.assert_array_equal(w1[m == 0], w0[m == 0])
            moved += int(np.any(w1[m == 1] != w0[m == 1]))
            eff = (w1 * m).reshape(-1, m.shape[-1])
            assert np.all((eff != 0).sum(0) <= max(1, round(0.5 * eff.shape[0])))
    assert moved == 5  # every map learned (3 basal, 2 apical)


# --- everything existing on them ---------------------------------------------------------------

# 6x6x1 -> conv 3x3 pad 1, max pool -> 3x3x2 -> fc 4 -> fc 3 (or the softmax readout 3)
SMALL = dict(input_shape=(6, 6, 1), channels=(2,), kernels=(3,), strides=(1,), paddings=(1,), pools=("max",), fc=(4, 3))
MODELS = {
    "conv": lambda: ConvEPModel(**SMALL),
    "conv-softmax": lambda: ConvEPModel(**SMALL, loss="ce", readout="softmax"),
    "dendritic_conv": lambda: DendriticConvModel(**SMALL, basal_branches=2, apical_branches=2),
    "dendritic_conv-softmax": lambda: DendriticConvModel(**SMALL, basal_branches=2, loss="ce", readout="softmax"),
}
KINDS = [
    ("symmetric", "fixed"),
    ("one_sided", "random_sign"),
    ("chl", "fixed"),
    ("bptt", "fixed"),
    ("bptt_full", "fixed"),
]


@pytest.mark.parametrize("name", list(MODELS))
def test_every_estimator_gives_finite_grads_with_the_params_structure(name):
    model = MODELS[name]()
    params, buffers = jinit(model, jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 36))
    y = jnp.array([0, 1, 2, 0])
    rx = ep_jax.make_relaxation(model, beta=0.2, dt=0.7)
    for kind, nudge in KINDS:
        est = ep_jax.Estimator(kind, t_free=6, t_nudge=4, nudge=nudge)  # 4 steps reach layer 1 of 3
        g, aux = jax.jit(ep_jax.estimate, static_argnums=(0, 1))(
            model, est, jax.random.PRNGKey(2), params, buffers, x, y, rx
        )
        assert jax.tree.structure(g) == jax.tree.structure(params), kind
        for a, p in zip(jax.tree.leaves(g), jax.tree.leaves(params)):
            assert a.shape == p.shape and bool(jnp.all(jnp.isfinite(a))), kind
        assert sum(float(jnp.linalg.norm(a)) for a in jax.tree.leaves(g)) > 0, kind
        assert aux.s_free[0].shape == (4,) + model.state_shapes[0]
        assert 0 <= int(aux.correct) <= 4 and np.isfinite(float(aux.loss))


def test_dt_per_element_and_per_channel(x64):
    """A per-channel dt `(C,)` is the per-element `(H, W, C)` array repeated over positions
    (same bits); one step is (1 − dt) ⊙ s + dt ⊙ σ(h) elementwise; other shapes refused."""
    model = ConvEPModel(**GEOM, activation="sigmoid")
    params, buffers = jinit(model, jax.random.PRNGKey(0), jnp.float64)
    H, W, C = model.state_shapes[0]
    per_channel = jnp.array([0.2, 0.5, 1.0])
    per_element = jax.random.uniform(jax.random.PRNGKey(9), (H, W, C), jnp.float64, 0.1, 1.0)
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 128), jnp.float64)
    s = rand_state(jax.random.PRNGKey(2), model, 3)
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    h = model.drives(eff, ctx, s, None, 0.0)
    for d in (per_channel, per_element):
        rx = ep_jax.make_relaxation(model, dt=[d, 0.5, 1.0])
        new = dynamics.step(model, eff, ctx, s, None, 0.0, rx.dt)
        d_full = np.broadcast_to(np.asarray(d), (H, W, C))
        np.testing.assert_allclose(
            new[0], (1 - d_full) * np.asarray(s[0]) + d_full * jax.nn.sigmoid(np.asarray(h[0])), rtol=1e-14
        )
        np.testing.assert_allclose(new[1], 0.5 * np.asarray(s[1]) + 0.5 * jax.nn.sigmoid(np.asarray(h[1])), rtol=1e-14)
    rx_c = ep_jax.make_relaxation(model, dt=[per_channel, 0.5, 1.0])
    rx_e = ep_jax.make_relaxation(model, dt=[jnp.broadcast_to(per_channel, (H, W, C)), 0.5, 1.0])
    a = dynamics.free_phase(model, eff, ctx, rx_c.dt, 5)
    b = dynamics.free_phase(model, eff, ctx, rx_e.dt, 5)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    for bad in (jnp.ones((W, C)) * 0.5, jnp.ones((H * W * C,)) * 0.5, jnp.ones((2,)) * 0.5):
        with pytest.raises(
            ValueError,
            match=r"dt of layer 1 must be a scalar, shape \(2, 2, 3\) \(per element\) or "
            r"\(3,\) \(per channel\)",
        ) as e:
            ep_jax.make_relaxation(model, dt=[bad, 1.0, 1.0])
        assert "\n" not in str(e.value)
    # heterogeneous time steps are drawn per element, in the layer's shape
    spec = ep_jax.timesteps.DtSpec("lognormal", mean=0.5, std=0.2)
    dts = ep_jax.timesteps.layer_dts(jax.random.PRNGKey(0), model, spec, 0.3)
    assert [jnp.shape(d) for d in dts] == [(2, 2, 3), (1, 1, 2), ()]
    ep_jax.make_relaxation(model, dt=list(dts))


def test_sweep_members_equal_solo_steps():
    """Two vmapped members (different init keys, β, per-channel vs scalar dt) equal the
    plain training step of each member alone."""
    model = ConvEPModel(**GEOM2)
    est = ep_jax.Estimator("symmetric", t_free=6, t_nudge=3)
    opt = ep_jax.optim.sgd(model, lr=[0.1, 0.05, 0.05, 0.02], momentum=0.9)
    rxs = [
        ep_jax.make_relaxation(model, beta=0.2, dt=[jnp.array([0.5, 1.0]), 1.0, 1.0, 1.0]),
        ep_jax.make_relaxation(model, beta=0.4, dt=0.8),
    ]
    init_keys = [jax.random.PRNGKey(1), jax.random.PRNGKey(2)]
    step_keys = [jax.random.PRNGKey(11), jax.random.PRNGKey(12)]
    sstate = S.init_sweep(model, est, opt, init_keys, step_keys)
    srx = S.stack_relaxations(model, rxs)
    assert srx.dt[0].shape == (2, 7 // 2, 7 // 2, 2)
    x = jax.random.uniform(jax.random.PRNGKey(3), (6, 49))
    y = jax.random.randint(jax.random.PRNGKey(4), (6,), 0, 3)
    for _ in range(2):
        sstate, sinfo = S.sweep_step(model, est, opt, sstate, x, y, srx)
    for i in range(2):
        st = ep_jax.init_state(model, est, opt, init_keys[i])
        for _ in range(2):
            st, info = ep_jax.train_step_jit(model, est, opt, ep_jax.step_key(step_keys[i], st.step), st, x, y, rxs[i])
        for u, v in zip(jax.tree.leaves(S.take(sstate.train.params, i)), jax.tree.leaves(st.params), strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sinfo.loss[i], info.loss, rtol=1e-5)


def test_one_device_data_parallel_and_checkpoint_roundtrip(tmp_path):
    """`parallel.data_parallel_step` on a one-device mesh equals `train_step`; the state
    (plain pytrees, empty buffers of the conv model) survives the msgpack checkpoint."""
    from ep_jax.experiments import checkpoint as ckpt

    model = ConvEPModel(**GEOM2, loss="ce", readout="softmax")
    est = ep_jax.Estimator("symmetric", t_free=6, t_nudge=3)
    opt = ep_jax.optim.sgd(model, lr=0.1, momentum=0.9)
    rx = ep_jax.make_relaxation(model, beta=0.3)
    state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, 49))
    y = jnp.array([0, 1, 2, 1])
    step = parallel.data_parallel_step(model, est, opt, devices=jax.devices()[:1])
    a, ia = step(jax.random.PRNGKey(5), state, x, y, rx)
    b, ib = ep_jax.train_step_jit(model, est, opt, jax.random.PRNGKey(5), state, x, y, rx)
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    assert int(ia.correct) == int(ib.correct)
    # evaluation reads the readout: argmax and cross-entropy of o = flat(s_L) W_o + b_o
    ev = ep_jax.evaluate_jit(model, est, b.params, b.buffers, x, y, rx)
    s = ep_jax.predict(model, est, b.params, b.buffers, x, rx)
    o = np.asarray(s[-1]).reshape(4, -1) @ np.asarray(b.params[-1]["w"]) + np.asarray(b.params[-1]["b"])
    logp = o - np.log(np.exp(o).sum(-1, keepdims=True))
    assert int(ev.correct) == int(np.sum(o.argmax(-1) == np.asarray(y)))
    np.testing.assert_allclose(ev.loss, -np.mean(logp[np.arange(4), np.asarray(y)]), rtol=1e-5)
    ckpt.save(tmp_path / "c.msgpack", b, {"note": "conv"})
    _, back = ckpt.load(tmp_path / "c.msgpack", state, check=False)
    jax.tree.map(np.testing.assert_array_equal, back, b)


def test_two_devices_data_parallel_equals_one_device():
    """A subprocess with two host devices: the sharded step (batch split in two) equals the
    one-device step on the global batch, for a dendritic conv model with the softmax readout."""
    code = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import jax, jax.numpy as jnp, numpy as np
        import ep_jax
        from ep_jax import parallel
        from ep_jax.models.dendritic_conv import DendriticConvModel
        model = DendriticConvModel(input_shape=(7, 7, 1), channels=(2, 3), kernels=(3, 2), strides=(1, 1),
                                   paddings=(1, 0), pools=("max", "none"), fc=(5, 3), basal_branches=2,
                                   loss="ce", readout="softmax")
        est = ep_jax.Estimator("symmetric", t_free=6, t_nudge=3)
        opt = ep_jax.optim.sgd(model, lr=0.1, momentum=0.9)
        rx = ep_jax.make_relaxation(model, beta=0.3)
        state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0))
        x = jax.random.uniform(jax.random.PRNGKey(3), (8, 49))
        y = jax.random.randint(jax.random.PRNGKey(4), (8,), 0, 3)
        assert len(jax.devices()) == 2
        step = parallel.data_parallel_step(model, est, opt)
        a = b = state
        for t in range(2):
            a, ia = step(jax.random.PRNGKey(t), a, x, y, rx)
            b, ib = ep_jax.train_step_jit(model, est, opt, jax.random.PRNGKey(t), b, x, y, rx)
        for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
        assert int(ia.correct) == int(ib.correct)
        np.testing.assert_allclose(ia.loss, ib.loss, rtol=1e-5)
        print("OK")
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(kernels=(10, 2)), "conv layer 1: kernel 10 is larger than its padded input 9x9"),
        (dict(kernels=(3, 4)), "conv layer 2: kernel 4 is larger than its padded input 3x3"),
        (
            dict(pools=("max", "max"), kernels=(3, 3), paddings=(1, 0)),
            "conv layer 2: max pooling .* leaves a zero-sized map",
        ),
        (dict(channels=(2, 0)), r"channels must be >= 1, got \(2, 0\)"),
        (dict(channels=(2, 3, 4)), "must have one entry per conv layer"),
        (dict(pools=("max", "min")), "pools must each be one of"),
        (dict(fc=()), "fc must list >= 1 positive widths"),
        (dict(strides=(0, 1)), "kernels and strides must be >= 1"),
        (dict(input_shape=(7, 7)), "input_shape must be three positive integers"),
        (dict(readout="softmax"), "readout='softmax' is the cross-entropy readout: give loss='ce'"),
        (dict(readout="linear"), "readout must be one of"),
        (dict(sizes=(49, 10)), "sizes .* disagree with the conv geometry"),
    ],
)
def test_bad_shapes_refused_in_one_line(kw, msg):
    for cls in (ConvEPModel, DendriticConvModel):
        with pytest.raises(ValueError, match=msg) as e:
            cls(**{**GEOM2, **kw})
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=msg):
        ep_jax.build_model("conv", **{**GEOM2, **kw})


def test_input_shapes_and_build_model():
    model = ep_jax.build_model("conv", **GEOM2)
    assert isinstance(model, ConvEPModel) and isinstance(model, ep_jax.Model)
    assert isinstance(ep_jax.build_model("dendritic_conv", **GEOM2), DendriticConvModel)
    assert model.sizes == (49, 18, 12, 5, 3) and model.state_shapes == ((3, 3, 2), (2, 2, 3), (5,), (3,))
    assert model.n_classes == 3 and model.n_synapses == 4
    soft = ConvEPModel(**GEOM2, loss="ce", readout="softmax")
    assert soft.sizes == (49, 18, 12, 5) and soft.n_classes == 3 and soft.n_synapses == 4 and soft.n_layers == 3
    assert model == ConvEPModel(**{k: list(v) if isinstance(v, tuple) else v for k, v in GEOM2.items()})
    hash(model)
    model.check_input(jnp.zeros((2, 49)))
    model.check_input(jnp.zeros((2, 7, 7, 1)))
    for bad in ((2, 48), (2, 7, 7), (2, 7, 7, 2), (49,)):
        with pytest.raises(ValueError, match=r"x must have shape \(batch, 49\) .* or \(batch, 7, 7, 1\)") as e:
            model.check_input(jnp.zeros(bad))
        assert "\n" not in str(e.value)


def test_short_training_on_synthetic_images_learns():
    """A tiny conv net learns a noisy-prototype image task (6x6x1, 3 classes): the mean
    free-phase loss of the last steps is well below that of the first, accuracy above chance."""
    k_p, k_y, k_n = jax.random.split(jax.random.PRNGKey(0), 3)
    protos = jax.random.bernoulli(k_p, 0.5, (3, 36)).astype(jnp.float32)
    y_all = jax.random.randint(k_y, (512,), 0, 3)
    x_all = jnp.clip(protos[y_all] + 0.4 * jax.random.normal(k_n, (512, 36)), 0, 1)
    model = ConvEPModel(
        input_shape=(6, 6, 1), channels=(4,), kernels=(3,), strides=(1,), paddings=(1,), pools=("max",), fc=(3,)
    )
    est = ep_jax.Estimator("symmetric", t_free=12, t_nudge=4)
    opt = ep_jax.optim.sgd(model, lr=[0.2, 0.1], momentum=0.9)
    rx = ep_jax.make_relaxation(model, beta=0.3)
    state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(1))
    idx = jnp.arange(512).reshape(32, 16)
    state, info = ep_jax.train_steps_jit(
        model, est, opt, jax.random.PRNGKey(2), state, x_all, y_all, jnp.concatenate([idx, idx]), rx
    )
    first, last = float(jnp.mean(info.loss[:8])), float(jnp.mean(info.loss[-8:]))
    print(f"loss {first:.4f} -> {last:.4f}, accuracy of the last 8 steps {float(jnp.mean(info.accuracy[-8:])):.3f}")
    assert bool(jnp.all(info.finite)) and last < 0.7 * first
    assert float(jnp.mean(info.accuracy[-8:])) > 0.6


def test_ep_block_and_flax_wrapper_on_a_conv_model(x64):
    """The EP block (custom VJP) returns the readout `o` of the free state, and its
    parameter gradient for a linear downstream cost ⟨v, o⟩ agrees with `jax.grad` of that
    cost through the free relaxation (oracle; float64, β = 1e-3); the flax wrapper builds
    the same conv model from `model_kwargs`."""
    from ep_jax.nn import EPBlock

    model = ConvEPModel(**SMALL, activation="sigmoid", loss="ce", readout="softmax")
    params, buffers = jinit(model, jax.random.PRNGKey(0), jnp.float64)
    est = ep_jax.Estimator("symmetric", t_free=30, t_nudge=15)
    rx = ep_jax.make_relaxation(model, beta=1e-3)
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 36), jnp.float64)
    v = jax.random.normal(jax.random.PRNGKey(2), (3, 3), jnp.float64)
    block = ep_jax.make_ep_block(model, est)

    def through_relaxation(p):
        eff = model.prepare(p, buffers)
        s = dynamics.free_phase(model, eff, model.input_drive(eff, x), rx.dt, est.t_free)
        return jnp.sum(v * model.output(eff, s))

    o = jax.jit(block)(params, buffers, x, rx)
    o_ref = jax.jit(lambda p: model.output(model.prepare(p, buffers), ep_jax.predict(model, est, p, buffers, x, rx)))
    np.testing.assert_allclose(o, o_ref(params), rtol=1e-12)
    g_block = jax.jit(jax.grad(lambda p: jnp.sum(v * block(p, buffers, x, rx))))(params)
    g_ref = jax.jit(jax.grad(through_relaxation))(params)
    cos, rel = tree_cos(g_block, g_ref)
    print(f"EP block vs jax.grad: cosine {cos:.10f}, relative error {rel:.3g}")
    assert cos > 0.999 and rel < 1e-2
    kwargs = tuple((k, v) for k, v in SMALL.items()) + (("loss", "ce"), ("readout", "softmax"))
    net = EPBlock(sizes=(), kind="conv", activation="sigmoid", t_free=6, t_nudge=3, model_kwargs=kwargs)
    variables = net.init(jax.random.PRNGKey(0), x)
    assert net.model() == model
    out = net.apply(variables, x.reshape(3, 6, 6, 1))
    assert out.shape == (3, 3)


@pytest.mark.parametrize("readout", ["none", "softmax"])
def test_gdu_curves_agree_on_a_conv_net(readout, x64):
    """Alignment tracking on image-shaped states: for a converged free phase (sigmoid,
    T1 = 60) at β = 1e-3, the EP update over the first k nudged steps and BPTT truncated to
    the last k free steps agree leaf by leaf for every k = 1..T2 (cosine > 0.999, both
    exactly zero while the nudge has not reached a layer); `alignment.measure` (jittable)
    gives an angle near 0. With the softmax readout its weights' truncated BPTT gradient is
    the readout's own (at every k)."""
    from ep_jax import alignment

    model = ConvEPModel(**SMALL, activation="sigmoid", loss="ce" if readout == "softmax" else "mse", readout=readout)
    params, buffers = jinit(model, jax.random.PRNGKey(4), jnp.float64)
    est = ep_jax.Estimator("symmetric", t_free=60, t_nudge=6)
    rx = ep_jax.make_relaxation(model, beta=1e-3)
    x = jax.random.uniform(jax.random.PRNGKey(5), (6, 36), jnp.float64)
    y = jnp.array([0, 1, 2, 2, 1, 0])
    ep = jax.jit(alignment.ep_curve, static_argnums=(0, 1))(model, est, params, buffers, x, y, rx)
    bp = jax.jit(alignment.bptt_truncated_curve, static_argnums=(0, 6, 7))(model, params, buffers, x, y, rx, 60, 6)
    res = alignment.GDUResult(ep, bp, alignment.leaf_names(params))
    table = alignment.gdu_table(res)
    for (name, c), e, b in zip(table.items(), jax.tree.leaves(res.ep), jax.tree.leaves(res.bptt)):
        scale = np.linalg.norm(np.asarray(b[-1]))
        assert scale > 0, name
        for k, cos in enumerate(c["cosine"]):
            if np.linalg.norm(np.asarray(b[k])) < 1e-12 * scale:
                assert np.linalg.norm(np.asarray(e[k])) < 1e-6 * scale, (name, k)
            else:
                assert cos > 0.999, (name, k, c["cosine"])
    angle = jax.jit(alignment.measure, static_argnums=(0, 1))(model, est, params, buffers, x, y, rx).angle
    assert float(angle) < 1.0


def test_holomorphic_and_implicit_estimators_on_a_conv_net(x64):
    """Oracle: `jax.grad` through all T1 free steps (bptt_full), float64, converged phases
    (tanh, average pooling, softmax readout, T1 = 150, T2 = 80, |β| = 0.05). Measured
    (2026-12-02): holomorphic (N = 4) relative error 5e-7, implicit 3e-14; required < 1e-5.
    Max pooling is not holomorphic: refused in one line."""
    geom = dict(SMALL, pools=("avg",))
    model = ConvEPModel(**geom, activation="tanh", loss="ce", readout="softmax")
    params, buffers = jinit(model, jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 36), jnp.float64)
    y = jnp.array([0, 1, 2, 0])
    rx = ep_jax.make_relaxation(model, beta=0.05)
    est = jax.jit(ep_jax.estimate, static_argnums=(0, 1))
    g_ref, _ = est(model, ep_jax.Estimator("bptt_full", t_free=150, t_nudge=80), None, params, buffers, x, y, rx)
    for kind in ("holomorphic", "implicit"):
        g, aux = est(model, ep_jax.Estimator(kind, t_free=150, t_nudge=80), None, params, buffers, x, y, rx)
        cos, rel = tree_cos(g, g_ref)
        print(f"{kind}: cosine {cos:.12f}, relative error {rel:.3g}")
        assert cos > 0.999 and rel < 1e-5, kind
    maxpool = ConvEPModel(**SMALL, activation="tanh")
    p, b = jinit(maxpool, jax.random.PRNGKey(0), jnp.float64)
    with pytest.raises(ValueError, match="max pooling") as e:
        ep_jax.estimate(
            maxpool,
            ep_jax.Estimator("holomorphic", t_free=4, t_nudge=2),
            None,
            p,
            b,
            x,
            y,
            ep_jax.make_relaxation(maxpool, beta=0.05),
        )
    assert "\n" not in str(e.value)
