"""Training state, the pure training step, and evaluation.

    opt = ep_jax.optim.sgd(model, lr=[0.4, 0.02], momentum=0.9)     # or any optax transformation
    state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0))
    state, info = ep_jax.train_step(model, est, opt, key, state, x, y, rx)

Argument order, everywhere in the library: the static parts `(model, est[, opt])`, then
the key, then the network (`state`, or `params, buffers`), then the data `(x, y)`, then
the relaxation settings `rx`. `train_step` is a pure function of arrays given the static
parts: jit it with those static (`train_step_jit`), vmap it over `state`/`rx` for sweeps
(`ep_jax.sweep`), `shard_map` it over a batch axis (`ep_jax.parallel`).

A step whose free state, gradients or updated state (parameters, optimiser state) are not
finite is not applied: the returned state is the input state and `info.finite` is False,
so a driver can stop cleanly (and never keeps an overflowed parameter).

Checks: params and buffers against the model's leaves and shapes, the batch's shapes
(at least one example) and the relaxation's shapes are checked at trace time (free under
jit), with one-line ValueErrors. Label values and β are checked only where they are
concrete (eager calls): under jit an out-of-range label is not an error but makes the
step's `info.finite` False (the step is refused, `info.loss` is NaN), and β = 0 with an
EP estimator gives non-finite gradients (refused likewise, every step:
`make_relaxation` warns about β = 0 once, where it is known). Drivers check their
datasets once with `ep_jax.estimators.check_labels`.

Keys: `train_step` uses the key it is given (for `nudge="random_sign"`). Loops over
steps derive step t's key as `fold_in(key, t)` with t the state's step counter
(`step_key`); `train_steps` and the experiment engine do exactly that, so a loop of
`train_step` with `step_key` reproduces them.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ep_jax import dynamics
from ep_jax.estimators import Estimator, check_batch, estimate, labels_in_range
from ep_jax.models.base import check_network, default_float
from ep_jax.relaxation import Relaxation, check_shapes, concrete


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree)."""

    params: Any  # trainable weights
    buffers: Any  # fixed arrays: masks, model settings (α or γ)
    opt_state: Any  # the optax state (with the learning rates for ep_jax.optim.sgd)
    step: jax.Array  # () int32: steps applied so far


class StepInfo(NamedTuple):
    """Metrics of one training step (each a scalar; global under data parallelism)."""

    loss: jax.Array  # batch mean of ℓ(s⁰_L, y) at the free state
    correct: jax.Array  # examples with argmax s⁰_L == y
    accuracy: jax.Array  # correct / batch size
    grad_norm: jax.Array  # global L2 norm of the gradient estimate
    state_absmax: jax.Array  # max |s⁰| over every layer (a divergence signal)
    finite: jax.Array  # bool: the step was applied
    beta: jax.Array  # the β used (signed, for nudge="random_sign")
    residual_free: jax.Array = jnp.nan  # ‖s_T − s_{T−1}‖ / ‖s_T‖ of the free phase (all layers)
    residual_nudge: jax.Array = jnp.nan  # the same of the nudged phases (NaN: none ran; implicit: the adjoint's)


class Evaluation(NamedTuple):
    """Free-phase prediction quality on a batch."""

    accuracy: jax.Array  # fraction of examples with argmax s⁰_L == y
    loss: jax.Array  # mean ℓ(s⁰_L, y)
    correct: jax.Array  # number of correct examples


def step_key(key, step):
    """The key of training step `step` in a loop over steps: `fold_in(key, step)`."""
    return jax.random.fold_in(key, step)


def init_state(model, est: Estimator, opt: optax.GradientTransformation, key, *, dtype=None, **settings) -> TrainState:
    """Fresh params/buffers from `key` (`model.init`), the optimiser's initial state.

    settings: the model's numeric settings (`alpha=` for the dendritic model, `gamma=` for
    the standard one). γ ≠ 1 with the symmetric or one-sided EP estimator warns: the
    feedback then breaks the energy, and the estimate is not a gradient of the loss."""
    dtype = dtype or default_float()
    model.settings(dtype, **settings)  # names and values checked eagerly (jit would skip the value check)
    params, buffers = _jitted_init(model, dtype)(key, **settings)
    gamma = concrete(buffers.get("gamma", 1.0)) if isinstance(buffers, dict) else None
    if est.kind in ("symmetric", "one_sided") and gamma is not None and gamma != 1:
        warnings.warn(
            f"gamma={float(gamma)} != 1 with the {est.kind!r} estimator: the scaled feedback makes "
            "the dynamics a non-gradient system, so the estimate is not the loss gradient "
            "(the 'chl' rule is the one paired with gamma != 1)",
            stacklevel=2,
        )
    return TrainState(params, buffers, opt.init(params), jnp.zeros((), jnp.int32))


@functools.lru_cache(maxsize=64)
def _jitted_init(model, dtype):
    # one compiled init per model and dtype: an eager dendritic init dispatches (and
    # compiles) each of its random draws separately, seconds per new shape
    return jax.jit(functools.partial(model.init, dtype=dtype))


def _all_finite(tree):
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves]))


def train_step(
    model,
    est: Estimator,
    opt: optax.GradientTransformation,
    key,
    state: TrainState,
    x,
    y,
    rx: Relaxation,
    axis_name: str | None = None,
):
    """One optimiser step on the batch `(x, y)`; returns `(state, StepInfo)`.

    x: `(B, n_0)`; y: `(B,)` int labels. `axis_name`: inside `shard_map`/`pmap` over a
    batch axis of that name, `(x, y)` is this device's shard; gradients and loss are
    averaged over the axis (`pmean`: equal shards give the gradient of the global batch
    mean), `correct` is summed, and the step is applied only where every shard is finite.

    Refused (module docstring): eagerly, out-of-range labels and β = 0 for EP estimators
    raise a ValueError; under jit they make `info.finite` False and the state is returned
    unchanged (an out-of-range label also makes `info.loss` NaN). Valid labels get
    exactly the numbers they got without this check.
    """
    grads, aux = estimate(model, est, key, state.params, state.buffers, x, y, rx)
    loss, correct, n = aux.loss, aux.correct, x.shape[0]
    finite = _all_finite(aux.s_free) & labels_in_range(model, y)
    absmax = jnp.max(jnp.stack([jnp.max(jnp.abs(sl)) for sl in aux.s_free]))
    res = (aux.residual_free, aux.residual_nudge)
    if axis_name is not None:
        absmax = jax.lax.pmax(absmax, axis_name)
        res = jax.lax.pmax(res, axis_name)  # the worst shard
        grads, loss = jax.lax.pmean((grads, loss), axis_name)
        correct, n = jax.lax.psum((correct, n), axis_name)
        finite = jax.lax.psum(jnp.logical_not(finite).astype(jnp.int32), axis_name) == 0
    finite = finite & _all_finite(grads)
    updates, opt_state = opt.update(grads, state.opt_state, state.params)
    candidate = TrainState(optax.apply_updates(state.params, updates), state.buffers, opt_state, state.step + 1)
    # judged on the new state too: an update can overflow the parameters (or the optimiser's
    # moments) while the loss and gradients are finite; such a step is refused like any other
    finite = finite & _all_finite((candidate.params, candidate.opt_state))
    # a branch, not a select over the whole state (under vmap it becomes a select)
    new = jax.lax.cond(finite, lambda _: candidate, lambda _: state, None)
    info = StepInfo(
        loss=loss,
        correct=correct,
        accuracy=correct / n,
        grad_norm=optax.tree.norm(grads),
        state_absmax=absmax,
        finite=finite,
        beta=aux.beta,
        residual_free=res[0],
        residual_nudge=res[1],
    )
    return new, info


train_step_jit = jax.jit(train_step, static_argnums=(0, 1, 2), static_argnames=("axis_name",))
train_step_jit.__doc__ = "`train_step` jitted with `(model, est, opt)` static."


def check_indices(x_all, y_all, idx):
    """Batch indices into a resident dataset: `x_all` and `y_all` of one length N (checked
    at trace time), and, where `idx` is concrete, every index in [0, N) (a one-line
    ValueError; JAX would otherwise clamp an index past the end to the last example)."""
    n = jnp.shape(x_all)[0]
    if jnp.shape(y_all)[:1] != (n,):
        raise ValueError(
            f"x_all and y_all must hold the same number of examples, got {n} and "
            f"{jnp.shape(y_all)[0] if jnp.ndim(y_all) else 'a scalar'}"
        )
    try:
        ix = concrete(idx)
    except RuntimeError:  # a global array of several processes: its owner checks its part
        ix = None
    if ix is not None and ix.size:
        lo, hi = int(ix.min()), int(ix.max())
        if lo < 0 or hi >= n:
            raise ValueError(
                f"batch indices must lie in [0, {n}) (the examples of x_all), got indices from {lo} to {hi}"
            )


def gather(x_all, y_all, ix):
    """The batch `(x_all[ix], y_all[ix])`; an index outside [0, N) under jit (where it
    cannot be refused) gives a NaN input and label -1, so the step is refused (never a
    silently repeated last example)."""
    fill = jnp.nan if jnp.issubdtype(jnp.result_type(x_all), jnp.inexact) else 0
    x = x_all.at[ix].get(mode="fill", fill_value=fill)
    y = y_all.at[ix].get(mode="fill", fill_value=-1)
    return x, y


def train_steps(model, est: Estimator, opt, key, state: TrainState, x_all, y_all, idx, rx: Relaxation):
    """`idx.shape[0]` training steps in one `lax.scan`; step i uses the batch
    `(x_all[idx[i]], y_all[idx[i]])` and the key `step_key(key, state.step)`. With the
    dataset resident on the device this runs a chunk of an epoch without returning to
    Python. Returns `(state, StepInfo)` with every field stacked along the step axis.
    Indices outside [0, N) are refused (`check_indices`; under jit the step is refused)."""
    check_indices(x_all, y_all, idx)

    def body(st, ix):
        return train_step(model, est, opt, step_key(key, st.step), st, *gather(x_all, y_all, ix), rx)

    return jax.lax.scan(body, state, idx)


_train_steps_jit = jax.jit(train_steps, static_argnums=(0, 1, 2))


def train_steps_jit(model, est: Estimator, opt, key, state: TrainState, x_all, y_all, idx, rx: Relaxation):
    """`train_steps` jitted with `(model, est, opt)` static; concrete indices are checked
    first (`check_indices`)."""
    check_indices(x_all, y_all, idx)
    return _train_steps_jit(model, est, opt, key, state, x_all, y_all, idx, rx)


train_steps_jit.lower = _train_steps_jit.lower


def predict(model, est: Estimator, params, buffers, x, rx: Relaxation):
    """Free state after `est.t_free` steps; `argmax` of its last layer is the prediction.

    params/buffers are checked against the model's leaves and shapes at trace time
    (`ep_jax.models.base.check_network`: a one-line ValueError naming the leaf)."""
    check_network(model, params, buffers)
    model.check_input(x)
    check_shapes(model, rx)
    eff = model.prepare(params, buffers)
    return dynamics.free_phase(model, eff, model.input_drive(eff, x), rx.dt, est.t_free)


def evaluate(model, est: Estimator, params, buffers, x, y, rx: Relaxation) -> Evaluation:
    """Accuracy and mean loss of the free phase (`est.t_free` steps) on `(x, y)`.

    x: `(B, n_0)`, B >= 1; y: `(B,)` int labels in [0, n_classes). Out-of-range labels
    raise a ValueError where `y` is concrete (eager calls); under jit they cannot, and
    the returned loss is NaN instead (the accuracy counts them as wrong)."""
    check_batch(model, x, y)
    s = predict(model, est, params, buffers, x, rx)  # checks params/buffers before prepare reads them
    out = model.output(model.prepare(params, buffers), s)
    correct = jnp.sum(jnp.argmax(out, axis=-1) == y)
    loss = jnp.where(labels_in_range(model, y), jnp.mean(model.cost(out, model.one_hot(y, out.dtype))), jnp.nan)
    return Evaluation(correct / x.shape[0], loss, correct)


evaluate_jit = jax.jit(evaluate, static_argnums=(0, 1))
evaluate_jit.__doc__ = "`evaluate` jitted with `(model, est)` static."
