"""Heterogeneous time steps (HTS): per-neuron `dt` vectors.

A hidden layer's `dt` is sampled once per network from a distribution with mean `μ` and
standard deviation `σ`, then clipped to `[dt_min, dt_max]`:

- ``normal``     N(μ, σ²);
- ``lognormal``  exp N(μ_u, σ_u²) with σ_u² = ln(1 + σ²/μ²), μ_u = ln μ − σ_u²/2
                 (so that the mean is μ and the standard deviation σ before clipping);
- ``gamma``      shape k = μ²/σ², scale θ = σ²/μ;
- ``scalar``     every neuron μ (the baseline).

The vectors live in `Relaxation.dt` (arrays), so they are fixed for the life of a network,
vmappable in sweeps, and saved with its checkpoint. The output layer keeps a scalar
`dt_out` (the paper sweeps it over 0.15 … 0.35).

Defaults. Paper 003's text lost the values of μ, σ, dt_min and dt_max. We use
``μ = 0.25, σ = 0.1, dt_min = 0.05, dt_max = 0.5``:
- μ = 0.25 is the middle of the paper's output sweep {0.15, …, 0.35}, so hidden and
  output layers integrate on comparable time scales, and 125 free steps are ≈ 31 time
  constants, ample to settle;
- σ = 0.1 (coefficient of variation 0.4) makes the heterogeneity substantial while keeping
  the normal distribution's mass below zero negligible (2.5 σ away);
- dt_max = 0.5 = 2μ bounds the Euler step well inside its stability range and reproduces
  the paper's Figure 1: the log-normal and gamma tails put ≈ 2 % of the neurons exactly at
  dt_max (normal ≈ 0.6 %); dt_min = 0.05 keeps every neuron's settling time
  within the 125-step free phase (1/0.05 = 20 steps per time constant).
`experiments/plot_dt_hist.py` draws the resulting histograms.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ep_jax.models.base import default_float

DISTRIBUTIONS = ("normal", "lognormal", "gamma", "scalar")


@dataclasses.dataclass(frozen=True)
class DtSpec:
    """How a hidden layer's per-neuron `dt` is drawn (hashable; all plain floats)."""

    dist: str = "lognormal"
    mean: float = 0.25
    std: float = 0.1
    dt_min: float = 0.05
    dt_max: float = 0.5

    def __post_init__(self):
        if self.dist not in DISTRIBUTIONS:
            raise ValueError(f"unknown dt distribution {self.dist!r}; choose one of {list(DISTRIBUTIONS)}")
        if not self.mean > 0:
            raise ValueError(f"dt mean must be > 0, got {self.mean}")
        if not self.std >= 0:
            raise ValueError(f"dt std must be >= 0, got {self.std}")
        if not 0 < self.dt_min <= self.dt_max <= 1:
            raise ValueError(f"need 0 < dt_min <= dt_max <= 1, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        if self.dist in ("lognormal", "gamma") and self.std == 0:
            raise ValueError(f"{self.dist} needs std > 0 (use dist='scalar' for a constant dt)")


def default_spec(dist: str = "lognormal") -> DtSpec:
    """The documented defaults (module docstring) for distribution `dist`."""
    return DtSpec(dist=dist)


def sample_dt_unclipped(key, spec: DtSpec, n: int, dtype=jnp.float32):
    """`n` draws from `spec`'s distribution before clipping."""
    mu, sd = spec.mean, spec.std
    if spec.dist == "scalar":
        return jnp.full((n,), mu, dtype)
    if spec.dist == "normal":
        return mu + sd * jax.random.normal(key, (n,), dtype)
    if spec.dist == "lognormal":
        var_u = math.log1p(sd**2 / mu**2)
        mu_u = math.log(mu) - var_u / 2
        return jnp.exp(mu_u + math.sqrt(var_u) * jax.random.normal(key, (n,), dtype))
    k, theta = mu**2 / sd**2, sd**2 / mu
    return theta * jax.random.gamma(key, k, (n,), dtype)


def sample_dt(key, spec: DtSpec, n: int, dtype=jnp.float32):
    """`n` per-neuron time steps: draws from `spec`, clipped to `[dt_min, dt_max]`."""
    return jnp.clip(sample_dt_unclipped(key, spec, n, dtype), spec.dt_min, spec.dt_max)


def layer_dts(key, model, hidden: DtSpec | None, dt_out: float, dtype=None):
    """`dt` entries for `make_relaxation(model, dt=...)`: sampled `(n_l,)` vectors for the hidden
    layers (independent draws: layer l uses `fold_in(key, l)`), scalar `dt_out` for the
    output layer. `hidden=None` gives scalar 1.0 for the hidden layers."""
    dtype = dtype or default_float()
    out = []
    # an image-shaped layer (conv models) gets one draw per element, in its shape
    for l, shape in enumerate(model.state_shapes[:-1]):
        out.append(
            jnp.asarray(1.0, dtype)
            if hidden is None
            else sample_dt(jax.random.fold_in(key, l), hidden, math.prod(shape), dtype).reshape(shape)
        )
    out.append(jnp.asarray(dt_out, dtype))
    return tuple(out)
