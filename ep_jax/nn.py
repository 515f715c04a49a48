"""A Flax (linen) module wrapping an EP / dendritic-EP network with EP gradients.

We use `flax.linen`: its variables are plain nested dicts of arrays, so the EP weights sit
in the user's `params` collection (ready for optax and `flax.serialization`) and the fixed
dendritic masks in a separate, non-trainable `buffers` collection that is saved with the
model but never updated. (`flax.nnx` would work as well; linen keeps params as pure
pytrees, which is what the custom-VJP layer and `vmap` over models want.)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(128)(x))
            return EPBlock(kind="dendritic", sizes=(128, 64, 10), t_free=40, t_nudge=8)(h)

    variables = Net().init(key, x)            # {"params": ..., "buffers": ...}
    out = Net().apply(variables, x)           # (batch, 10): the EP network's free equilibrium

`jax.grad` of a loss of the output gives EP gradients for the block's weights (see
`ep_jax.layer`) and ordinary gradients for the layers around it.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ep_jax.hyper import make_hyper
from ep_jax.layer import make_ep_block
from ep_jax.models import build_model


class EPBlock(nn.Module):
    """An EP network `sizes[0] -> ... -> sizes[-1]`; `__call__(x)` returns `s_L`."""
    sizes: tuple
    kind: str = "ep"
    activation: str = "hard_sigmoid"
    output_activation: str | None = None
    t_free: int = 60
    t_nudge: int = 12
    beta: float = 0.1
    dt: Any = 1.0
    alpha: float = 0.2
    gamma: float = 1.0
    model_kwargs: tuple = ()   # extra model fields as (name, value) pairs, e.g. (("basal_branches", 4),)

    def model(self):
        return build_model(self.kind, sizes=tuple(self.sizes), activation=self.activation,
                           output_activation=self.output_activation, **dict(self.model_kwargs))

    @nn.compact
    def __call__(self, x):
        model = self.model()
        model.check_input(x)
        params = self.param("ep", lambda key: model.init(key, jnp.float32)[0])
        masks = self.variable("buffers", "masks", lambda: model.init(self.make_rng("params"), jnp.float32)[1])
        hyper = make_hyper(model, beta=self.beta, lr=0.0, dt=self.dt, alpha=self.alpha, gamma=self.gamma,
                           dtype=x.dtype)
        return make_ep_block(model, self.t_free, self.t_nudge)(params, masks.value, x, hyper)
