"""Many networks trained as one vmapped computation (hyperparameter and seed sweeps).

Members that share their static structure (model, estimator, optimiser structure, batch
size) are stacked along a leading member axis `M` and trained by one `jax.vmap` of
`train_step`: one compiled program, one launch per step for all of them. Members may
differ in every array: init key (params, masks), model settings (α, γ), relaxation
settings (β, per-layer or per-neuron `dt`), optimiser hyperparameters (learning rates,
momentum), and data order.

Keys: member i's step t uses `fold_in(step_keys[i], t)` (`ep_jax.train.step_key`), the
same key a plain loop of `train_step` would use.

Divergence: the core step refuses a non-finite update (`StepInfo.finite`). A member
whose step is not finite is marked dead (`SweepState.alive`, `diverged_step`) and frozen
from then on; members never interact, so the others are unaffected.

    state = init_sweep(model, est, opt, init_keys, step_keys, settings={"alpha": alphas},
                       opt_hyperparams={"lr": rates})                 # rates (M, L)
    rx = stack_relaxations(model, [make_relaxation(model, beta=b) for b in betas])
    state, info = sweep_step(model, est, opt, state, x, y, rx)        # info fields (M,)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ep_jax.estimators import Estimator
from ep_jax.optim import check_hyperparams, with_hyperparams
from ep_jax.relaxation import Relaxation
from ep_jax.train import TrainState, check_indices, evaluate, gather, init_state, step_key, train_step


class SweepState(NamedTuple):
    """Stacked members (every leaf with a leading axis M)."""

    train: TrainState  # leaves (M, ...)
    key: jax.Array  # (M, 2) uint32: step keys
    alive: jax.Array  # (M,) bool: False once a step was not finite
    diverged_step: jax.Array  # (M,) int32: step counter at divergence, −1 while alive


def stack(trees: Sequence):
    """Stack pytrees of equal structure along a new leading axis."""
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def take(tree, i: int):
    """Member `i` of a stacked pytree."""
    return jax.tree.map(lambda a: a[i], tree)


def stack_relaxations(model, rxs: Sequence[Relaxation]) -> Relaxation:
    """Stack member `Relaxation`s; a layer's dt is broadcast to the layer's full shape
    (`(n_l,)`, or `(H, W, C)`) where members differ in shape (scalar in one, per-neuron in
    another: the same numbers)."""
    dts = []
    for l, shape in enumerate(model.state_shapes):
        layer = [r.dt[l] for r in rxs]
        if len({jnp.shape(d) for d in layer}) > 1:
            layer = [jnp.broadcast_to(d, tuple(shape)) for d in layer]
        dts.append(layer)
    return stack([r._replace(dt=tuple(d[i] for d in dts)) for i, r in enumerate(rxs)])


def init_sweep(
    model,
    est: Estimator,
    opt,
    init_keys,
    step_keys,
    *,
    settings: Mapping | None = None,
    opt_hyperparams: Mapping | None = None,
    dtype=None,
) -> SweepState:
    """Stacked initial state of M members; member i is exactly
    `init_state(model, est, opt, init_keys[i], **settings_i)` with its optimiser
    hyperparameters set to `opt_hyperparams[...][i]`.

    init_keys, step_keys: `(M, 2)` keys (or lists). settings: model settings, each `(M,)`.
    opt_hyperparams: injected optimiser hyperparameters, each with a leading axis M
    (rates `lr` >= 0 and finite, `momentum` in [0, 1): a one-line ValueError otherwise).
    """
    init_keys = jnp.asarray(jnp.stack(list(init_keys)) if isinstance(init_keys, (list, tuple)) else init_keys)
    step_keys = jnp.asarray(jnp.stack(list(step_keys)) if isinstance(step_keys, (list, tuple)) else step_keys)
    M = init_keys.shape[0]
    if step_keys.shape[0] != M:
        raise ValueError(f"step_keys must hold one key per member ({M}), got {step_keys.shape[0]}")
    settings = {k: jnp.asarray(v) for k, v in (settings or {}).items()}
    hps = {k: jnp.asarray(v) for k, v in (opt_hyperparams or {}).items()}
    for name, v in list(settings.items()) + list(hps.items()):
        if v.shape[:1] != (M,):
            raise ValueError(f"{name} must have a leading member axis of {M}, got shape {v.shape}")
    check_hyperparams(hps)  # concrete here; inside the vmapped init they are traced

    def one(key, st, hp):
        s = init_state(model, est, opt, key, dtype=dtype, **st)
        return s._replace(opt_state=with_hyperparams(s.opt_state, **hp)) if hp else s

    train = jax.jit(jax.vmap(one))(init_keys, settings, hps)
    return SweepState(train, step_keys, jnp.ones((M,), bool), jnp.full((M,), -1, jnp.int32))


def member_step(
    model, est: Estimator, opt, state: SweepState, x, y, rx: Relaxation, axis_name: str | None = None, max_state=None
):
    """One training step of ONE member (`state`, `rx` without the member axis).

    max_state: a free state larger than this in magnitude also counts as divergence."""
    key = step_key(state.key, state.train.step)
    train, info = train_step(model, est, opt, key, state.train, x, y, rx, axis_name=axis_name)
    ok = state.alive & info.finite
    if max_state is not None:
        ok = ok & (info.state_absmax <= max_state)
    train = jax.tree.map(lambda a, b: jnp.where(ok, a, b), train, state.train)
    diverged = jnp.where(state.alive & ~ok, state.train.step, state.diverged_step)
    return SweepState(train, state.key, ok, diverged), info._replace(finite=ok)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 7))
def sweep_step(model, est: Estimator, opt, state: SweepState, x, y, rx: Relaxation, chunk: int | None = None):
    """All members one step on a shared batch `x: (B, n_0)`, or on per-member batches
    `x: (M, B, n_0)`. Returns `(state, StepInfo)`, every field of shape `(M,)`.

    chunk: None vmaps over all M members at once; an int runs chunks of `chunk` vmapped
    members one after another (`lax.map`) inside the same compiled step: the same numbers
    with the peak memory of `chunk` members.
    """
    one = functools.partial(member_step, model, est, opt)
    data_axis = 0 if x.ndim == 3 else None
    if chunk is None:
        return jax.vmap(one, in_axes=(0, data_axis, data_axis, 0))(state, x, y, rx)
    if data_axis == 0:
        return jax.lax.map(lambda a: one(*a), (state, x, y, rx), batch_size=chunk)
    return jax.lax.map(lambda a: one(a[0], x, y, a[1]), (state, rx), batch_size=chunk)


def sweep_steps(
    model,
    est: Estimator,
    opt,
    state: SweepState,
    x_all,
    y_all,
    idx,
    rx: Relaxation,
    max_state=None,
    axis_name: str | None = None,
    augment=None,
    aug_keys=None,
):
    """`idx.shape[0]` steps in one `lax.scan` with the dataset resident on the device.

    idx: `(T, M, B)` per-member batch indices into `(x_all, y_all)` (every member its own
    data order), or `(T, B)` shared. max_state, axis_name: see `member_step` (inside
    `shard_map`, `idx` holds this device's members and rows). augment: a static
    `f(key, x, ix) -> x` applied to each training batch (`ep_jax.augment.CropFlip`), with
    member i's key at its step t `fold_in(aug_keys[i], t)` (`aug_keys`: `(M, 2)`).
    Indices outside [0, N) are refused (`ep_jax.train.check_indices`; under jit the step
    is refused). Returns `(state, StepInfo)`, fields `(T, M)`."""
    check_indices(x_all, y_all, idx)
    shared = idx.ndim == 2
    if augment is not None and aug_keys is None:
        raise ValueError("augment needs aug_keys: one key per member, shape (M, 2)")
    keys = aug_keys if augment is not None else None  # None: an empty pytree, vmapped as nothing

    def body(st, ix):
        def step(s, i, r, k):
            x, y = gather(x_all, y_all, i)
            if augment is not None:
                x = augment(jax.random.fold_in(k, s.train.step), x, i)
            return member_step(model, est, opt, s, x, y, r, axis_name=axis_name, max_state=max_state)

        return jax.vmap(step, in_axes=(0, None if shared else 0, 0, 0))(st, ix, rx, keys)

    return jax.lax.scan(body, state, idx)


_sweep_steps_jit = jax.jit(sweep_steps, static_argnums=(0, 1, 2), static_argnames=("augment",))


def sweep_steps_jit(model, est: Estimator, opt, state: SweepState, x_all, y_all, idx, rx: Relaxation, *args, **kwargs):
    """`sweep_steps` jitted with `(model, est, opt)` and `augment` static; concrete indices
    are checked first (`ep_jax.train.check_indices`)."""
    check_indices(x_all, y_all, idx)
    return _sweep_steps_jit(model, est, opt, state, x_all, y_all, idx, rx, *args, **kwargs)


sweep_steps_jit.lower = _sweep_steps_jit.lower


@functools.partial(jax.jit, static_argnums=(0, 1))
def sweep_evaluate(model, est: Estimator, state: SweepState, x, y, rx: Relaxation):
    """`Evaluation` per member (fields `(M,)`) on a shared batch `(x, y)`."""
    return jax.vmap(lambda tr, r: evaluate(model, est, tr.params, tr.buffers, x, y, r))(state.train, rx)
