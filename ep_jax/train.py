"""Training state, the pure training step, and evaluation (SPEC §6).

`train_step(model, est, state, x, y, hyper) -> (state, metrics)` is a pure function of
arrays given the static `(model, est)`; jit it once with those static and vmap it over
`state`/`hyper` for sweeps. The optimizer is SGD with PyTorch momentum semantics
(`v ← μ v + g; θ ← θ − lr·v`, i.e. `optax.trace` followed by a per-layer rate), built
from `hyper` inside the step so that rates and momentum are array inputs.

A step whose gradients or free state are not finite is not applied: the returned state
is the input state and `metrics["finite"]` is False, so a driver can stop cleanly.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ep_jax import dynamics
from ep_jax.estimators import Estimator, check_batch, estimate
from ep_jax.hyper import Hyper, check_values, default_float


class TrainState(NamedTuple):
    params: Any
    buffers: Any
    opt_state: Any
    step: jax.Array


def scale_by_tree(rates) -> optax.GradientTransformation:
    """Multiply each update leaf by −rate (rates: a pytree like the params)."""
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, r: -r * u, updates, rates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(model, hyper: Hyper) -> optax.GradientTransformation:
    """SGD + momentum with one learning rate per synapse (`hyper.lr`, `hyper.momentum`)."""
    return optax.chain(optax.trace(decay=hyper.momentum), scale_by_tree(model.lr_tree(hyper.lr)))


def init_state(model, key, hyper: Hyper, estimator: Estimator | None = None, dtype=None) -> TrainState:
    """Fresh params/buffers from `key` and a zero optimizer state. Validates `hyper`."""
    check_values(model, hyper, estimator.kind if estimator else None)
    params, buffers = model.init(key, dtype or default_float())
    opt_state = make_optimizer(model, hyper).init(params)
    return TrainState(params, buffers, opt_state, jnp.zeros((), jnp.int32))


def _all_finite(tree):
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves]))


def train_step(model, est: Estimator, state: TrainState, x, y, hyper: Hyper,
               axis_name: str | None = None):
    """One optimizer step on batch `(x, y)`; returns `(state, metrics)`.

    `axis_name`: inside `shard_map`/`pmap` over a batch axis of that name, `(x, y)` is
    this device's shard; the gradients and loss are averaged over the axis (`pmean`, so
    equal-sized shards give the gradient of the global batch mean), `correct` is summed,
    and the step is applied only where every shard is finite.
    """
    grads, aux = estimate(est, model, state.params, state.buffers, x, y, hyper)
    loss, correct, n = aux.loss, aux.correct, x.shape[0]
    finite = _all_finite(aux.s_free)
    absmax = jnp.max(jnp.stack([jnp.max(jnp.abs(sl)) for sl in aux.s_free]))
    if axis_name is not None:
        absmax = jax.lax.pmax(absmax, axis_name)
        grads, loss = jax.lax.pmean((grads, loss), axis_name)
        correct, n = jax.lax.psum((correct, n), axis_name)
        finite = jax.lax.psum(jnp.logical_not(finite).astype(jnp.int32), axis_name) == 0
    finite = finite & _all_finite(grads)
    tx = make_optimizer(model, hyper)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = TrainState(params, state.buffers, opt_state, state.step + 1)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    metrics = {
        "loss": loss,
        "correct": correct,
        "accuracy": correct / n,
        "grad_norm": optax.tree.norm(grads),
        "state_absmax": absmax,
        "finite": finite,
    }
    return new, metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def train_step_jit(model, est, state, x, y, hyper):
    return train_step(model, est, state, x, y, hyper)


def train_steps(model, est: Estimator, state: TrainState, x_all, y_all, idx, hyper: Hyper):
    """`idx.shape[0]` training steps in one `lax.scan`; step i uses the batch
    `(x_all[idx[i]], y_all[idx[i]])`. With the dataset resident on the device this runs a
    whole chunk of an epoch without returning to Python. Returns `(state, metrics)` with
    every metric stacked along the step axis."""
    def body(st, ix):
        return train_step(model, est, st, x_all[ix], y_all[ix], hyper)
    return jax.lax.scan(body, state, idx)


train_steps_jit = jax.jit(train_steps, static_argnums=(0, 1))


def predict(model, params, buffers, x, hyper: Hyper, t_free: int):
    """Free state after `t_free` steps; `argmax` of its last layer is the prediction."""
    model.check_input(x)
    eff = model.prepare(params, buffers)
    return dynamics.free_phase(model, eff, model.input_drive(eff, x), hyper, t_free)


def evaluate(model, params, buffers, x, y, hyper: Hyper, t_free: int):
    """Return `(n_correct, mean loss)` of the free phase on `(x, y)`."""
    check_batch(model, x, y)
    s = predict(model, params, buffers, x, hyper, t_free)
    correct = jnp.sum(jnp.argmax(s[-1], axis=-1) == y)
    return correct, jnp.mean(model.cost(s[-1], model.one_hot(y, x.dtype)))


evaluate_jit = jax.jit(evaluate, static_argnums=(0, 6))
