"""A Flax (linen) module wrapping an EP / dendritic-EP network with EP gradients.

We use `flax.linen`: its variables are plain nested dicts of arrays, so the EP weights sit
in the user's `params` collection (ready for optax and `flax.serialization`) and the fixed
dendritic masks in a separate, non-trainable `buffers` collection (with the model's settings) that is saved with the
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

from ep_jax.estimators import Estimator
from ep_jax.layer import make_ep_block
from ep_jax.models import build_model
from ep_jax.relaxation import make_relaxation


class EPBlock(nn.Module):
    """An EP network `sizes[0] -> ... -> sizes[-1]`; `__call__(x)` returns `s_L`.

    kind: "ep" or "dendritic"; t_free / t_nudge: phase lengths; beta, dt: relaxation
    settings (`ep_jax.make_relaxation`); settings: the model's numeric settings as
    (name, value) pairs, e.g. `(("alpha", 0.2),)`; model_kwargs: extra model fields, e.g.
    `(("basal_branches", 4),)`; param_dtype: dtype of the weights (default: the input's).
    Variables: `params["ep"]` (the network's weights) and `buffers["state"]` (masks and
    settings, never trained).
    """

    sizes: tuple
    kind: str = "ep"
    activation: str = "hard_sigmoid"
    output_activation: str | None = None
    t_free: int = 60
    t_nudge: int = 12
    beta: float = 0.1
    dt: Any = 1.0
    settings: tuple = ()
    model_kwargs: tuple = ()
    param_dtype: Any = None

    def model(self):
        """The `ep_jax` model this block runs."""
        return build_model(
            self.kind,
            sizes=tuple(self.sizes),
            activation=self.activation,
            output_activation=self.output_activation,
            **dict(self.model_kwargs),
        )

    @nn.compact
    def __call__(self, x):
        model = self.model()
        model.check_input(x)
        dtype = self.param_dtype or x.dtype
        made = {}

        def init_once(rng):  # params and buffers from ONE init call and ONE key
            if "out" not in made:
                made["out"] = model.init(rng, dtype, **dict(self.settings))
            return made["out"]

        params = self.param("ep", lambda rng: init_once(rng)[0])
        buffers = self.variable("buffers", "state", lambda: made["out"][1])
        rx = make_relaxation(model, beta=self.beta, dt=self.dt, dtype=x.dtype)
        est = Estimator("symmetric", t_free=self.t_free, t_nudge=self.t_nudge)
        return make_ep_block(model, est)(params, buffers.value, x, rx)
