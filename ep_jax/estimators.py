"""Gradient estimates of ∂L/∂θ, L = batch mean of ℓ(s⁰_L, y).

Every estimator returns gradients with the params' pytree structure, ready for optax
(descend them). With `Φ` the model's (sum of per-layer) primitive and the states treated
as constants:

- ``symmetric``  g = −(∂_θ Φ(s⁺, +β) − ∂_θ Φ(s⁻, −β)) / (2β)      (default; bias O(β²))
- ``one_sided``  g = −(∂_θ Φ(s⁺, +β) − ∂_θ Φ(s⁰, 0)) / β          (bias O(β))
- ``chl``        contrastive / predictive Hebbian rule:
                 g_W_l = −(1/β) ⟨s⁺_{l−1} ⊗ (s⁺_l − s⁰_l)⟩,  g_b_l = −(1/β) ⟨s⁺_l − s⁰_l⟩
                 (⟨·⟩ the batch mean; written as ∂_θ of −(1/β) Σ_l (s⁺_l − s⁰_l)·f_l(θ; s⁺_{l−1}),
                 f the feedforward drive, so it applies to the dendritic model too; apical
                 maps then get no update)
- ``bptt``       `T1 − T2` free steps under stop_gradient, `T2` more, jax.grad of the mean
                 cost through those `T2` steps ("DBPTT" for the dendritic model)
- ``bptt_full``  jax.grad through all `T1` free steps

Nudging sign: `nudge="random_sign"` draws the sign of β afresh for every call from the
`key` given, `β_t = β · rademacher(key)`, which makes the one-sided estimate unbiased on
average (Scellier & Bengio; Laborieux et al. 2021); it is refused for the symmetric
estimator (where it changes nothing) and for BPTT (where it means nothing).

See docs/equations.md for the derivation and docs/ep-vs-bptt.md for how the estimates
compare with BPTT.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ep_jax import dynamics
from ep_jax.models.base import check_network
from ep_jax.relaxation import Relaxation, check_shapes, concrete

KINDS = ("symmetric", "one_sided", "chl", "bptt", "bptt_full")
EP_KINDS = ("symmetric", "one_sided", "chl")
NUDGES = ("fixed", "random_sign")
RANDOM_SIGN_KINDS = ("one_sided", "chl")
#: relaxation implementations: `lax.scan` (ep_jax.dynamics) or the fused Pallas kernel (ep_jax.kernels)
IMPLS = ("xla", "pallas")
PALLAS_KINDS = ("symmetric", "one_sided", "chl")


@dataclasses.dataclass(frozen=True)
class Estimator:
    """How gradients are obtained; static and hashable (a `jit` static argument).

    kind: one of `KINDS` (module docstring). t_free: free-phase steps T1 (also the
    prediction's). t_nudge: nudged-phase steps T2 (for ``bptt``: the truncation length).
    batched_nudge: run the ±β phases as one scan over a doubled batch (same numbers).
    nudge: ``"fixed"`` or ``"random_sign"`` (module docstring).
    impl: how the free and nudged phases relax: ``"xla"`` (`lax.scan`, `ep_jax.dynamics`)
    or ``"pallas"`` (one fused kernel per phase, `ep_jax.kernels`; same states;
    symmetric, one_sided and chl only).
    """
    kind: str = "symmetric"
    t_free: int = 60
    t_nudge: int = 12
    batched_nudge: bool = True
    nudge: str = "fixed"
    impl: str = "xla"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown estimator {self.kind!r}; choose one of {list(KINDS)}")
        if int(self.t_free) < 1 or int(self.t_nudge) < 1:
            raise ValueError(f"t_free and t_nudge must be >= 1, got {self.t_free}, {self.t_nudge}")
        if self.t_nudge > self.t_free and self.kind != "bptt_full":
            raise ValueError(f"t_nudge must be <= t_free, got t_nudge={self.t_nudge} > t_free={self.t_free}")
        if self.nudge not in NUDGES:
            raise ValueError(f"nudge must be one of {list(NUDGES)}, got {self.nudge!r}")
        if self.nudge == "random_sign" and self.kind not in RANDOM_SIGN_KINDS:
            raise ValueError(f"nudge='random_sign' needs estimator one of {list(RANDOM_SIGN_KINDS)}, "
                             f"got {self.kind!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {list(IMPLS)}, got {self.impl!r}")
        if self.impl == "pallas" and self.kind not in PALLAS_KINDS:
            raise ValueError(f"impl='pallas' needs estimator one of {list(PALLAS_KINDS)}, got {self.kind!r}")

    @property
    def is_ep(self) -> bool:
        """True for the estimators that difference nudged phases (they need β ≠ 0)."""
        return self.kind in EP_KINDS


class Aux(NamedTuple):
    """What an estimate returns beside the gradients."""
    s_free: tuple        # free state after t_free steps (the prediction)
    loss: jax.Array      # batch mean of ℓ(s⁰_L, y)
    correct: jax.Array   # number of examples with argmax s⁰_L == y
    beta: jax.Array      # the β used (signed, for nudge="random_sign")


def check_batch(model, x, y):
    """Checks of a batch: input width, at least one example, label shape and dtype
    (static: free under jit), and the label values where `y` is concrete
    (`check_labels`). Raise naming the argument."""
    model.check_input(x)
    if x.shape[0] < 1:
        raise ValueError(f"x must hold at least one example (batch >= 1), got shape {tuple(x.shape)}")
    if jnp.ndim(y) != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(jnp.shape(y))}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    check_labels(model, y)


def check_labels(model, y):
    """Labels must lie in [0, n_classes): a one-line ValueError when `y` is concrete
    (eager calls; drivers check their datasets once with this function). Under jit the
    values are not known: there `labels_in_range` is the traced check (an out-of-range
    label would otherwise give an all-zero one-hot target, silently)."""
    v = concrete(y)
    if v is not None and v.size and (v.min() < 0 or v.max() >= model.n_classes):
        raise ValueError(f"y holds labels in [{v.min()}, {v.max()}], outside [0, {model.n_classes}) "
                         f"for a model with {model.n_classes} outputs")


def labels_in_range(model, y) -> jax.Array:
    """`()` bool, traceable: every label of `y` lies in [0, n_classes). Under jit an
    out-of-range label makes `Aux.loss` / `Evaluation.loss` NaN and `train_step` refuse
    the step (`StepInfo.finite` False); numbers for valid labels are unchanged."""
    return jnp.all((y >= 0) & (y < model.n_classes))


def _aux(model, s_free, y, y1h, beta):
    # NaN for out-of-range labels (only reachable under jit: eager calls refuse them)
    loss = jnp.where(labels_in_range(model, y), jnp.mean(model.cost(s_free[-1], y1h)), jnp.nan)
    correct = jnp.sum(jnp.argmax(s_free[-1], axis=-1) == y)
    return Aux(s_free, loss, correct, beta)


def primitive_grad(model, params, buffers, x, terms, y1h):
    """∂_θ Σ_i c_i Φ(s_i, β_i) for `terms = [(c_i, s_i, β_i), ...]`, states held fixed."""
    def f(p):
        eff = model.prepare(p, buffers)
        ctx = model.input_drive(eff, x)
        return sum(c * model.primitive(eff, ctx, jax.lax.stop_gradient(s), y1h, b)
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


def ep_nudged_states(model, est, eff, ctx, s_free, y1h, rx: Relaxation, record=False):
    """The nudged states the estimator needs: `[s⁺, s⁻]` (symmetric) or `[s⁺]`."""
    betas = (rx.beta, -rx.beta) if est.kind == "symmetric" else (rx.beta,)
    return _phases(est).nudged_phases(model, eff, ctx, s_free, y1h, betas, rx.dt, est.t_nudge,
                                      batched=est.batched_nudge, record=record)


def _phases(est):
    """The module whose `free_phase` / `nudged_phases` run the estimator's relaxation."""
    if est.impl == "pallas":
        from ep_jax import kernels
        return kernels
    return dynamics


def ep_grad_from_states(model, est, params, buffers, x, y1h, beta, s_free, nudged):
    """The EP estimate from already relaxed states (`nudged` as from `ep_nudged_states`)."""
    if est.kind == "symmetric":
        s_p, s_m = nudged
        terms = [(-0.5 / beta, s_p, beta), (0.5 / beta, s_m, -beta)]
        return primitive_grad(model, params, buffers, x, terms, y1h)
    if est.kind == "one_sided":
        (s_p,) = nudged
        terms = [(-1.0 / beta, s_p, beta), (1.0 / beta, s_free, 0.0)]
        return primitive_grad(model, params, buffers, x, terms, y1h)
    (s_p,) = nudged
    return chl_grad(model, params, buffers, x, s_p, s_free, beta)


def _bptt(model, est, params, buffers, x, y, y1h, rx):
    def loss_fn(p):
        eff = model.prepare(p, buffers)
        ctx = model.input_drive(eff, x)
        if est.kind == "bptt":
            s = jax.lax.stop_gradient(dynamics.free_phase(model, eff, ctx, rx.dt, est.t_free - est.t_nudge))
            s = dynamics.relax(model, eff, ctx, s, None, 0.0, rx.dt, est.t_nudge)
        else:
            s = dynamics.free_phase(model, eff, ctx, rx.dt, est.t_free)
        return jnp.mean(model.cost(s[-1], y1h)), s

    (_, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, _aux(model, s, y, y1h, rx.beta)


def signed_beta(est: Estimator, key, beta):
    """β, or β times a random sign drawn from `key` when `est.nudge == "random_sign"`."""
    if est.nudge != "random_sign":
        return beta
    if key is None:
        raise ValueError("nudge='random_sign' draws the sign of beta from the key: pass a jax.random key")
    return jax.random.rademacher(key, (), jnp.result_type(beta)) * beta


def check_beta(est: Estimator, beta):
    """EP estimators divide by β: refuse β = 0 where β is concrete (under jit the training
    step's finite check stops the non-finite result instead)."""
    b = concrete(beta)
    if est.is_ep and b is not None and b == 0:
        raise ValueError(f"beta must be nonzero for the {est.kind!r} EP estimator (it divides by beta)")


def estimate(model, est: Estimator, key, params, buffers, x, y, rx: Relaxation):
    """Gradient estimate and `Aux` for one batch.

    key: a `jax.random` key (used by `nudge="random_sign"`; may be None otherwise).
    x: `(B, n_0)` float, B >= 1; y: `(B,)` int labels in [0, n_classes); rx: `Relaxation`
    (β, time steps). Returns `(grads, aux)`, grads with the structure of `params`.

    Refused with a one-line ValueError: params/buffers whose leaves or shapes are not the
    model's (`check_network`, at trace time), a bad batch (`check_batch`), and, where the
    values are concrete (eager calls), out-of-range labels and β = 0 for EP estimators.
    Under jit those values are not known: an out-of-range label then gives a NaN
    `aux.loss` (its one-hot target would be all zero; the gradients are not a gradient
    of any loss of the batch), and β = 0 non-finite EP gradients.
    """
    check_network(model, params, buffers)
    check_batch(model, x, y)
    check_shapes(model, rx)
    check_beta(est, rx.beta)
    y1h = model.one_hot(y, x.dtype)
    if est.kind in ("bptt", "bptt_full"):
        return _bptt(model, est, params, buffers, x, y, y1h, rx)
    rx = rx._replace(beta=signed_beta(est, key, rx.beta))
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    s_free = _phases(est).free_phase(model, eff, ctx, rx.dt, est.t_free)
    nudged = ep_nudged_states(model, est, eff, ctx, s_free, y1h, rx)
    grads = ep_grad_from_states(model, est, params, buffers, x, y1h, rx.beta, s_free, nudged)
    return grads, _aux(model, s_free, y, y1h, rx.beta)
