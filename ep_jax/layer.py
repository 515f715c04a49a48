"""An EP network as a differentiable layer: `jax.grad` through it yields EP gradients.

    block = ep_jax.make_ep_block(model, ep_jax.Estimator("symmetric", t_free=60, t_nudge=12))
    s_L = block(params, buffers, x, rx)            # (batch, n_L): the free equilibrium

Forward: `est.t_free` free steps from zero; the output layer's state is returned (the
model's `output`: for the conv models' softmax readout, its logits, and `g` below is then
the cotangent of those, the nudge acting through the readout).
Backward (`jax.custom_vjp`): for the incoming cotangent `g = ∂C/∂s_L` of whatever the
user computes downstream, run the ±β nudged phases from the free state with the
output force `−β·B·g` (the linear cost ⟨B g, s_L⟩, B the batch size, so that the usual
batch-mean loss gives per-example forces of the usual size), and return the symmetric
EP estimate

    ∂C/∂θ ≈ −(∂_θ Φ(s⁺, +β) − ∂_θ Φ(s⁻, −β)) / (2β)
    ∂C/∂x ≈ −(∂_x Φ(s⁺, +β) − ∂_x Φ(s⁻, −β)) / (2β)

(`Φ` the batch-mean primitive; the input enters it through layer 1, so upstream feature
extractors get gradients too). For a downstream cost linear in `s_L` this is exactly the
symmetric EP estimate with that cost; for the model's own MSE cost it differs from
`estimate` by O(β), because the VJP nudges with the cost linearised at the free state.
Buffers (masks, settings) and the relaxation settings get zero cotangents. β is
`rx.beta`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ep_jax import dynamics
from ep_jax.estimators import Estimator
from ep_jax.models.base import OutputGrad, check_network
from ep_jax.relaxation import check_shapes


def make_ep_block(model, est: Estimator):
    """`block(params, buffers, x, rx) -> s_L` with EP gradients (module docstring);
    `est` must be the symmetric estimator (its `t_free`, `t_nudge` are used)."""
    if est.kind != "symmetric" or est.nudge != "fixed":
        raise ValueError(
            f"the EP block's custom VJP is the symmetric estimate: give Estimator('symmetric', ...), "
            f"got kind={est.kind!r}, nudge={est.nudge!r}"
        )

    def free(params, buffers, x, rx):
        check_network(model, params, buffers)
        model.check_input(x)
        check_shapes(model, rx)
        eff = model.prepare(params, buffers)
        return dynamics.free_phase(model, eff, model.input_drive(eff, x), rx.dt, est.t_free)

    def output(params, buffers, s):  # s_L, or the model's readout of it (`model.output`)
        return model.output(model.prepare(params, buffers), s)

    @jax.custom_vjp
    def block(params, buffers, x, rx):
        return output(params, buffers, free(params, buffers, x, rx))

    def fwd(params, buffers, x, rx):
        s = free(params, buffers, x, rx)
        return output(params, buffers, s), (params, buffers, x, rx, s)

    def bwd(res, g):
        params, buffers, x, rx, s_free = res
        beta = rx.beta
        target = OutputGrad(jax.lax.stop_gradient(g) * x.shape[0])
        eff = model.prepare(params, buffers)
        ctx = model.input_drive(eff, x)
        s_p, s_m = dynamics.nudged_phases(model, eff, ctx, s_free, target, (beta, -beta), rx.dt, est.t_nudge)

        def contrast(p, xx):
            e = model.prepare(p, buffers)
            c = model.input_drive(e, xx)
            phi = lambda s, b: model.primitive(e, c, jax.lax.stop_gradient(s), target, b)
            return -(phi(s_p, beta) - phi(s_m, -beta)) / (2 * beta)

        g_params, g_x = jax.grad(contrast, argnums=(0, 1))(params, x)
        zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
        return g_params, zeros(buffers), g_x, zeros(rx)

    block.defvjp(fwd, bwd)
    return block
