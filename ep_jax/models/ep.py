"""Standard EP model (the reference `P_MLP`), with an optional feedback scale γ.

Primitive (negative energy), batch-mean:

    Φ(s) = Σ_{l=1..L} s_l · (W_l s_{l−1} + b_l)  −  β ℓ(s_L, y)

Drive `h_l = W_l s_{l−1} + b_l + γ W_{l+1}ᵀ s_{l+1}` (no feedback for l = L; the output
drive gets `−β ∂ℓ/∂s_L`). With γ = 1 this is exactly ∂Φ/∂s_l and the dynamics descend an
energy; γ ≠ 1 scales the feedback (the leaky-integrator network of the heterogeneous-
time-step paper) and the system is then no longer a gradient flow.

Params: a tuple over synapses of `{"w": (n_{l−1}, n_l), "b": (n_l,)}`.
Buffers: `{"gamma": ()}`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ep_jax.models.base import KernelDrive, LayeredModel, default_float


def matmul(s, w):
    """`s @ w`; for a complex state and real weights (the holomorphic estimator's phases)
    as two real products, `Re(s) @ w + i Im(s) @ w`: the same numbers, without
    promoting `w` to complex (a complex product costs 3–6× two real ones on XLA:CPU,
    benchmarks/estimator_cost.py). Real states take the plain product."""
    if jnp.iscomplexobj(s) and not jnp.iscomplexobj(w):
        return jax.lax.complex(s.real @ w, s.imag @ w)
    return s @ w


@dataclasses.dataclass(frozen=True)
class EPModel(LayeredModel):
    """Layered EP network with one energy (see the module docstring).

    >>> model = EPModel(sizes=(784, 256, 10))
    >>> params, buffers = model.init(jax.random.PRNGKey(0), gamma=1.0)
    """

    name = "ep"
    SETTINGS = {"gamma": 1.0}

    def init(self, key, dtype=None, **settings):
        """PyTorch `Linear` default: W, b ~ U(−1/√n_{l−1}, +1/√n_{l−1}); settings: γ."""
        dtype = dtype or default_float()
        buffers = self.settings(dtype, **settings)
        params = []
        for k, (m, n) in zip(jax.random.split(key, self.n_layers), zip(self.sizes, self.sizes[1:])):
            kw, kb = jax.random.split(k)
            bound = 1.0 / math.sqrt(m)
            params.append(
                {
                    "w": jax.random.uniform(kw, (m, n), dtype, -bound, bound),
                    "b": jax.random.uniform(kb, (n,), dtype, -bound, bound),
                }
            )
        return tuple(params), buffers

    def prepare(self, params, buffers):
        return {"layers": params, "gamma": buffers["gamma"]}

    def input_drive(self, eff, x):
        return x @ eff["layers"][0]["w"] + eff["layers"][0]["b"]

    def drives(self, eff, ctx, s, target, beta):
        L, layers = self.n_layers, eff["layers"]
        h = []
        for l in range(L):  # 0-indexed state layer l is layer l+1 of the docstring
            hl = ctx if l == 0 else matmul(s[l - 1], layers[l]["w"]) + layers[l]["b"]
            if l < L - 1:
                hl = hl + eff["gamma"] * matmul(s[l + 1], layers[l + 1]["w"].T)
            elif target is not None:
                hl = hl + self.nudge(s[l], target, beta)
            h.append(hl)
        return tuple(h)

    def primitive(self, eff, ctx, s, target, beta):
        phi = sum(jnp.sum(sl * fl) for sl, fl in zip(s, self.feedforward(eff, ctx, s)))
        if target is not None:
            phi = phi + self.output_term(s[-1], target, beta)
        return phi / s[0].shape[0]

    def feedforward(self, eff, ctx, s):
        """`W_l s_{l−1} + b_l` per layer (layer 1: the input drive)."""
        layers = eff["layers"]
        return (ctx,) + tuple(matmul(s[l - 1], layers[l]["w"]) + layers[l]["b"] for l in range(1, self.n_layers))

    def lr_tree(self, lr):
        return tuple({"w": lr[l], "b": lr[l]} for l in range(self.n_layers))

    def kernel_drive(self) -> KernelDrive:
        """`h_l = W_l s_{l−1} + b_l + γ W_{l+1}ᵀ s_{l+1}`: the kernel's linear drives."""
        return KernelDrive("linear")

    def kernel_weights(self, eff) -> dict:
        layers = eff["layers"]
        L = self.n_layers
        return {
            "w": tuple(layers[l]["w"] for l in range(1, L)),
            "b": tuple(layers[l]["b"] for l in range(1, L)),
            "back": tuple(layers[l + 1]["w"].T for l in range(L - 1)),
            "scale": eff["gamma"],
        }
