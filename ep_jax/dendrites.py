"""Dendritic maps: sparse ReLU branches averaged per soma (SPEC §3).

A map `D: R^m -> R^n` with `K` branches per soma computes

    D(u)_j = (1/K) Σ_k ReLU((m_jk ⊙ w_jk) · u + c_jk)

Weights are stored as a dense `(m, n·K)` kernel (branch `(j, k)` is column `j·K + k`)
with a fixed binary mask of the same shape; the branch pre-activations are one masked
matmul `u @ (w ⊙ mask)`. The product `w ⊙ mask` is a loop invariant of the relaxation:
`masked_kernel` is called once per batch, outside the step loop.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def n_kept(m: int, sparsity: float) -> int:
    """Number of inputs each branch sees: round(p·m), at least one."""
    if not 0.0 < sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in (0, 1], got {sparsity}")
    return max(1, int(round(sparsity * m)))


def sample_mask(key, m: int, n_branches: int, keep: int, dtype=jnp.float32):
    """`(m, n_branches)` binary mask with exactly `keep` ones per column (branch).

    The positions of each branch are a uniform draw without replacement: the `keep`
    smallest of m i.i.d. uniforms.
    """
    u = jax.random.uniform(key, (n_branches, m))
    ranks = jnp.argsort(jnp.argsort(u, axis=1), axis=1)
    return (ranks < keep).astype(dtype).T


def init(key, m: int, n: int, branches: int, sparsity: float, *, bias: bool,
         dense: bool = False, dtype=jnp.float32):
    """Parameters and mask of a dendritic map R^m -> R^n.

    Returns `(params, mask)`: params `{"w": (m, n·K)}` plus `"c": (n·K,)` when `bias`;
    mask `(m, n·K)` (all ones when `dense`). Init of SPEC §3: `w ~ U(±1/√m)`,
    `c ~ U(±1/√keep)`.
    """
    if branches < 1:
        raise ValueError(f"branches must be >= 1, got {branches}")
    k_w, k_c, k_m = jax.random.split(key, 3)
    nb = n * branches
    keep = m if dense else n_kept(m, sparsity)
    bound = 1.0 / math.sqrt(m)
    params = {"w": jax.random.uniform(k_w, (m, nb), dtype, -bound, bound)}
    if bias:
        cb = 1.0 / math.sqrt(keep)
        params["c"] = jax.random.uniform(k_c, (nb,), dtype, -cb, cb)
    mask = jnp.ones((m, nb), dtype) if dense else sample_mask(k_m, m, nb, keep, dtype)
    return params, mask


def masked_kernel(params, mask):
    """The effective `(m, n·K)` kernel; gradients vanish at masked positions."""
    return params["w"] * mask


def branch_input(kernel, bias, u):
    """Branch pre-activations `u @ kernel + c`, shape (batch, n·K)."""
    z = u @ kernel
    return z if bias is None else z + bias


def soma(z, branches: int):
    """Average of ReLU branches per soma: (batch, n·K) -> (batch, n)."""
    r = jax.nn.relu(z)
    return r.reshape(*r.shape[:-1], -1, branches).mean(axis=-1)


def apply(kernel, bias, u, branches: int):
    """D(u): (batch, m) -> (batch, n)."""
    return soma(branch_input(kernel, bias, u), branches)
