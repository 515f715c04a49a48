"""Shared test helpers: a small learnable synthetic problem and float64 scoping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest


def synthetic_problem(key, n_train=1024, n_test=512, n_in=16, n_classes=4, noise=0.6):
    """Seeded noisy-prototype problem shaped like image data: each class has a random
    binary prototype in [0, 1]^n_in; examples are the prototype plus Gaussian noise,
    clipped to [0, 1]. Learnable by any of our networks, far from trivial at chance."""
    k_p, k_y, k_n = jax.random.split(key, 3)
    protos = jax.random.bernoulli(k_p, 0.5, (n_classes, n_in)).astype(jnp.float32)
    y = jax.random.randint(k_y, (n_train + n_test,), 0, n_classes)
    x = jnp.clip(protos[y] + noise * jax.random.normal(k_n, (n_train + n_test, n_in)), 0.0, 1.0)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def random_state(key, model, batch, dtype=jnp.float32, low=0.0, high=1.0):
    keys = jax.random.split(key, model.n_layers)
    return tuple(jax.random.uniform(k, (batch, n), dtype, low, high)
                 for k, n in zip(keys, model.state_sizes))


def assert_trees_close(a, b, rtol=1e-6, atol=1e-9):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"tree structures differ: {ta} vs {tb}"
    for u, v in zip(la, lb):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)
