"""Dendritic EP model (the reference `Dendritic_MLP`).

Per synapse l = 1..L a basal map `B_l: n_{l−1} -> n_l` (K_b branches, with bias); per
hidden layer l = 1..L−1 an apical map `A_l: n_{l+1} -> n_l` (K_a branches, no bias), see
`ep_jax.dendrites`. Each layer has its own primitive and its drive is that primitive's
own partial derivative:

    φ_l = s_l · (B_l(s_{l−1}) + α A_l(s_{l+1}))     hidden l,   h_l = B_l(s_{l−1}) + α A_l(s_{l+1})
    φ_L = s_L · B_L(s_{L−1}) − β ℓ(s_L, y)           output,     h_L = B_L(s_{L−1}) − β ∂ℓ/∂s_L

There is no single energy: the dynamics are a vector field, not a gradient flow, so EP
gradients of the hidden maps are not BPTT gradients (docs/ep-vs-bptt.md). Each
parameter belongs to exactly one φ_l, so ∂_θ Σ_l φ_l is the per-layer-primitive gradient
the estimators need.

Params: `{"basal": tuple over synapses of {"w", "c"}, "apical": tuple over hidden layers
of {"w"}}`. Buffers: `{"masks": {"basal": (...), "apical": (...)}, "alpha": ()}` — the
fixed binary masks (same structure as the weights) and the apical scale α.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ep_jax import dendrites
from ep_jax.models.base import KernelDrive, LayeredModel, default_float


@dataclasses.dataclass(frozen=True)
class DendriticModel(LayeredModel):
    """Layered network of dendritic neurons (see the module docstring).

    basal_branches / apical_branches: branches per soma (K_b, K_a); sparsity: fraction
    `p` of a branch's inputs it sees; apical_dense: apical maps without masks.

    >>> model = DendriticModel(sizes=(784, 256, 10))       # K_b = 8, K_a = 2, p = 0.5
    >>> params, buffers = model.init(jax.random.PRNGKey(0), alpha=0.2)
    """

    basal_branches: int = 8
    apical_branches: int = 2
    sparsity: float = 0.5
    apical_dense: bool = False

    name = "dendritic"
    SETTINGS = {"alpha": 0.2}

    def __post_init__(self):
        super().__post_init__()
        dendrites.check_fields(self)

    def init(self, key, dtype=None, **settings):
        """Basal and apical maps (`dendrites.init`), masks drawn once; settings: α."""
        dtype = dtype or default_float()
        buffers = self.settings(dtype, **settings)
        L = self.n_layers
        keys = jax.random.split(key, 2 * L)
        basal, basal_m, apical, apical_m = [], [], [], []
        for l in range(L):
            p, m = dendrites.init(
                keys[l], self.sizes[l], self.sizes[l + 1], self.basal_branches, self.sparsity, bias=True, dtype=dtype
            )
            basal.append(p)
            basal_m.append(m)
        for l in range(L - 1):  # apical map of hidden layer l+1: n_{l+2} -> n_{l+1}
            p, m = dendrites.init(
                keys[L + l],
                self.sizes[l + 2],
                self.sizes[l + 1],
                self.apical_branches,
                self.sparsity,
                bias=False,
                dense=self.apical_dense,
                dtype=dtype,
            )
            apical.append(p)
            apical_m.append(m)
        params = {"basal": tuple(basal), "apical": tuple(apical)}
        buffers["masks"] = {"basal": tuple(basal_m), "apical": tuple(apical_m)}
        return params, buffers

    def prepare(self, params, buffers):
        masks = buffers["masks"]
        return {
            "basal": tuple((dendrites.masked_kernel(p, m), p["c"]) for p, m in zip(params["basal"], masks["basal"])),
            "apical": tuple(dendrites.masked_kernel(p, m) for p, m in zip(params["apical"], masks["apical"])),
            "alpha": buffers["alpha"],
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

    def drives(self, eff, ctx, s, target, beta):
        ff = self.feedforward(eff, ctx, s)
        L = self.n_layers
        h = [ff[l] + eff["alpha"] * self._apical(eff, l, s[l + 1]) for l in range(L - 1)]
        h.append(ff[-1] if target is None else ff[-1] + self.nudge(s[-1], target, beta))
        return tuple(h)

    def primitive(self, eff, ctx, s, target, beta):
        ff = self.feedforward(eff, ctx, s)
        L = self.n_layers
        phi = sum(jnp.sum(s[l] * (ff[l] + eff["alpha"] * self._apical(eff, l, s[l + 1]))) for l in range(L - 1))
        phi = phi + jnp.sum(s[-1] * ff[-1])
        if target is not None:
            phi = phi + self.output_term(s[-1], target, beta)
        return phi / s[0].shape[0]

    def kernel_drive(self) -> KernelDrive:
        """`h_l = B_l(s_{l−1}) + α A_l(s_{l+1})`: branch-major masked kernels (`prepare`)."""
        return KernelDrive("dendritic", self.basal_branches, self.apical_branches)

    def kernel_weights(self, eff) -> dict:
        L = self.n_layers
        return {
            "w": tuple(eff["basal"][l][0] for l in range(1, L)),
            "b": tuple(eff["basal"][l][1] for l in range(1, L)),
            "back": tuple(eff["apical"][l] for l in range(L - 1)),
            "scale": eff["alpha"],
        }

    def non_holomorphic(self) -> list[str]:
        """The dendritic branches pass through ReLU, which is not holomorphic."""
        return super().non_holomorphic() + ["relu (the dendritic branches)"]

    def lr_tree(self, lr):
        # The apical map of hidden layer l uses the rate of synapse l+1 (the authors' code).
        return {
            "basal": tuple({"w": lr[l], "c": lr[l]} for l in range(self.n_layers)),
            "apical": tuple({"w": lr[l + 1]} for l in range(self.n_layers - 1)),
        }
