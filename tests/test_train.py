"""Short real training runs on a learnable synthetic problem (EP, DEP, truncated BPTT)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ep_jax
from conftest import synthetic_problem


def train(kind, est, lr, beta=0.2, epochs=4, batch=32, seed=0, **model_kw):
    (xtr, ytr), (xte, yte) = synthetic_problem(jax.random.PRNGKey(123))
    model = ep_jax.build_model(kind, sizes=(16, 32, 4), **model_kw)
    hyper = ep_jax.make_hyper(model, beta=beta, lr=lr)
    state = ep_jax.init_state(model, jax.random.PRNGKey(seed), hyper, est)
    acc0 = int(ep_jax.evaluate_jit(model, state.params, state.buffers, xte, yte, hyper, est.t_free)[0]) / len(yte)
    key = jax.random.PRNGKey(seed + 1)
    for _ in range(epochs):
        key, sub = jax.random.split(key)
        perm = jax.random.permutation(sub, len(ytr))
        for i in range(0, len(ytr) - batch + 1, batch):
            idx = perm[i:i + batch]
            state, m = ep_jax.train_step_jit(model, est, state, xtr[idx], ytr[idx], hyper)
            assert bool(m["finite"])
    correct, _ = ep_jax.evaluate_jit(model, state.params, state.buffers, xte, yte, hyper, est.t_free)
    return acc0, int(correct) / len(yte), state


@pytest.mark.parametrize("kind,est_kind,lr", [
    ("ep", "symmetric", (0.2, 0.1)),
    ("dendritic", "symmetric", (0.5, 0.2)),
    ("dendritic", "bptt", (0.5, 0.2)),
    ("ep", "bptt", (0.2, 0.1)),
])
def test_short_training_learns(kind, est_kind, lr):
    est = ep_jax.Estimator(est_kind, t_free=30, t_nudge=8)
    acc0, acc, _ = train(kind, est, lr)
    print(f"{kind}/{est_kind}: test accuracy {acc0:.3f} -> {acc:.3f}")
    assert acc > 0.85, (acc0, acc)
    assert acc > acc0 + 0.3


def test_same_seed_same_training():
    est = ep_jax.Estimator("symmetric", t_free=20, t_nudge=5)
    _, a1, s1 = train("dendritic", est, (0.5, 0.2), epochs=1)
    _, a2, s2 = train("dendritic", est, (0.5, 0.2), epochs=1)
    _, _, s3 = train("dendritic", est, (0.5, 0.2), epochs=1, seed=5)
    assert a1 == a2
    jax.tree.map(np.testing.assert_array_equal, s1, s2)
    assert not np.array_equal(s1.params["basal"][0]["w"], s3.params["basal"][0]["w"])


def test_momentum_follows_pytorch_semantics(x64):
    """v ← μ v + g; θ ← θ − lr·v, one rate per synapse (apical uses the next synapse's)."""
    model = ep_jax.build_model("dendritic", sizes=(6, 5, 4, 3))
    hyper = ep_jax.make_hyper(model, beta=0.2, lr=[0.3, 0.2, 0.1], momentum=0.9)
    est = ep_jax.Estimator("symmetric", 10, 4)
    state = ep_jax.init_state(model, jax.random.PRNGKey(0), hyper)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 6))
    y = jnp.array([0, 1, 2, 0])
    p, v = state.params, jax.tree.map(jnp.zeros_like, state.params)
    rates = {"basal": ({"w": 0.3, "c": 0.3}, {"w": 0.2, "c": 0.2}, {"w": 0.1, "c": 0.1}),
             "apical": ({"w": 0.2}, {"w": 0.1})}
    for _ in range(3):
        g, _ = ep_jax.estimate(est, model, p, state.buffers, x, y, hyper)
        state, _ = ep_jax.train_step(model, est, state, x, y, hyper)
        v = jax.tree.map(lambda v, g: 0.9 * v + g, v, g)
        p = jax.tree.map(lambda p, v, r: p - r * v, p, v, rates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15), state.params, p)
