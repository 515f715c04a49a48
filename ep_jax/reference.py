"""The straightforward formulation, kept as the reference for optimisations.

`Unhoisted(model)` behaves exactly like `model` but recomputes every loop invariant in
every relaxation step: the masked dendritic kernels (`w ⊙ mask`) and the input drive
(`W_1 x` or the basal map of `x`). Benchmarks time it against the optimised path, and
tests check that both give the same states and gradients.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Unhoisted:
    model: object

    def __getattr__(self, name):  # everything else (sizes, costs, init, lr_tree, ...) as the model
        return getattr(self.model, name)

    def prepare(self, params, buffers):
        return (params, buffers)

    def input_drive(self, eff, x):
        return x

    def _inner(self, eff, x):
        e = self.model.prepare(*eff)
        return e, self.model.input_drive(e, x)

    def drives(self, eff, x, s, y1h, beta, hyper):
        e, ctx = self._inner(eff, x)
        return self.model.drives(e, ctx, s, y1h, beta, hyper)

    def primitive(self, eff, x, s, y1h, beta, hyper):
        e, ctx = self._inner(eff, x)
        return self.model.primitive(e, ctx, s, y1h, beta, hyper)

    def feedforward(self, eff, x, s):
        e, ctx = self._inner(eff, x)
        return self.model.feedforward(e, ctx, s)
