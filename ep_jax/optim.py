"""Optimisers for EP gradients: any optax `GradientTransformation` works; this module
gives the papers' default.

The estimators return gradients of the loss with the params' structure, so
`optax.adam(1e-3)`, schedules and `optax.chain(...)` apply unchanged. The default,
`sgd(model, lr, momentum)`, is SGD with PyTorch momentum semantics and one learning rate
per synapse:

    v ← μ v + g;   θ ← θ − lr_l · v          (lr_l: the rate of the parameter's synapse)

The dendritic model's apical map of hidden layer l uses the rate of synapse l + 1
(`model.lr_tree`). The rates and μ are wrapped with `optax.inject_hyperparams`, so they
are arrays in the optimiser state (`opt_state.hyperparams["lr"]`, shape `(L,)`): a sweep
vmaps over them, and `with_hyperparams` sets them without rebuilding the optimiser.

Refused with a one-line ValueError: negative or non-finite rates, momentum outside
[0, 1) (where the values are concrete, as the command lines refuse them), and an
optimiser state made by another optimiser (`adam` given `sgd`'s state, or a plain optax
state).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ep_jax._checks import numeric
from ep_jax.models.base import default_float
from ep_jax.relaxation import concrete


def scale_by_tree(rates) -> optax.GradientTransformation:
    """Multiply each update leaf by −rate (`rates`: a pytree like the params)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, r: -r * u, updates, rates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def per_synapse_rates(model, lr, dtype=None) -> jax.Array:
    """`lr` as an `(L,)` array: one float for every synapse, or one per synapse; concrete
    rates must be finite and >= 0 (a one-line ValueError)."""
    dtype = dtype or default_float()
    L = model.n_synapses
    numeric("lr", lr)
    arr = np.asarray(lr, dtype=np.float64) if not isinstance(lr, jax.Array) else lr
    _check_rates(arr)
    if jnp.ndim(arr) == 0:
        arr = jnp.broadcast_to(jnp.asarray(arr, dtype), (L,))
    if jnp.shape(arr) != (L,):
        raise ValueError(f"lr must be one float or {L} floats (one per synapse), got shape {jnp.shape(arr)}")
    return jnp.asarray(arr, dtype)


def _fmt(v) -> str:
    v = np.asarray(v)
    if v.ndim == 0:
        return str(v.item())
    return " ".join(np.array2string(v, separator=", ").split())  # one line, whatever the rank


def _check_rates(lr):
    numeric("lr", lr)
    v = concrete(lr)
    if v is not None and not np.all(np.isfinite(v)):
        raise ValueError(f"lr must be finite, got {_fmt(v)}")
    if v is not None and np.any(v < 0):
        raise ValueError(f"lr must be >= 0 (a negative rate ascends the loss), got {_fmt(v)}")


def _check_momentum(momentum):
    numeric("momentum", momentum)
    m = concrete(momentum)
    if m is not None and not np.all(np.isfinite(m)):
        raise ValueError(f"momentum must be finite, got {_fmt(m)}")
    if m is not None and not np.all((m >= 0) & (m < 1)):
        raise ValueError(f"momentum must lie in [0, 1), got {_fmt(m)}")


_CHECKS = {"lr": _check_rates, "momentum": _check_momentum}


def check_hyperparams(values) -> None:
    """One-line ValueError unless the concrete values of `values` (a mapping of
    hyperparameter names to arrays, e.g. a sweep's `opt_hyperparams`) are valid: rates
    `lr` finite and >= 0, `momentum` in [0, 1). Other names and traced values pass."""
    for k, v in values.items():
        if k in _CHECKS:
            _CHECKS[k](v)


def _own_state(tx, name: str, model, hyperparams) -> optax.GradientTransformationExtraArgs:
    """`tx` whose update first checks that the state is one this optimiser made: the
    injected hyperparameters it has, the rates one per synapse of `model` (a static
    check, free under jit)."""
    hyperparams = sorted(hyperparams)

    def update(updates, state, params=None, **extra):
        hp = getattr(state, "hyperparams", None)
        if not isinstance(hp, dict) or sorted(hp) != hyperparams:
            made = (
                f"an optimiser with hyperparameters {sorted(hp)}"
                if isinstance(hp, dict)
                else f"another optimiser (a {type(state).__name__}, no injected hyperparameters)"
            )
            raise ValueError(
                f"opt_state was made by {made}, not by ep_jax.optim.{name} (hyperparameters "
                f"{hyperparams}): pass the state its own init made"
            )
        if jnp.shape(hp["lr"]) != (model.n_synapses,):
            raise ValueError(
                f"opt_state holds lr of shape {jnp.shape(hp['lr'])}, expected ({model.n_synapses},) "
                f"(one rate per synapse): the state was made for another model"
            )
        return tx.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(tx.init, update)


class CosineDecay(NamedTuple):
    """PyTorch's `CosineAnnealingLR(T_max=epochs, eta_min=lr_min)` stepped once per epoch:
    during epoch e (0-based) synapse l's rate is

        lr_l(e) = lr_min + (lr_l − lr_min) · (1 + cos(π e / epochs)) / 2,

    e = (updates applied so far) // steps_per_epoch (a count in the optimiser state, so
    a resumed run continues the schedule exactly). Hashable: a static part of the step."""

    steps_per_epoch: int
    epochs: int
    lr_min: float = 1e-5

    def rates(self, lr, count):
        """The rates `(L,)` after `count` updates."""
        e = (count // self.steps_per_epoch).astype(lr.dtype)
        c = 0.5 * (1 + jnp.cos(jnp.pi * e / self.epochs))
        return self.lr_min + (lr - self.lr_min) * c


class _CountState(NamedTuple):
    count: jax.Array


def scale_by_scheduled_tree(model, lr, schedule: CosineDecay) -> optax.GradientTransformation:
    """Multiply each update leaf by −(its synapse's rate under `schedule`), counting updates."""

    def init(params):
        return _CountState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        rates = model.lr_tree(schedule.rates(lr, state.count))
        return jax.tree.map(lambda u, r: -r * u, updates, rates), _CountState(state.count + 1)

    return optax.GradientTransformation(init, update)


def _rates_and_decay(model, lr, weight_decay: float, schedule):
    """The chain's ends shared by sgd and adam: weight decay first (PyTorch's: added to the
    gradient before momentum), the per-synapse (scheduled) rates last."""
    numeric("weight_decay", weight_decay)
    if float(weight_decay) < 0 or not np.isfinite(float(weight_decay)):
        raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay}")
    if schedule is not None and not isinstance(schedule, CosineDecay):
        raise ValueError(f"schedule must be an ep_jax.optim.CosineDecay or None, got {type(schedule).__name__}")
    if schedule is not None and (schedule.steps_per_epoch < 1 or schedule.epochs < 1 or schedule.lr_min < 0):
        raise ValueError(f"CosineDecay needs steps_per_epoch >= 1, epochs >= 1 and lr_min >= 0, got {schedule}")
    first = (optax.add_decayed_weights(float(weight_decay)),) if weight_decay else ()
    last = scale_by_scheduled_tree(model, lr, schedule) if schedule is not None else scale_by_tree(model.lr_tree(lr))
    return first, last


def sgd(
    model, lr=0.05, momentum: float = 0.9, dtype=None, weight_decay: float = 0.0, schedule: CosineDecay | None = None
) -> optax.GradientTransformation:
    """SGD with PyTorch momentum and one learning rate per synapse (module docstring).

    lr: one float >= 0 or one per synapse; momentum: μ in [0, 1). Both are arrays in
    the optimiser state (`optax.inject_hyperparams`); `update` refuses a state that
    another optimiser made. weight_decay: PyTorch's `g + weight_decay · θ` before the
    momentum; schedule: `CosineDecay` of the rates per epoch (default: constant rates;
    with both left out the optimiser and its state are exactly as before)."""
    dtype = dtype or default_float()
    rates = per_synapse_rates(model, lr, dtype)
    _check_momentum(momentum)
    mu = jnp.asarray(momentum, dtype)
    _rates_and_decay(model, rates, weight_decay, schedule)  # checked eagerly

    def build(lr, momentum):
        first, last = _rates_and_decay(model, lr, weight_decay, schedule)
        return optax.chain(*first, optax.trace(decay=momentum), last)

    return _own_state(optax.inject_hyperparams(build)(lr=rates, momentum=mu), "sgd", model, ("lr", "momentum"))


def with_hyperparams(opt_state, **values):
    """`opt_state` with injected hyperparameters replaced (e.g. `lr=jnp.array([0.4, 0.02])`);
    shapes must match the old values, and concrete rates must be >= 0 and finite,
    momentum in [0, 1). Works under `vmap` (one value per member)."""
    hp = getattr(opt_state, "hyperparams", None)
    if hp is None:
        raise ValueError(
            "this optimiser state has no injected hyperparameters (build the optimiser "
            "with optax.inject_hyperparams, as ep_jax.optim.sgd does)"
        )
    unknown = sorted(set(values) - set(hp))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown}; this optimiser has {sorted(hp)}")
    new = dict(hp)
    for k, v in values.items():
        numeric(k, v)
        v = jnp.asarray(v, jnp.result_type(hp[k]))
        if v.shape != jnp.shape(hp[k]):
            raise ValueError(f"hyperparameter {k} must have shape {jnp.shape(hp[k])}, got {v.shape}")
        check_hyperparams({k: v})
        new[k] = v
    return opt_state._replace(hyperparams=new)


def adam(
    model, lr=1e-3, dtype=None, weight_decay: float = 0.0, schedule: CosineDecay | None = None, **adam_kwargs
) -> optax.GradientTransformation:
    """Adam (`optax.scale_by_adam`) with one learning rate per synapse (each >= 0), the
    rates an array in the state (`inject_hyperparams`) like `sgd`'s; `update` refuses a
    state that another optimiser made. weight_decay, schedule: as `sgd`'s (PyTorch's
    Adam weight decay: added to the gradient)."""
    dtype = dtype or default_float()
    rates = per_synapse_rates(model, lr, dtype)
    _rates_and_decay(model, rates, weight_decay, schedule)

    def build(lr):
        first, last = _rates_and_decay(model, lr, weight_decay, schedule)
        return optax.chain(*first, optax.scale_by_adam(**adam_kwargs), last)

    return _own_state(optax.inject_hyperparams(build)(lr=rates), "adam", model, ("lr",))
