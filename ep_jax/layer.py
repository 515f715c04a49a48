"""An EP network as a differentiable layer: `jax.grad` through it yields EP gradients.

    block = ep_jax.make_ep_block(model, t_free=60, t_nudge=12)
    s_L = block(params, buffers, x, hyper)          # (batch, n_L): the free equilibrium

Forward: `t_free` free steps from zero; the output layer's state is returned.
Backward (`jax.custom_vjp`): for the incoming cotangent `g = ∂C/∂s_L` of whatever the
user computes downstream, run the ±β nudged phases from the free state with the
output force `−β·B·g` (the linear cost ⟨B g, s_L⟩, B the batch size, so that the usual
batch-mean loss gives per-example forces of the usual size), and return the symmetric
EP estimate

    ∂C/∂θ ≈ −(∂_θ Φ(s⁺, +β) − ∂_θ Φ(s⁻, −β)) / (2β)
    ∂C/∂x ≈ −(∂_x Φ(s⁺, +β) − ∂_x Φ(s⁻, −β)) / (2β)

(`Φ` the batch-mean primitive; the input enters it through layer 1, so upstream feature
extractors get gradients too). With the model's own MSE cost averaged over the batch
downstream, this is exactly `estimate(Estimator("symmetric"), ...)`. Buffers (masks) and
hyperparameters get zero cotangents. β is `hyper.beta`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ep_jax import dynamics
from ep_jax.models.base import OutputGrad


def make_ep_block(model, t_free: int, t_nudge: int):
    """`block(params, buffers, x, hyper) -> s_L` with EP gradients (module docstring)."""

    def free(params, buffers, x, hyper):
        eff = model.prepare(params, buffers)
        return dynamics.free_phase(model, eff, model.input_drive(eff, x), hyper, t_free)

    @jax.custom_vjp
    def block(params, buffers, x, hyper):
        return free(params, buffers, x, hyper)[-1]

    def fwd(params, buffers, x, hyper):
        s = free(params, buffers, x, hyper)
        return s[-1], (params, buffers, x, hyper, s)

    def bwd(res, g):
        params, buffers, x, hyper, s_free = res
        beta = hyper.beta
        target = OutputGrad(jax.lax.stop_gradient(g) * x.shape[0])
        eff = model.prepare(params, buffers)
        ctx = model.input_drive(eff, x)
        s_p, s_m = dynamics.nudged_phases(model, eff, ctx, s_free, target, (beta, -beta), hyper, t_nudge)

        def contrast(p, xx):
            e = model.prepare(p, buffers)
            c = model.input_drive(e, xx)
            phi = lambda s, b: model.primitive(e, c, jax.lax.stop_gradient(s), target, b, hyper)
            return -(phi(s_p, beta) - phi(s_m, -beta)) / (2 * beta)

        g_params, g_x = jax.grad(contrast, argnums=(0, 1))(params, x)
        zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
        return g_params, zeros(buffers), g_x, zeros(hyper)

    block.defvjp(fwd, bwd)
    return block
