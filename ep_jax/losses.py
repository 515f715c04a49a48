"""Output costs ℓ(s_L, y) per example, and their gradients with respect to s_L.

The nudged drive of the output layer is `h_L - β ∂ℓ/∂s_L`; the gradient is written out
explicitly (not autodiffed) because it sits in the innermost loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSSES = ("mse", "ce")


def check_loss(name: str) -> str:
    """`name` if it is one of `LOSSES`, else a ValueError listing them."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {list(LOSSES)}")
    return name


def loss(name: str, s_out, y_onehot):
    """ℓ per example, shape (batch,). mse: ½‖s − ŷ‖²; ce: −Σ ŷ log softmax(s)."""
    if name == "mse":
        return 0.5 * jnp.sum((s_out - y_onehot) ** 2, axis=-1)
    return -jnp.sum(y_onehot * jax.nn.log_softmax(s_out, axis=-1), axis=-1)


def loss_grad(name: str, s_out, y_onehot):
    """∂ℓ/∂s_L per example, shape (batch, n_L)."""
    if name == "mse":
        return s_out - y_onehot
    return jax.nn.softmax(s_out, axis=-1) - y_onehot
