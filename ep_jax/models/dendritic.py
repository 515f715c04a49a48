"""Dendritic EP model (SPEC §3; the reference `Dendritic_MLP`).

Per synapse l = 1..L a basal map `B_l: n_{l−1} -> n_l` (K_b branches, with bias); per
hidden layer l = 1..L−1 an apical map `A_l: n_{l+1} -> n_l` (K_a branches, no bias).
Each layer has its own primitive and its drive is that primitive's own partial:

    φ_l = s_l · (B_l(s_{l−1}) + α A_l(s_{l+1}))     hidden l,   h_l = B_l(s_{l−1}) + α A_l(s_{l+1})
    φ_L = s_L · B_L(s_{L−1}) − β ℓ(s_L, y)           output,     h_L = B_L(s_{L−1}) − β ∂ℓ/∂s_L

Each parameter belongs to exactly one φ_l, so ∂_θ Σ_l φ_l is the per-layer-primitive
gradient the estimators need.

Params: `{"basal": tuple over synapses of {"w", "c"}, "apical": tuple over hidden layers
of {"w"}}`; buffers: the fixed masks with the same structure (`{"basal": (...), "apical": (...)}`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ep_jax import dendrites
from ep_jax.models.base import LayeredModel


@dataclasses.dataclass(frozen=True)
class DendriticModel(LayeredModel):
    basal_branches: int = 8
    apical_branches: int = 2
    sparsity: float = 0.5
    apical_dense: bool = False

    name = "dendritic"

    def __post_init__(self):
        super().__post_init__()
        if self.basal_branches < 1 or self.apical_branches < 1:
            raise ValueError("basal_branches and apical_branches must be >= 1")
        dendrites.n_kept(1, self.sparsity)  # validates the range

    def init(self, key, dtype=jnp.float32):
        L = self.n_layers
        keys = jax.random.split(key, 2 * L)
        basal, basal_m, apical, apical_m = [], [], [], []
        for l in range(L):
            p, m = dendrites.init(keys[l], self.sizes[l], self.sizes[l + 1], self.basal_branches,
                                  self.sparsity, bias=True, dtype=dtype)
            basal.append(p)
            basal_m.append(m)
        for l in range(L - 1):  # apical map of hidden layer l+1: n_{l+2} -> n_{l+1}
            p, m = dendrites.init(keys[L + l], self.sizes[l + 2], self.sizes[l + 1],
                                  self.apical_branches, self.sparsity, bias=False,
                                  dense=self.apical_dense, dtype=dtype)
            apical.append(p)
            apical_m.append(m)
        params = {"basal": tuple(basal), "apical": tuple(apical)}
        buffers = {"basal": tuple(basal_m), "apical": tuple(apical_m)}
        return params, buffers

    def prepare(self, params, buffers):
        return {
            "basal": tuple((dendrites.masked_kernel(p, m), p["c"])
                           for p, m in zip(params["basal"], buffers["basal"])),
            "apical": tuple(dendrites.masked_kernel(p, m)
                            for p, m in zip(params["apical"], buffers["apical"])),
        }

    def _basal(self, eff, l, u):
        k, c = eff["basal"][l]
        return dendrites.apply(k, c, u, self.basal_branches)

    def _apical(self, eff, l, u):
        return dendrites.apply(eff["apical"][l], None, u, self.apical_branches)

    def input_drive(self, eff, x):
        return self._basal(eff, 0, x)

    def feedforward(self, eff, ctx, s):
        """`B_l(s_{l−1})` per layer (layer 1: the input drive)."""
        return tuple(ctx if l == 0 else self._basal(eff, l, s[l - 1]) for l in range(self.n_layers))

    def drives(self, eff, ctx, s, y1h, beta, hyper):
        ff = self.feedforward(eff, ctx, s)
        L = self.n_layers
        h = [ff[l] + hyper.alpha * self._apical(eff, l, s[l + 1]) for l in range(L - 1)]
        h.append(ff[-1] if y1h is None else ff[-1] + self.nudge(s[-1], y1h, beta))
        return tuple(h)

    def primitive(self, eff, ctx, s, y1h, beta, hyper):
        ff = self.feedforward(eff, ctx, s)
        L = self.n_layers
        phi = sum(jnp.sum(s[l] * (ff[l] + hyper.alpha * self._apical(eff, l, s[l + 1])))
                  for l in range(L - 1))
        phi = phi + jnp.sum(s[-1] * ff[-1])
        if y1h is not None:
            phi = phi + self.output_term(s[-1], y1h, beta)
        return phi / s[0].shape[0]

    def lr_tree(self, lr):
        # The apical map of hidden layer l uses the rate of synapse l+1 (SPEC §6).
        return {
            "basal": tuple({"w": lr[l], "c": lr[l]} for l in range(self.n_layers)),
            "apical": tuple({"w": lr[l + 1]} for l in range(self.n_layers - 1)),
        }
