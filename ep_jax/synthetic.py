"""A seeded, learnable synthetic classification problem (for tests and smoke runs).

Each class `c` has a prototype `p_c ∈ {0, 1}^d` (each pixel on with probability
`density`); an example of class `c` is `clip(p_c + noise · ε, 0, 1)`, `ε ~ N(0, I)`, so the
inputs live in [0, 1] like scaled images. Labels are balanced-in-expectation uniform draws.
A linear read-out separates the classes when `noise` is small against the prototype
distance (about `√(2·density·(1−density)·d)`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Dataset(NamedTuple):
    """Same fields as `ep_jax.data.Dataset`: host arrays, x float32 (n, d), y int32 (n,)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def make_synthetic(
    key,
    n_features: int = 784,
    n_classes: int = 10,
    n_train: int = 1000,
    n_test: int = 500,
    noise: float = 0.3,
    density: float = 0.3,
) -> Dataset:
    """Train and test sets drawn from the same prototypes; `key` decides everything."""
    for name, v in (("n_features", n_features), ("n_classes", n_classes), ("n_train", n_train), ("n_test", n_test)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if not 0 < density < 1:
        raise ValueError(f"density must lie in (0, 1), got {density}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    k_proto, k_train, k_test = jax.random.split(key, 3)
    # explicit float32/int32 draws: the same data with and without jax_enable_x64
    protos = jax.random.bernoulli(k_proto, jnp.float32(density), (n_classes, n_features)).astype(jnp.float32)

    def draw(k, n):
        ky, kx = jax.random.split(k)
        y = jax.random.randint(ky, (n,), 0, n_classes, dtype=jnp.int32)
        x = jnp.clip(protos[y] + jnp.float32(noise) * jax.random.normal(kx, (n, n_features), jnp.float32), 0.0, 1.0)
        return np.asarray(x, np.float32), np.asarray(y, np.int32)

    x_train, y_train = draw(k_train, n_train)
    x_test, y_test = draw(k_test, n_test)
    return Dataset("synthetic", x_train, y_train, x_test, y_test)
