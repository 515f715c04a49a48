"""The straightforward formulation, kept as the reference for optimisations.

`Unhoisted(model)` computes exactly what `model` computes but recomputes every loop
invariant in every relaxation step: the masked dendritic kernels (`w ⊙ mask`) and the
input drive (`W_1 x` or the basal map of `x`). Benchmarks time it against the optimised
path, and tests check that both give the same states and gradients. It implements the
`ep_jax.models.Model` contract explicitly, method by method.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ep_jax.models.base import LayeredModel


@dataclasses.dataclass(frozen=True)
class Unhoisted:
    """`model` with nothing hoisted out of the relaxation loop (module docstring)."""

    model: LayeredModel

    # --- structure: as the wrapped model ----------------------------------------------
    @property
    def sizes(self):
        """The wrapped model's widths."""
        return self.model.sizes

    @property
    def name(self):
        """`unhoisted-<model name>`."""
        return f"unhoisted-{self.model.name}"

    @property
    def n_layers(self):
        """As the wrapped model."""
        return self.model.n_layers

    @property
    def state_sizes(self):
        """As the wrapped model."""
        return self.model.state_sizes

    @property
    def state_shapes(self):
        """As the wrapped model."""
        return self.model.state_shapes

    @property
    def n_synapses(self):
        """As the wrapped model."""
        return self.model.n_synapses

    @property
    def n_classes(self):
        """As the wrapped model."""
        return self.model.n_classes

    def output(self, eff, s):
        """The wrapped model's output, its loop invariants recomputed."""
        return self.model.output(self.model.prepare(*eff), s)

    def init(self, key, dtype=None, **settings):
        """The wrapped model's `init`: the same params and buffers for a key."""
        return self.model.init(key, dtype, **settings)

    def layer_activations(self):
        """As the wrapped model."""
        return self.model.layer_activations()

    def zero_state(self, batch, dtype=jnp.float32):
        """As the wrapped model."""
        return self.model.zero_state(batch, dtype)

    def one_hot(self, y, dtype=jnp.float32):
        """As the wrapped model."""
        return self.model.one_hot(y, dtype)

    def cost(self, s_out, y1h):
        """As the wrapped model."""
        return self.model.cost(s_out, y1h)

    def check_input(self, x, name="x"):
        """As the wrapped model."""
        return self.model.check_input(x, name)

    def lr_tree(self, lr):
        """As the wrapped model."""
        return self.model.lr_tree(lr)

    # --- the six methods, with nothing computed ahead ---------------------------------
    def prepare(self, params, buffers):
        """Nothing computed ahead: `eff` is `(params, buffers)` themselves."""
        return (params, buffers)

    def input_drive(self, eff, x):
        """Nothing computed ahead: `ctx` is `x` itself."""
        return x

    def _inner(self, eff, x):
        e = self.model.prepare(*eff)
        return e, self.model.input_drive(e, x)

    def drives(self, eff, x, s, target, beta):
        """The wrapped model's drives, its loop invariants recomputed on every call."""
        e, ctx = self._inner(eff, x)
        return self.model.drives(e, ctx, s, target, beta)

    def primitive(self, eff, x, s, target, beta):
        """The wrapped model's primitive, its loop invariants recomputed on every call."""
        e, ctx = self._inner(eff, x)
        return self.model.primitive(e, ctx, s, target, beta)

    def feedforward(self, eff, x, s):
        """The wrapped model's feedforward drives, its loop invariants recomputed."""
        e, ctx = self._inner(eff, x)
        return self.model.feedforward(e, ctx, s)
