"""Numeric hyperparameters: a pytree of arrays, so they can be vmapped and are never baked
into a compiled function as constants.

`dt` holds one entry per state layer, a scalar or a per-neuron vector `(n_l,)` (SPEC §1);
`lr` one rate per synapse (SPEC §6). `alpha` (apical scale) is read by the dendritic
model only; `gamma` (feedback scale, paper 003) by the standard model only.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def default_float():
    """float64 when `jax_enable_x64` is on, else float32."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


class Hyper(NamedTuple):
    beta: jax.Array                 # ()
    lr: jax.Array                   # (L,)
    dt: tuple[jax.Array, ...]       # L entries, each () or (n_l,)
    alpha: jax.Array                # ()
    gamma: jax.Array                # ()
    momentum: jax.Array             # ()


def make_hyper(model, *, beta: float = 0.1, lr: float | Sequence[float] = 0.05,
               dt=1.0, alpha: float = 0.2, gamma: float = 1.0, momentum: float = 0.9,
               dtype=None) -> Hyper:
    """Build a `Hyper` for `model`, broadcasting scalars.

    `lr`: one float for every synapse or a sequence with one per synapse.
    `dt`: one float for every layer, or a sequence of per-layer floats / `(n_l,)` arrays.
    """
    dtype = dtype or default_float()
    L = model.n_layers
    lr = np.broadcast_to(np.asarray(lr, dtype=np.float64), (L,)) if np.ndim(lr) == 0 else np.asarray(lr)
    if lr.shape != (L,):
        raise ValueError(f"lr must be a float or {L} floats (one per synapse), got shape {lr.shape}")
    if isinstance(dt, (list, tuple)):
        if len(dt) != L:
            raise ValueError(f"dt must be a float or a sequence of {L} entries (one per layer), got {len(dt)}")
        dts = tuple(jnp.asarray(d, dtype) for d in dt)
    else:
        dts = (jnp.asarray(dt, dtype),) * L
    hyper = Hyper(beta=jnp.asarray(beta, dtype), lr=jnp.asarray(lr, dtype), dt=dts,
                  alpha=jnp.asarray(alpha, dtype), gamma=jnp.asarray(gamma, dtype),
                  momentum=jnp.asarray(momentum, dtype))
    check_values(model, hyper)
    return hyper


def check_shapes(model, hyper: Hyper):
    """Shape checks; shapes are static, so this is free and runs at trace time."""
    L = model.n_layers
    if len(hyper.dt) != L:
        raise ValueError(f"hyper.dt must have {L} entries (one per state layer), got {len(hyper.dt)}")
    for l, (d, n) in enumerate(zip(hyper.dt, model.state_sizes), start=1):
        if jnp.shape(d) not in ((), (n,)):
            raise ValueError(f"dt of layer {l} must be a scalar or shape ({n},), got shape {jnp.shape(d)}")
    if jnp.shape(hyper.lr) != (L,):
        raise ValueError(f"hyper.lr must have shape ({L},) (one rate per synapse), got {jnp.shape(hyper.lr)}")
    for name in ("beta", "alpha", "gamma", "momentum"):
        if jnp.shape(getattr(hyper, name)) != ():
            raise ValueError(f"hyper.{name} must be a scalar, got shape {jnp.shape(getattr(hyper, name))}")


def _concrete(x) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None
    except jax.errors.ConcretizationTypeError:
        return None


def check_values(model, hyper: Hyper, estimator_kind: str | None = None):
    """Value checks (host side; skipped for traced values): dt in (0, 1], β ≠ 0 for EP
    estimators, finite rates."""
    check_shapes(model, hyper)
    for l, d in enumerate(hyper.dt, start=1):
        d = _concrete(d)
        if d is not None and not np.all((d > 0) & (d <= 1)):
            raise ValueError(f"dt of layer {l} must lie in (0, 1]; got values in [{d.min()}, {d.max()}]")
    beta = _concrete(hyper.beta)
    if beta is not None and estimator_kind in ("symmetric", "one_sided", "chl") and beta == 0:
        raise ValueError(f"beta must be nonzero for the {estimator_kind!r} EP estimator")
    for name in ("lr", "beta", "alpha", "gamma", "momentum"):
        v = _concrete(getattr(hyper, name))
        if v is not None and not np.all(np.isfinite(v)):
            raise ValueError(f"hyper.{name} must be finite, got {v}")
