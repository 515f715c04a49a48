"""Dendritic convolutional EP model: the dendritic rule of the dendritic-EP paper carried
to convolutions (docs/equations.md, "The dendritic convolutional network").

Geometry, inputs, pooling and the optional softmax readout are those of the conv EP model
(`ep_jax.models.conv`). Each soma (an output channel at a position, or an fc unit) has
`K_b` basal branches; branch `(c, k)` of a conv layer is a masked convolution kernel
`w_ck ⊙ m_ck` `(k, k, C_{l−1})` with bias `c_ck`, followed by ReLU; the branches are
averaged per channel, then pooled:

    B_l(u)[p, c] = P_l( (1/K_b) Σ_k ReLU(conv(u; w_ck ⊙ m_ck)[p] + c_ck) )     conv synapse
    B_l(u)_j     = (1/K_b) Σ_k ReLU((m_jk ⊙ w_jk) · flat(u) + c_jk)           fc synapse

Each mask keeps exactly `round(p·m)` (at least one) of the branch's `m` inputs (`m =
k·k·C_{l−1}` entries of its kernel, or `n_{l−1}`), drawn once at init (`ep_jax.dendrites`).
Apical branches bring the layer above down through the transposed path of synapse `l+1`:

    A_l(u) = (1/K_a) Σ_k ReLU(convᵀ(U_{l+1}(u); v_ck ⊙ m_ck))    synapse l+1 conv
    A_l(u) = reshape((1/K_a) Σ_k ReLU((m_jk ⊙ v_jk) · u))         synapse l+1 fc

with `convᵀ` the transposed convolution of synapse `l+1`'s geometry (its stride and
padding; branch `(c, k)` of channel `c` of layer `l` has its own kernel `v_ck`
`(k, k, C_{l+1})`) and `U_{l+1}` the transpose of 2×2 sum pooling (each unit copied to the
window it pools; a max pooling's argmax would need a forward pass that the apical map,
which reads only the layer above, does not have), no bias. Per-layer primitives exactly
as the dendritic MLP, drive = own partial:

    φ_l = s_l · (B_l(s_{l−1}) + α A_l(s_{l+1}))     hidden l
    φ_L = s_L · B_L(s_{L−1}) − β ℓ(o(s_L), y)       top state layer

Params: `{"basal": tuple over synapses of {"w", "c"}, "apical": tuple over hidden layers of
{"w"}}` plus `"readout": {"w", "b"}` (linear, not dendritic, as Laborieux et al.) with
`readout="softmax"`. Conv basal kernels are `(k, k, C_{l−1}, K_b·C_l)` (branch `k` of
channel `c` in output channel `k·C_l + c`, branch-major as `ep_jax.dendrites`), conv apical
kernels `(k, k, C_{l+1}, K_a·C_l)`; fc maps as the dendritic MLP. Buffers: `{"masks":
{"basal", "apical"}, "alpha"}`. Init: `w ~ U(±1/√m)`, `c ~ U(±1/√round(p·m))` (the
dendritic MLP's, with `m` the branch's input count).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ep_jax import dendrites
from ep_jax.models.base import default_float
from ep_jax.models.conv import ConvLayered, ConvSynapse, _uniform, conv2d, flat, pool2d, unpool2d


@dataclasses.dataclass(frozen=True)
class DendriticConvModel(ConvLayered):
    """Convolutional network of dendritic neurons (see the module docstring).

    Conv fields as `ConvEPModel`; basal_branches / apical_branches: branches per soma
    (K_b, K_a); sparsity: fraction `p` of a branch's inputs it sees; apical_dense: apical
    maps without masks. Setting: α (apical scale).

    >>> model = DendriticConvModel(input_shape=(28, 28, 1), channels=(32, 64), fc=(10,))
    >>> params, buffers = model.init(jax.random.PRNGKey(0), alpha=0.2)
    """

    basal_branches: int = 8
    apical_branches: int = 2
    sparsity: float = 0.5
    apical_dense: bool = False

    name = "dendritic_conv"
    SETTINGS = {"alpha": 0.2}

    def __post_init__(self):
        super().__post_init__()
        dendrites.check_fields(self)

    # --- init ------------------------------------------------------------------------
    def _branch_map(self, key, m, n, K, *, bias, dense, dtype):
        """`dendrites.init` of a map with m inputs per branch onto n somas."""
        return dendrites.init(key, m, n, K, self.sparsity, bias=bias, dense=dense, dtype=dtype)

    def init(self, key, dtype=None, **settings):
        """Basal and apical maps drawn as `dendrites.init` (reference layout, permuted to
        branch-major), masks once; the readout as PyTorch's `Linear`; settings: α."""
        dtype = dtype or default_float()
        buffers = self.settings(dtype, **settings)
        L, Kb, Ka = self.n_layers, self.basal_branches, self.apical_branches
        keys = jax.random.split(key, 2 * L + 1)
        basal, basal_m, apical, apical_m = [], [], [], []
        for l in range(L):
            sy = self.synapses[l]
            if isinstance(sy, ConvSynapse):
                k, c_in, c_out = sy.kernel, sy.in_shape[2], sy.out_shape[2]
                p, m = self._branch_map(keys[l], k * k * c_in, c_out, Kb, bias=True, dense=False, dtype=dtype)
                p = {"w": p["w"].reshape(k, k, c_in, Kb * c_out), "c": p["c"]}
                m = m.reshape(k, k, c_in, Kb * c_out)
            else:
                p, m = self._branch_map(keys[l], sy.fan_in, sy.n_out, Kb, bias=True, dense=False, dtype=dtype)
            basal.append(p)
            basal_m.append(m)
        for l in range(L - 1):  # apical map of state layer l (0-indexed): from layer l+1 via synapse l+1
            above, shape = self.synapses[l + 1], self.state_shapes[l]
            if isinstance(above, ConvSynapse):
                k, c_l, c_up = above.kernel, shape[2], above.out_shape[2]
                p, m = self._branch_map(
                    keys[L + l], k * k * c_up, c_l, Ka, bias=False, dense=self.apical_dense, dtype=dtype
                )
                p = {"w": p["w"].reshape(k, k, c_up, Ka * c_l)}
                m = m.reshape(k, k, c_up, Ka * c_l)
            else:
                n_l = math.prod(shape)
                p, m = self._branch_map(
                    keys[L + l], above.n_out, n_l, Ka, bias=False, dense=self.apical_dense, dtype=dtype
                )
            apical.append(p)
            apical_m.append(m)
        params = {"basal": tuple(basal), "apical": tuple(apical)}
        if self.readout != "none":
            sy = self.synapses[-1]
            kw, kb = jax.random.split(keys[-1])
            params["readout"] = {
                "w": _uniform(kw, (sy.fan_in, sy.n_out), sy.fan_in, dtype),
                "b": _uniform(kb, (sy.n_out,), sy.fan_in, dtype),
            }
        buffers["masks"] = {"basal": tuple(basal_m), "apical": tuple(apical_m)}
        return params, buffers

    # --- the maps --------------------------------------------------------------------
    def prepare(self, params, buffers):
        """The masked kernels `w ⊙ mask` (loop invariants; masked entries get zero gradient)."""
        masks = buffers["masks"]
        return {
            "basal": tuple((dendrites.masked_kernel(p, m), p["c"]) for p, m in zip(params["basal"], masks["basal"])),
            # conv apical kernels in the forward conv's layout (k, k, K_a·C_l, C_{l+1}), for its transpose
            "apical": tuple(
                jnp.swapaxes(dendrites.masked_kernel(p, m), 2, 3) if p["w"].ndim == 4 else dendrites.masked_kernel(p, m)
                for p, m in zip(params["apical"], masks["apical"])
            ),
            "alpha": buffers["alpha"],
            "readout": params.get("readout"),
        }

    def basal(self, eff, l, u):
        """B_{l+1}(u): basal map of synapse `l` (0-indexed) applied to the state below."""
        sy, (kernel, c) = self.synapses[l], eff["basal"][l]
        if isinstance(sy, ConvSynapse):
            z = conv2d(u, kernel, sy.stride, sy.padding) + c
            return pool2d(dendrites.soma(z, self.basal_branches), sy.pool)
        return dendrites.apply(kernel, c, flat(u), self.basal_branches)

    def apical(self, eff, l, u):
        """A_{l+1}(u): apical map of state layer `l` (0-indexed), u the state above it."""
        above, shape, kernel = self.synapses[l + 1], self.state_shapes[l], eff["apical"][l]
        Ka = self.apical_branches
        if isinstance(above, ConvSynapse):
            up = unpool2d(u, above.pool, above.conv_shape)
            # the transposed convolution of synapse l+1's geometry onto K_a·C_l branch channels;
            # `kernel` is in the forward conv's layout (k, k, K_a·C_l, C_{l+1}) (`prepare`)
            below = jax.ShapeDtypeStruct((u.shape[0],) + tuple(shape[:2]) + (kernel.shape[2],), u.dtype)
            z = jax.linear_transpose(lambda v: conv2d(v, kernel, above.stride, above.padding), below)(up)[0]
            return dendrites.soma(z, Ka)
        return dendrites.apply(kernel, None, u, Ka).reshape((u.shape[0],) + tuple(shape))

    def input_drive(self, eff, x):
        """B_1(x) (a loop invariant)."""
        return self.basal(eff, 0, self.image(x))

    def feedforward(self, eff, ctx, s):
        """`B_l(s_{l−1})` per layer (layer 1: the input drive)."""
        return (ctx,) + tuple(self.basal(eff, l, s[l - 1]) for l in range(1, self.n_layers))

    def drives(self, eff, ctx, s, target, beta):
        """h_l = ∂φ_l/∂s_l = B_l(s_{l−1}) + α A_l(s_{l+1}); the top layer's nudge through
        the readout when there is one."""
        ff = self.feedforward(eff, ctx, s)
        L = self.n_layers
        h = [ff[l] + eff["alpha"] * self.apical(eff, l, s[l + 1]) for l in range(L - 1)]
        h.append(ff[-1] if target is None else ff[-1] + self._force(eff, s[-1], target, beta))
        return tuple(h)

    def primitive(self, eff, ctx, s, target, beta):
        ff = self.feedforward(eff, ctx, s)
        L = self.n_layers
        phi = sum(jnp.sum(s[l] * (ff[l] + eff["alpha"] * self.apical(eff, l, s[l + 1]))) for l in range(L - 1))
        phi = phi + jnp.sum(s[-1] * ff[-1])
        if target is not None:
            phi = phi + self._output_term(eff, s[-1], target, beta)
        return phi / s[0].shape[0]

    def non_holomorphic(self) -> list[str]:
        """The dendritic branches pass through ReLU, which is not holomorphic."""
        return super().non_holomorphic() + ["relu (the dendritic branches)"]

    def lr_tree(self, lr):
        # the apical map of hidden layer l uses the rate of synapse l+1 (the dendritic MLP's rule)
        tree = {
            "basal": tuple({"w": lr[l], "c": lr[l]} for l in range(self.n_layers)),
            "apical": tuple({"w": lr[l + 1]} for l in range(self.n_layers - 1)),
        }
        if self.readout != "none":
            tree["readout"] = {"w": lr[self.n_layers], "b": lr[self.n_layers]}
        return tree
