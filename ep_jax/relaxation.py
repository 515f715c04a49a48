"""Relaxation settings: the nudging strength β and the per-layer time steps `dt`.

A `Relaxation` is a pytree of arrays, so it can be vmapped (a sweep over β or over
sampled time steps is one compiled program) and is never baked into a compiled function
as a constant. `dt` holds one entry per state layer: a scalar, or a per-neuron vector
`(n_l,)` (heterogeneous time steps, `ep_jax.timesteps`); an image-shaped layer `(H, W, C)`
of a convolutional model takes a scalar, a per-element `(H, W, C)` array or a per-channel
`(C,)` vector (repeated over the positions). One relaxation step is

    s_l ← (1 − dt_l) ⊙ s_l + dt_l ⊙ σ_l(h_l(s))

so `dt = 1` is the plain fixed-point iteration `s_l ← σ_l(h_l)`.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ep_jax._checks import numeric
from ep_jax.models.base import default_float


class Relaxation(NamedTuple):
    """β `()` and one time step per state layer, each `()` or `(n_l,)`."""

    beta: jax.Array
    dt: tuple


def make_relaxation(model, *, beta: float = 0.1, dt=1.0, dtype=None, est=None) -> Relaxation:
    """A validated `Relaxation` for `model`.

    beta: the nudging strength (a finite float). The EP estimators (symmetric,
    one_sided, chl) divide by β: given `est` (an `ep_jax.Estimator`), β = 0 with an EP
    estimator is refused here (ValueError); without `est`, β = 0 warns once
    (`UserWarning`): eager estimates refuse it, but under jit every training step is
    then refused as non-finite while the loss is still reported. BPTT estimators ignore
    β (pass `est` to say so and silence the warning).
    dt: one float for every layer, or a list/tuple with one entry per state layer, each
    a float or a per-neuron array `(n_l,)` (image layers: `(H, W, C)` per element or `(C,)`
    per channel). Every time step must lie in (0, 1].
    """
    dtype = dtype or default_float()
    if est is not None and not hasattr(est, "is_ep"):
        raise TypeError(f"est must be an ep_jax.Estimator (or None), got {type(est).__name__}")
    L = model.n_layers
    numeric("beta", beta)
    numeric("dt", dt)
    if isinstance(dt, (list, tuple)):
        if len(dt) != L:
            raise ValueError(
                f"dt must be a float or a sequence of {L} entries (one per state layer), got {len(dt)} entries"
            )
        dts = tuple(jnp.asarray(d, dtype) for d in dt)
    elif np.ndim(dt) == 0:
        dts = (jnp.asarray(dt, dtype),) * L
    else:
        raise ValueError(
            f"dt must be a float, or a list with one entry per state layer ({L}), each a "
            f"float or an (n_l,) array; got an array of shape {np.shape(dt)} (wrap per-neuron "
            "time steps in a list: dt=[dt_1, ..., dt_L])"
        )
    rx = Relaxation(beta=jnp.asarray(beta, dtype), dt=dts)
    check(model, rx)
    b = concrete(rx.beta)
    if b is not None and b == 0:
        if est is not None and est.is_ep:
            raise ValueError(f"beta must be nonzero for the {est.kind!r} EP estimator (it divides by beta)")
        if est is None:
            warnings.warn(
                "beta=0: the EP estimators (symmetric, one_sided, chl) divide by beta, so under jit "
                "every training step is refused as non-finite (info.finite False) while a loss is "
                "still reported; only the BPTT estimators can use beta=0 (pass est= to "
                "make_relaxation to check)",
                stacklevel=2,
            )
    return rx


def check_shapes(model, rx: Relaxation):
    """Shape checks; shapes are static, so this is free and runs at trace time."""
    L = model.n_layers
    if not isinstance(rx, Relaxation):
        raise TypeError(f"expected a Relaxation (ep_jax.make_relaxation), got {type(rx).__name__}")
    if len(rx.dt) != L:
        raise ValueError(f"dt must have {L} entries (one per state layer), got {len(rx.dt)}")
    for l, shape in enumerate(model.state_shapes, start=1):
        # accepted: (), the layer's full shape (per neuron / element), its last axis (per channel)
        if jnp.shape(d := rx.dt[l - 1]) not in ((), tuple(shape), tuple(shape[-1:])):
            if len(shape) == 1:
                raise ValueError(f"dt of layer {l} must be a scalar or shape ({shape[0]},), got shape {jnp.shape(d)}")
            raise ValueError(
                f"dt of layer {l} must be a scalar, shape {tuple(shape)} (per element) or "
                f"({shape[-1]},) (per channel), got shape {jnp.shape(d)}"
            )
    if jnp.shape(rx.beta) != ():
        raise ValueError(f"beta must be a scalar, got shape {jnp.shape(rx.beta)}")


def concrete(x) -> np.ndarray | None:
    """`x` as a numpy array, or None when it is traced (inside jit/vmap)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check(model, rx: Relaxation):
    """Shapes, and values where they are concrete: dt in (0, 1], β finite."""
    check_shapes(model, rx)
    for l, d in enumerate(rx.dt, start=1):
        d = concrete(d)
        if d is not None and not np.all((d > 0) & (d <= 1)):
            raise ValueError(f"dt of layer {l} must lie in (0, 1]; got values in [{d.min()}, {d.max()}]")
    beta = concrete(rx.beta)
    if beta is not None and not np.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta}")
