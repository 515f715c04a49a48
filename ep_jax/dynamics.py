"""Relaxation: the state update run in `lax.scan`.

One step updates every layer at once from the previous step's state:

    s_l ← (1 − dt_l) ⊙ s_l + dt_l ⊙ σ_l(h_l(s))

with `dt_l` a scalar or a per-neuron vector `(n_l,)` (`ep_jax.relaxation`). At `dt = 1`
this is exactly the fixed-point update `s_l ← σ_l(h_l)` (`0·s + 1·σ(h)` is exact in
floating point). The model supplies the drives `h_l` (`ep_jax.models.Model`).

Phases of one training example: free (`t_free` steps from zero, β = 0; its last layer is
the prediction), and nudged (`t_nudge` steps from the free state with the output force
of strength ±β).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ep_jax.models.base import Model


def step(model: Model, eff, ctx, s, target, beta, dt):
    """One synchronous update of every layer; `dt` one entry per layer."""
    h = model.drives(eff, ctx, s, target, beta)
    # A scalar dt is broadcast to the layer's width so that it runs the very same
    # program as a per-neuron vector: a vector filled with one value gives the same bits.
    return tuple(
        (1 - d) * sl + d * act(hl) for sl, hl, d, act in zip(s, h, per_neuron(dt, s), model.layer_activations())
    )


def per_neuron(dt, s):
    """Each layer's time step broadcast to the layer's per-example shape `s_l.shape[1:]`:
    `(n_l,)`, or `(H, W, C)` for an image-shaped layer (a per-channel `(C,)` dt is then
    repeated over the positions)."""
    return tuple(jnp.broadcast_to(d, sl.shape[1:]) for d, sl in zip(dt, s))


def relax(model: Model, eff, ctx, s, target, beta, dt, steps: int, record: bool = False, residual: bool = False):
    """`steps` updates from state `s`.

    Returns the final state, or `(final, trajectory)` when `record`: the trajectory holds
    every layer's state after each step, shape `(steps, B, n_l)` per layer. With
    `residual`, also the relative residual of the last step (`relative_residual`) as a
    last element: `(final, r)` or `(final, trajectory, r)`; the states are the same.
    """
    final, traj, prev = _scan(model, eff, ctx, s, target, beta, dt, steps, record, residual)
    out = (final, traj) if record else (final,)
    if residual:
        out = out + (relative_residual(final, prev),)
    return out if len(out) > 1 else out[0]


def _scan(model, eff, ctx, s, target, beta, dt, steps, record, keep_prev):
    """`(final, trajectory or None, state before the last step or None)`."""

    def body(carry, _):
        s, prev, dts = carry
        new = step(model, eff, ctx, s, target, beta, dts)
        return (new, s if keep_prev else prev, dts), (new if record else None)

    if steps == 0:
        traj = tuple(jnp.zeros((0,) + sl.shape, sl.dtype) for sl in s) if record else None
        return s, traj, (s if keep_prev else None)
    # dt rides in the carry as per-neuron vectors: the loop body is then the same program
    # whether the user gave a scalar or a vector (no constant folding of a scalar dt).
    # With `keep_prev` the carry also holds the state before the last step (one copy of
    # the state per step; without it nothing more is carried).
    (s, prev, _), traj = lax.scan(body, (s, s if keep_prev else (), per_neuron(dt, s)), None, length=steps)
    return s, traj, (prev if keep_prev else None)


def relative_residual(s, prev) -> jax.Array:
    """‖s − prev‖ / ‖s‖ over every layer and example of the batch (one scalar): how far
    the last relaxation step moved the state, relative to its size. A phase has
    converged when this is near the float resolution; 0 for an all-zero state that did
    not move."""
    num = sum(jnp.sum(jnp.abs(a - b) ** 2) for a, b in zip(s, prev))
    den = sum(jnp.sum(jnp.abs(a) ** 2) for a in s)
    return jnp.where(den > 0, jnp.sqrt(num / jnp.where(den > 0, den, 1)), jnp.sqrt(num))


def layer_residuals(s, prev) -> tuple:
    """`relative_residual` of each layer separately (a tuple of scalars)."""
    return tuple(relative_residual((a,), (b,)) for a, b in zip(s, prev))


def free_phase(model: Model, eff, ctx, dt, steps: int, record: bool = False, residual: bool = False):
    """`steps` free steps (β = 0) from the zero state. The result is also the prediction.
    `record`, `residual`: as `relax`."""
    s0 = model.zero_state(ctx.shape[0], ctx.dtype)
    return relax(model, eff, ctx, s0, None, 0.0, dt, steps, record, residual)


def free_phase_adaptive(model: Model, eff, ctx, dt, max_steps: int, tol):
    """Free steps from the zero state until the last step's `relative_residual` is at
    most `tol`, or `max_steps` steps: `(state, residual, steps)` (`relax_adaptive`)."""
    s0 = model.zero_state(ctx.shape[0], ctx.dtype)
    return relax_adaptive(model, eff, ctx, s0, None, 0.0, dt, max_steps, tol)


def relax_adaptive(model: Model, eff, ctx, s, target, beta, dt, max_steps: int, tol):
    """Steps from state `s` until the last step's `relative_residual` is at most `tol`, or
    `max_steps` steps: `(state, residual, steps)`. A `lax.while_loop` (not
    reverse-differentiable; under `vmap` every member stops at its own step, the loop runs
    until the slowest has). On GPUs each iteration's condition is read by the host, which
    a fixed-step scan avoids. `ep_jax.solvers.Adaptive` runs it."""
    dts = per_neuron(dt, s)
    rdtype = jnp.real(jnp.zeros((), ctx.dtype)).dtype

    def cond(c):
        _, k, r = c
        return (k < max_steps) & (r > tol)

    def body(c):
        s, k, _ = c
        new = step(model, eff, ctx, s, target, beta, dts)
        return new, k + 1, relative_residual(new, s).astype(rdtype)

    s, k, r = lax.while_loop(cond, body, (tuple(s), jnp.zeros((), jnp.int32), jnp.asarray(jnp.inf, rdtype)))
    return s, r, k


def nudged_phases(
    model: Model,
    eff,
    ctx,
    s_free,
    target,
    betas,
    dt,
    steps: int,
    batched: bool = True,
    record: bool = False,
    residual: bool = False,
):
    """Nudged phases from the free state, one per entry of `betas` (e.g. `(β, −β)`).

    `batched=True` stacks the phases along the batch axis and runs one scan (one larger
    matmul per step instead of several small ones); `False` runs one scan per phase.
    Both give the same numbers. Returns a list with one state (or `(state, trajectory)`)
    per β; with `residual`, `(list, r)`: r the `relative_residual` of the last step over
    every phase together.
    """
    if not batched or len(betas) == 1:
        outs = [_scan(model, eff, ctx, s_free, target, b, dt, steps, record, residual) for b in betas]
        phases = [(f, t) for f, t, _ in outs] if record else [f for f, _, _ in outs]
        if residual:  # over every phase together: their layers side by side
            r = relative_residual(sum((f for f, _, _ in outs), ()), sum((p for _, _, p in outs), ()))
    else:
        n, B = len(betas), ctx.shape[0]
        tile = lambda a: jnp.concatenate([a] * n, axis=0)
        beta_col = jnp.concatenate([jnp.full((B, 1), b, ctx.dtype) for b in betas], axis=0)
        final, traj, prev = _scan(
            model,
            eff,
            tile(ctx),
            tuple(tile(sl) for sl in s_free),
            jax.tree.map(tile, target),
            beta_col,
            dt,
            steps,
            record,
            residual,
        )
        split = lambda a, i, axis: lax.slice_in_dim(a, i * B, (i + 1) * B, axis=axis)
        finals = [tuple(split(sl, i, 0) for sl in final) for i in range(n)]
        phases = [(finals[i], tuple(split(t, i, 1) for t in traj)) for i in range(n)] if record else finals
        if residual:  # the stacked batch holds every phase: no need to split it
            r = relative_residual(final, prev)
    return (phases, r) if residual else phases
