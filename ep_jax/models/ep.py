"""Standard EP model (SPEC §2; the reference `P_MLP`), with optional feedback scale γ.

Primitive (negative energy), batch-mean:

    Φ(s) = Σ_{l=1..L} s_l · (W_l s_{l−1} + b_l)  −  β ℓ(s_L, y)

Drive `h_l = ∂Φ/∂s_l = W_l s_{l−1} + b_l + γ W_{l+1}ᵀ s_{l+1}` (no feedback for l = L;
the output drive gets `−β ∂ℓ/∂s_L`). With γ = 1 this is exactly ∂Φ/∂s_l; γ ≠ 1 gives the
leaky-integrator network of paper 003 (SPEC §4), whose feedback is scaled.

Params: a tuple over synapses of `{"w": (n_{l−1}, n_l), "b": (n_l,)}`; no buffers.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ep_jax.models.base import LayeredModel


@dataclasses.dataclass(frozen=True)
class EPModel(LayeredModel):
    name = "ep"

    def init(self, key, dtype=jnp.float32):
        """PyTorch `Linear` default: W, b ~ U(−1/√n_{l−1}, +1/√n_{l−1})."""
        params = []
        for k, (m, n) in zip(jax.random.split(key, self.n_layers), zip(self.sizes, self.sizes[1:])):
            kw, kb = jax.random.split(k)
            bound = 1.0 / math.sqrt(m)
            params.append({
                "w": jax.random.uniform(kw, (m, n), dtype, -bound, bound),
                "b": jax.random.uniform(kb, (n,), dtype, -bound, bound),
            })
        return tuple(params), {}

    def prepare(self, params, buffers):
        return params

    def input_drive(self, eff, x):
        return x @ eff[0]["w"] + eff[0]["b"]

    def drives(self, eff, ctx, s, y1h, beta, hyper):
        L = self.n_layers
        gamma = hyper.gamma
        h = []
        for l in range(L):  # 0-indexed state layer l is SPEC layer l+1
            hl = ctx if l == 0 else s[l - 1] @ eff[l]["w"] + eff[l]["b"]
            if l < L - 1:
                hl = hl + gamma * (s[l + 1] @ eff[l + 1]["w"].T)
            elif y1h is not None:
                hl = hl + self.nudge(s[l], y1h, beta)
            h.append(hl)
        return tuple(h)

    def primitive(self, eff, ctx, s, y1h, beta, hyper):
        phi = sum(jnp.sum(sl * fl) for sl, fl in zip(s, self.feedforward(eff, ctx, s)))
        if y1h is not None:
            phi = phi + self.output_term(s[-1], y1h, beta)
        return phi / s[0].shape[0]

    def feedforward(self, eff, ctx, s):
        """`W_l s_{l−1} + b_l` per layer (layer 1: the input drive)."""
        return (ctx,) + tuple(s[l - 1] @ eff[l]["w"] + eff[l]["b"] for l in range(1, self.n_layers))

    def lr_tree(self, lr):
        return tuple({"w": lr[l], "b": lr[l]} for l in range(self.n_layers))
