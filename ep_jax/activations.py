"""Activation functions by name.

`hard_sigmoid` is written exactly as the reference code computes it,
`(1 + hardtanh(2u - 1)) / 2`, rather than `clip(u, 0, 1)`: the two differ in the last
bit for some inputs, and we reproduce the reference number for number.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Activation = Callable[[jax.Array], jax.Array]


def hard_sigmoid(u):
    """clip(u, 0, 1), computed as the reference code does: (1 + hardtanh(2u − 1)) / 2."""
    return (1.0 + jnp.clip(2.0 * u - 1.0, -1.0, 1.0)) / 2.0


def leaky_relu(u, negative_slope: float = 0.01):
    """u where u ≥ 0, else negative_slope·u."""
    # PyTorch's default slope (paper 003 uses nn.LeakyReLU defaults).
    return jnp.where(u >= 0, u, negative_slope * u)


ACTIVATIONS: dict[str, Activation] = {
    "hard_sigmoid": hard_sigmoid,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "leaky_relu": leaky_relu,
    "identity": lambda u: u,
}


#: the activations that are holomorphic (complex-differentiable) functions: the only ones
#: the holomorphic estimator accepts (it runs the nudged phases at complex states).
#: hard_sigmoid, relu and leaky_relu are not (they clip or switch on the real part).
HOLOMORPHIC = ("tanh", "sigmoid", "identity")


def get_activation(name: str) -> Activation:
    """Return the activation called `name`; raise a ValueError listing the known names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None
