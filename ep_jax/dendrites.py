"""Dendritic maps: sparse ReLU branches averaged per soma.

A map `D: R^m -> R^n` with `K` branches per soma computes

    D(u)_j = (1/K) Σ_k ReLU((m_jk ⊙ w_jk) · u + c_jk)

Weights are stored as a dense `(m, K·n)` kernel with a fixed binary mask of the same
shape; the branch pre-activations are one masked matmul `u @ (w ⊙ mask)`. The product
`w ⊙ mask` is a loop invariant of the relaxation: `masked_kernel` is called once per
batch, outside the step loop.

Layout (branch-major). Branch `k` of soma `j` is column `k·n + j` (kernel, mask and
bias alike), so the branch pre-activations of one batch row read
`[z_{0,0} .. z_{n-1,0} | z_{0,1} .. z_{n-1,1} | ...]` and the soma average is a sum of
`K` contiguous slices of width `n`: an elementwise loop that XLA fuses with the ReLU
and vectorises along the soma axis. The reference (and paper) layout puts branch
`(j, k)` in column `j·K + k`; averaging it is a reduction over a minor axis of size
`K` (2 or 8), which XLA on CPU runs several times slower: in the MNIST DEP free phase
it was the largest cost of a relaxation step (60 steps, batch 64, 2 CPU cores: 7.0 ms
in the reference layout, 2.7 ms branch-major; a training step 15.6 -> 9.7 ms; see
`benchmarks/dendrite_layout.py`). `to_reference_layout` /
`from_reference_layout` convert the last axis between the two; `init` draws in the
reference layout and permutes, so a key gives the same numbers as the reference code.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ep_jax._checks import real_number, whole_number


def check_fields(model) -> None:
    """The dendritic fields of a model (dense or conv), in place: `basal_branches`,
    `apical_branches` whole numbers >= 1, `sparsity` a number in (0, 1], `apical_dense`
    a bool; one-line ValueErrors."""
    for name in ("basal_branches", "apical_branches"):
        object.__setattr__(model, name, whole_number(name, getattr(model, name), lo=1))
    object.__setattr__(model, "sparsity", real_number("sparsity", model.sparsity))
    n_kept(1, model.sparsity)  # the range
    if not isinstance(model.apical_dense, bool):
        raise ValueError(f"apical_dense must be True or False, got {model.apical_dense!r}")


def n_kept(m: int, sparsity: float) -> int:
    """Number of inputs each branch sees: round(p·m), at least one."""
    if not 0.0 < sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in (0, 1], got {sparsity}")
    return max(1, int(round(sparsity * m)))


def to_reference_layout(a, n: int, branches: int):
    """Last axis from branch-major (column `k·n + j`) to the reference layout (`j·K + k`)."""
    lead = a.shape[:-1]
    return jnp.swapaxes(a.reshape(*lead, branches, n), -1, -2).reshape(*lead, n * branches)


def from_reference_layout(a, n: int, branches: int):
    """Last axis from the reference layout (column `j·K + k`) to branch-major (`k·n + j`)."""
    lead = a.shape[:-1]
    return jnp.swapaxes(a.reshape(*lead, n, branches), -1, -2).reshape(*lead, branches * n)


def sample_mask(key, m: int, n_branches: int, keep: int, dtype=jnp.float32):
    """`(m, n_branches)` binary mask with exactly `keep` ones per column (branch).

    The positions of each branch are a uniform draw without replacement: the `keep`
    smallest of m i.i.d. uniforms.
    """
    u = jax.random.uniform(key, (n_branches, m))
    ranks = jnp.argsort(jnp.argsort(u, axis=1), axis=1)
    return (ranks < keep).astype(dtype).T


def init(key, m: int, n: int, branches: int, sparsity: float, *, bias: bool, dense: bool = False, dtype=jnp.float32):
    """Parameters and mask of a dendritic map R^m -> R^n, in the branch-major layout.

    Returns `(params, mask)`: params `{"w": (m, K·n)}` plus `"c": (K·n,)` when `bias`;
    mask `(m, K·n)` (all ones when `dense`). Init as the reference code: `w ~ U(±1/√m)`,
    `c ~ U(±1/√keep)`. Drawn in the reference layout, then permuted: the numbers for
    branch `(j, k)` are those of the reference column `j·K + k`.
    """
    if branches < 1:
        raise ValueError(f"branches must be >= 1, got {branches}")
    k_w, k_c, k_m = jax.random.split(key, 3)
    nb = n * branches
    keep = m if dense else n_kept(m, sparsity)
    bound = 1.0 / math.sqrt(m)
    to_bm = lambda a: from_reference_layout(a, n, branches)
    params = {"w": to_bm(jax.random.uniform(k_w, (m, nb), dtype, -bound, bound))}
    if bias:
        cb = 1.0 / math.sqrt(keep)
        params["c"] = to_bm(jax.random.uniform(k_c, (nb,), dtype, -cb, cb))
    mask = jnp.ones((m, nb), dtype) if dense else to_bm(sample_mask(k_m, m, nb, keep, dtype))
    return params, mask


def masked_kernel(params, mask):
    """The effective `(m, K·n)` kernel; gradients vanish at masked positions."""
    return params["w"] * mask


def branch_input(kernel, bias, u):
    """Branch pre-activations `u @ kernel + c`, shape (batch, K·n)."""
    z = u @ kernel
    return z if bias is None else z + bias


def soma(z, branches: int):
    """Average of ReLU branches per soma: (batch, K·n) -> (batch, n).

    A sum of `K` contiguous slices of width `n` (branch-major layout), added as a halving
    tree: slice `i` plus slice `i + h` with `h = ⌊c/2⌋` of the `c` slices left (an odd
    one out is carried to the next level), until one is left; then divided by `K`. For
    K = 1, 2, 4, 8 this is the order in which XLA on CPU reduces the reference layout's
    minor axis, so both layouts give the same bits there.
    """
    r = jax.nn.relu(z)
    n = r.shape[-1] // branches
    parts = [r[..., k * n : (k + 1) * n] for k in range(branches)]
    while len(parts) > 1:
        h = len(parts) // 2
        parts = [parts[i] + parts[i + h] for i in range(h)] + parts[2 * h :]
    return parts[0] / branches


def apply(kernel, bias, u, branches: int):
    """D(u): (batch, m) -> (batch, n)."""
    return soma(branch_input(kernel, bias, u), branches)
