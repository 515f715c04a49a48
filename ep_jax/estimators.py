"""Gradient estimates of ∂L/∂θ, L = batch mean of ℓ(s⁰_L, y) (SPEC §5).

Every estimator returns gradients with the params' pytree structure, ready for optax
(descend them). With `Φ` the model's (sum of per-layer) primitive and the states treated
as constants:

- ``symmetric``  g = −(∂_θ Φ(s⁺, +β) − ∂_θ Φ(s⁻, −β)) / (2β)      (default, paper 000)
- ``one_sided``  g = −(∂_θ Φ(s⁺, +β) − ∂_θ Φ(s⁰, 0)) / β
- ``chl``        contrastive / predictive rule of paper 003:
                 g_W_l = −(1/β) ⟨s⁺_{l−1} ⊗ (s⁺_l − s⁰_l)⟩,  g_b_l = −(1/β) ⟨s⁺_l − s⁰_l⟩
                 (written as ∂_θ of −(1/β) Σ_l (s⁺_l − s⁰_l)·ff_l(θ; s⁺_{l−1}), ff the
                 feedforward drive, so it applies to the dendritic model too; apical maps
                 then get no update)
- ``bptt``       `T1 − T2` free steps under stop_gradient, `T2` more, jax.grad of the mean
                 cost through those `T2` steps ("DBPTT" for the dendritic model)
- ``bptt_full``  jax.grad through all `T1` free steps
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ep_jax import dynamics
from ep_jax.hyper import _concrete, check_shapes

KINDS = ("symmetric", "one_sided", "chl", "bptt", "bptt_full")
EP_KINDS = ("symmetric", "one_sided", "chl")


@dataclasses.dataclass(frozen=True)
class Estimator:
    """Static description of how gradients are obtained (hashable: a jit static arg)."""
    kind: str = "symmetric"
    t_free: int = 60
    t_nudge: int = 12
    batched_nudge: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown estimator {self.kind!r}; choose one of {list(KINDS)}")
        if self.t_free < 1 or self.t_nudge < 1:
            raise ValueError(f"t_free and t_nudge must be >= 1, got {self.t_free}, {self.t_nudge}")
        if self.kind == "bptt" and self.t_nudge > self.t_free:
            raise ValueError(f"truncated BPTT needs t_nudge <= t_free, got {self.t_nudge} > {self.t_free}")


class Aux(NamedTuple):
    s_free: tuple        # free state after t_free steps (the prediction)
    loss: jax.Array      # batch mean of ℓ(s⁰_L, y)
    correct: jax.Array   # number of examples with argmax s⁰_L == y


def check_batch(model, x, y):
    """Static checks of a batch: input width, label shape. Raise naming the argument."""
    model.check_input(x)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    check_labels(model, y)


def check_labels(model, y):
    """Labels must lie in [0, n_classes). Checked when `y` is concrete (not under jit,
    where an out-of-range label would silently give an all-zero target: drivers check
    their datasets once with this function)."""
    v = _concrete(y)
    if v is not None and v.size and (v.min() < 0 or v.max() >= model.n_classes):
        raise ValueError(f"y holds labels in [{v.min()}, {v.max()}], outside [0, {model.n_classes}) "
                         f"for a model with {model.n_classes} outputs")


def _aux(model, s_free, y, y1h):
    loss = jnp.mean(model.cost(s_free[-1], y1h))
    correct = jnp.sum(jnp.argmax(s_free[-1], axis=-1) == y)
    return Aux(s_free, loss, correct)


def primitive_grad(model, params, buffers, x, terms, y1h, hyper):
    """∂_θ Σ_i c_i Φ(s_i, β_i) for `terms = [(c_i, s_i, β_i), ...]`, states held fixed."""
    def f(p):
        eff = model.prepare(p, buffers)
        ctx = model.input_drive(eff, x)
        return sum(c * model.primitive(eff, ctx, jax.lax.stop_gradient(s), y1h, b, hyper)
                   for c, s, b in terms)
    return jax.grad(f)(params)


def chl_grad(model, params, buffers, x, s_plus, s_free, beta):
    """Contrastive / predictive rule as a gradient (see module docstring)."""
    s_plus = jax.lax.stop_gradient(s_plus)
    diff = jax.lax.stop_gradient(tuple(p - f for p, f in zip(s_plus, s_free)))

    def f(p):
        eff = model.prepare(p, buffers)
        ff = model.feedforward(eff, model.input_drive(eff, x), s_plus)
        return -sum(jnp.sum(d * fl) for d, fl in zip(diff, ff)) / (beta * x.shape[0])
    return jax.grad(f)(params)


def ep_nudged_states(est, model, eff, ctx, s_free, y1h, hyper, record=False):
    betas = (hyper.beta, -hyper.beta) if est.kind == "symmetric" else (hyper.beta,)
    return dynamics.nudged_phases(model, eff, ctx, s_free, y1h, betas, hyper, est.t_nudge,
                                  batched=est.batched_nudge, record=record)


def ep_grad_from_states(est, model, params, buffers, x, y1h, hyper, s_free, nudged):
    """The EP estimate from already relaxed states (`nudged` as from ep_nudged_states)."""
    beta = hyper.beta
    if est.kind == "symmetric":
        s_p, s_m = nudged
        terms = [(-0.5 / beta, s_p, beta), (0.5 / beta, s_m, -beta)]
        return primitive_grad(model, params, buffers, x, terms, y1h, hyper)
    if est.kind == "one_sided":
        (s_p,) = nudged
        terms = [(-1.0 / beta, s_p, beta), (1.0 / beta, s_free, 0.0)]
        return primitive_grad(model, params, buffers, x, terms, y1h, hyper)
    (s_p,) = nudged
    return chl_grad(model, params, buffers, x, s_p, s_free, beta)


def _bptt(est, model, params, buffers, x, y, y1h, hyper):
    def loss_fn(p):
        eff = model.prepare(p, buffers)
        ctx = model.input_drive(eff, x)
        if est.kind == "bptt":
            s = jax.lax.stop_gradient(dynamics.free_phase(model, eff, ctx, hyper, est.t_free - est.t_nudge))
            s = dynamics.relax(model, eff, ctx, s, None, 0.0, hyper, est.t_nudge)
        else:
            s = dynamics.free_phase(model, eff, ctx, hyper, est.t_free)
        return jnp.mean(model.cost(s[-1], y1h)), s

    (_, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, _aux(model, s, y, y1h)


def estimate(est: Estimator, model, params, buffers, x, y, hyper):
    """Gradient estimate and `Aux` for one batch.

    x: (batch, n_0) float; y: (batch,) int labels. Returns `(grads, aux)`.
    """
    check_batch(model, x, y)
    check_shapes(model, hyper)
    y1h = model.one_hot(y, x.dtype)
    if est.kind in ("bptt", "bptt_full"):
        return _bptt(est, model, params, buffers, x, y, y1h, hyper)
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    s_free = dynamics.free_phase(model, eff, ctx, hyper, est.t_free)
    nudged = ep_nudged_states(est, model, eff, ctx, s_free, y1h, hyper)
    grads = ep_grad_from_states(est, model, params, buffers, x, y1h, hyper, s_free, nudged)
    return grads, _aux(model, s_free, y, y1h)
