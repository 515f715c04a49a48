"""Convolutional EP model (Laborieux et al. 2021, "Scaling EP to deep ConvNets").

Layers: `k` convolutional state layers, then fully connected ones. Synapse `l` maps the
state below, `s_{l−1}` (the input `x` for l = 1), to layer `l`'s feedforward drive

    conv:  f_l(u) = P_l(conv(u; W_l) + b_l)     W_l: (k_l, k_l, C_{l−1}, C_l), stride, padding
    fc:    f_l(u) = flat(u) W_l + b_l           W_l: (n_{l−1}, n_l), flat: row-major H·W·C

with `P_l` a 2×2, stride-2 max or average pooling (or none) applied to the conv map. The
primitive (negative energy), batch-mean:

    Φ(s) = Σ_{l=1..L} s_l · f_l(s_{l−1})  −  β ℓ(o(s_L), y)

and every drive is its partial derivative `h_l = ∂Φ/∂s_l = f_l(s_{l−1}) + ∂_{s_l}(s_{l+1} ·
f_{l+1}(s_l))`: the feedback into a conv layer is the transposed path of the synapse above
(the transposed convolution of the un-pooled state above; a max pooling routes it to the
argmax of each window only, the first one in row-major order on ties, as PyTorch's
`MaxPool2d`). The drives are computed by `jax.grad` of Φ with respect to the states.

Output `o`: with `readout="none"` the last state layer is the output (`o(s_L) = s_L`,
`fc[-1]` wide; ℓ is MSE or cross-entropy as `loss`). With `readout="softmax"` (Laborieux
et al. 2021) the last state layer is the *penultimate* layer and `o(s_L) = flat(s_L) W_o +
b_o` is a linear readout outside the dynamics (`fc[-1]` wide), with ℓ the softmax
cross-entropy: it enters the dynamics only through the nudge `−β ∂ℓ(o(s_L))/∂s_L =
−β W_o (softmax(o) − ŷ)`, and its weights get the gradient of the `−βℓ` term of Φ. `output`
gives `o` (prediction `argmax o`, cost `ℓ(o, ŷ)`).

Shapes. Inputs `x`: `(B, H·W·C)` (images flattened row-major in H, W, C order, as the data
pipeline serves them) or `(B, H, W, C)`. Conv state layers `(B, H_l, W_l, C_l)` with
`H_l = pool(⌊(H_{l−1} + 2p_l − k_l)/s_l⌋ + 1)`, `pool(n) = ⌊n/2⌋` (or n without pooling);
fc state layers `(B, n_l)`. `state_shapes` lists them without the batch axis; `sizes` is
`(H·W·C, n_1, ..., n_L)` with `n_l` the flat size of state layer `l` (derived; with the
softmax readout it does not include the readout, whose width is `n_classes = fc[-1]`).

Params: a tuple over synapses of `{"w", "b"}` (conv: `w (k, k, C_{l−1}, C_l)`, `b (C_l,)`;
fc: `w (n_{l−1}, n_l)`, `b (n_l,)`), the readout last when present. Init as PyTorch's
`Conv2d`/`Linear`: `w, b ~ U(±1/√fan_in)`, fan_in = k·k·C_{l−1} or n_{l−1}. Buffers: `{}`
(no settings). One learning rate per synapse, the readout included (`n_synapses`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ep_jax import activations
from ep_jax._checks import whole_numbers
from ep_jax.models.base import LayeredModel, default_float

POOLS = ("max", "avg", "none")
READOUTS = ("none", "softmax")


# --- geometry -------------------------------------------------------------------------


class ConvSynapse(NamedTuple):
    """A k×k convolution (then pooling) from `in_shape` (H, W, C_in) to `out_shape`."""

    kernel: int
    stride: int
    padding: int
    pool: str
    in_shape: tuple  # (H, W, C_in)
    conv_shape: tuple  # (H', W', C_out) before pooling
    out_shape: tuple  # after pooling

    @property
    def fan_in(self) -> int:
        """Inputs of one output unit: k·k·C_in (PyTorch's init bound is 1/√fan_in)."""
        return self.kernel * self.kernel * self.in_shape[2]


class DenseSynapse(NamedTuple):
    """A fully connected map from the flattened `in_shape` to `n_out` units."""

    in_shape: tuple
    n_out: int

    @property
    def fan_in(self) -> int:
        """Inputs of one output unit: the flattened input layer."""
        return math.prod(self.in_shape)

    @property
    def out_shape(self) -> tuple:
        """The state shape it drives, `(n_out,)`."""
        return (self.n_out,)


def conv_geometry(input_shape, channels, kernels, strides, paddings, pools, fc, readout):
    """The synapses and the state shapes of a conv network; one-line ValueErrors for
    inconsistent or impossible shapes. Returns `(synapses, state_shapes)`: every synapse,
    the readout last when `readout != "none"`; the state shapes exclude the readout."""
    if len(input_shape) != 3 or any(n < 1 for n in input_shape):
        raise ValueError(f"input_shape must be three positive integers (H, W, C), got {input_shape}")
    k = len(channels)
    if k < 1:
        raise ValueError("channels must list at least one convolutional layer (for none, use the 'ep' model)")
    lengths = {
        "channels": k,
        "kernels": len(kernels),
        "strides": len(strides),
        "paddings": len(paddings),
        "pools": len(pools),
    }
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"channels, kernels, strides, paddings and pools must have one entry per conv layer, got lengths {lengths}"
        )
    if any(c < 1 for c in channels):
        raise ValueError(f"channels must be >= 1, got {channels}")
    if any(a < 1 for a in kernels) or any(a < 1 for a in strides) or any(a < 0 for a in paddings):
        raise ValueError(
            f"kernels and strides must be >= 1 and paddings >= 0, got kernels {kernels}, "
            f"strides {strides}, paddings {paddings}"
        )
    bad = [p for p in pools if p not in POOLS]
    if bad:
        raise ValueError(f"pools must each be one of {list(POOLS)}, got {bad[0]!r}")
    if len(fc) < 1 or any(n < 1 for n in fc):
        raise ValueError(f"fc must list >= 1 positive widths (the last is the number of classes), got {fc}")
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {list(READOUTS)}, got {readout!r}")
    synapses, shape = [], tuple(input_shape)
    for l, (c, ks, st, pad, pool) in enumerate(zip(channels, kernels, strides, paddings, pools), start=1):
        H, W, _ = shape
        if ks > H + 2 * pad or ks > W + 2 * pad:
            raise ValueError(
                f"conv layer {l}: kernel {ks} is larger than its padded input "
                f"{H + 2 * pad}x{W + 2 * pad} (input {H}x{W}, padding {pad})"
            )
        Ho, Wo = (H + 2 * pad - ks) // st + 1, (W + 2 * pad - ks) // st + 1
        conv_shape = (Ho, Wo, c)
        if pool != "none":
            if Ho < 2 or Wo < 2:
                raise ValueError(
                    f"conv layer {l}: {pool} pooling (2x2, stride 2) of its {Ho}x{Wo} map leaves a zero-sized map"
                )
            Ho, Wo = Ho // 2, Wo // 2
        synapses.append(ConvSynapse(ks, st, pad, pool, shape, conv_shape, (Ho, Wo, c)))
        shape = (Ho, Wo, c)
    for n in fc:
        synapses.append(DenseSynapse(shape, n))
        shape = (n,)
    state_shapes = tuple(sy.out_shape for sy in (synapses if readout == "none" else synapses[:-1]))
    return tuple(synapses), state_shapes


# --- the operations -------------------------------------------------------------------


def conv2d(u, w, stride: int, padding: int):
    """`(B, H, W, C_in) * (k, k, C_in, C_out) -> (B, H', W', C_out)` (cross-correlation, as
    PyTorch's `Conv2d`), zero padding `padding` on every side."""
    return lax.conv_general_dilated(
        u, w, (stride, stride), ((padding, padding), (padding, padding)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def pool2d(z, pool: str):
    """2×2, stride-2 pooling of `(B, H, W, C)` (an odd last row/column is dropped, as
    PyTorch's pooling): `max` (its gradient routes to the first argmax of each window),
    `avg`, or `none` (the identity)."""
    if pool == "none":
        return z
    win = (1, 2, 2, 1)
    if pool == "max":
        return lax.reduce_window(z, -jnp.inf, lax.max, win, win, "VALID")
    return lax.reduce_window(z, 0.0, lax.add, win, win, "VALID") / 4


def unpool2d(u, pool: str, conv_shape):
    """The transpose of 2×2 *sum* pooling: each unit's value copied to the window it pools,
    zero on a dropped odd row/column; `(B, H'', W'', C) -> (B, H', W', C)` with
    `conv_shape = (H', W', C)`. The identity without pooling."""
    if pool == "none":
        return u
    win = (1, 2, 2, 1)
    sum_pool = lambda z: lax.reduce_window(z, 0.0, lax.add, win, win, "VALID")
    zeros = jax.ShapeDtypeStruct((u.shape[0],) + tuple(conv_shape), u.dtype)
    return jax.linear_transpose(sum_pool, zeros)(u)[0]


def flat(u):
    """`(B, ...) -> (B, prod(...))`, row-major."""
    return u.reshape(u.shape[0], -1)


def _uniform(key, shape, fan_in, dtype):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


# --- what both convolutional models share ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvLayered(LayeredModel):
    """Conv geometry, inputs, the output (readout) and learning-rate count shared by the
    convolutional models; subclasses give the maps (see the module docstring).

    sizes: derived (`(H·W·C, n_1, ..., n_L)`, flat sizes); given, it must equal the derived
    one. input_shape `(H, W, C)`; channels, kernels, strides, paddings, pools: one entry per
    conv layer; fc: widths of the fully connected layers after the convs, the last the
    number of classes; readout: `"none"` or `"softmax"` (needs `loss="ce"`).
    """

    sizes: tuple = ()
    input_shape: tuple = (28, 28, 1)
    channels: tuple = (32, 64)
    kernels: tuple = (5, 5)
    strides: tuple = (1, 1)
    paddings: tuple = (0, 0)
    pools: tuple = ("max", "max")
    fc: tuple = (10,)
    readout: str = "none"

    def __post_init__(self):
        for name in ("input_shape", "channels", "kernels", "strides", "paddings", "fc"):
            object.__setattr__(self, name, whole_numbers(name, getattr(self, name)))
        pools = self.pools if isinstance(self.pools, (list, tuple)) else (self.pools,)
        object.__setattr__(self, "pools", tuple(str(p) for p in pools))
        synapses, shapes = conv_geometry(
            self.input_shape,
            self.channels,
            self.kernels,
            self.strides,
            self.paddings,
            self.pools,
            self.fc,
            self.readout,
        )
        derived = (math.prod(self.input_shape),) + tuple(math.prod(s) for s in shapes)
        if self.sizes and whole_numbers("sizes", self.sizes) != derived:
            raise ValueError(
                f"sizes {tuple(self.sizes)} disagree with the conv geometry, which gives {derived} "
                "(leave sizes out: it is derived)"
            )
        object.__setattr__(self, "sizes", derived)
        object.__setattr__(self, "_synapses", synapses)
        object.__setattr__(self, "_state_shapes", shapes)
        if self.readout == "softmax":
            if self.loss != "ce":
                raise ValueError(f"readout='softmax' is the cross-entropy readout: give loss='ce', got {self.loss!r}")
            if self.output_activation is not None:
                raise ValueError(
                    "output_activation must be None with readout='softmax' (the last state layer "
                    "is a hidden layer, with the hidden activation)"
                )
        super().__post_init__()

    # --- structure -------------------------------------------------------------------
    @property
    def state_shapes(self) -> tuple:
        """Per state layer, its shape without the batch axis: `(H, W, C)` or `(n,)`."""
        return self._state_shapes

    @property
    def synapses(self) -> tuple:
        """`ConvSynapse` / `DenseSynapse` per synapse, the readout last when present."""
        return self._synapses

    @property
    def n_conv(self) -> int:
        """Number of convolutional synapses."""
        return len(self.channels)

    @property
    def n_synapses(self) -> int:
        """Weight layers: one per state layer, plus the readout."""
        return self.n_layers + (self.readout != "none")

    @property
    def n_classes(self) -> int:
        """Width of the output `o`: `fc[-1]`."""
        return self.fc[-1]

    @property
    def out_activation_name(self) -> str:
        """With the softmax readout the last state layer is hidden: the hidden σ."""
        if self.readout != "none":
            return self.activation
        return super().out_activation_name

    def non_holomorphic(self) -> list[str]:
        """Parts that are not holomorphic (the holomorphic estimator refuses them): the
        layered model's, and max pooling."""
        parent = getattr(super(), "non_holomorphic", None)
        bad = list(parent()) if parent is not None else []
        return bad + (["max pooling"] if "max" in self.pools else [])

    def layer_activations(self):
        if self.readout != "none":
            return (activations.get_activation(self.activation),) * self.n_layers
        return super().layer_activations()

    # --- inputs ----------------------------------------------------------------------
    def check_input(self, x, name: str = "x"):
        """Raise naming `name` unless `x` is `(B, H·W·C)` or `(B, H, W, C)`."""
        shape = tuple(jnp.shape(x))
        if (len(shape) == 2 and shape[1] == self.sizes[0]) or (len(shape) == 4 and shape[1:] == self.input_shape):
            return
        H, W, C = self.input_shape
        raise ValueError(
            f"{name} must have shape (batch, {self.sizes[0]}) (images flattened row-major, H*W*C) or "
            f"(batch, {H}, {W}, {C}) for this conv model, got {shape}"
        )

    def image(self, x):
        """`x` as `(B, H, W, C)` (a flat `(B, H·W·C)` is read row-major)."""
        return x.reshape((x.shape[0],) + self.input_shape) if x.ndim == 2 else x

    # --- output ----------------------------------------------------------------------
    def output(self, eff, s):
        """The output `o` `(B, n_classes)`: `s_L`, or the linear readout of `s_L`."""
        return self._out(eff, s[-1])

    def _out(self, eff, s_top):
        if self.readout == "none":
            return s_top
        r = eff["readout"]
        return flat(s_top) @ r["w"] + r["b"]

    def _output_term(self, eff, s_top, target, beta):
        """−β ℓ(o(s_L), y), batch-summed."""
        return self.output_term(self._out(eff, s_top), target, beta)

    def _force(self, eff, s_top, target, beta):
        """The nudge −β ∂ℓ(o(s_L))/∂s_L, through the readout when there is one."""
        if self.readout == "none":
            return self.nudge(s_top, target, beta)
        return jax.grad(lambda u: self._output_term(eff, u, target, beta), holomorphic=jnp.iscomplexobj(s_top))(s_top)


# --- the standard convolutional network ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvEPModel(ConvLayered):
    """Convolutional EP network with one energy (see the module docstring).

    >>> model = ConvEPModel(input_shape=(28, 28, 1), channels=(32, 64), kernels=(5, 5),
    ...                     strides=(1, 1), paddings=(0, 0), pools=("max", "max"), fc=(10,))
    >>> params, buffers = model.init(jax.random.PRNGKey(0))
    """

    name = "conv"
    SETTINGS = {}

    def init(self, key, dtype=None, **settings):
        """PyTorch's `Conv2d` / `Linear` default: w, b ~ U(±1/√fan_in)."""
        dtype = dtype or default_float()
        buffers = self.settings(dtype, **settings)
        params = []
        for k, sy in zip(jax.random.split(key, len(self.synapses)), self.synapses):
            kw, kb = jax.random.split(k)
            if isinstance(sy, ConvSynapse):
                shape = (sy.kernel, sy.kernel, sy.in_shape[2], sy.out_shape[2])
            else:
                shape = (sy.fan_in, sy.n_out)
            params.append({"w": _uniform(kw, shape, sy.fan_in, dtype), "b": _uniform(kb, shape[-1:], sy.fan_in, dtype)})
        return tuple(params), buffers

    def prepare(self, params, buffers):
        layers = params[: self.n_layers]
        return {"layers": layers, "readout": params[-1] if self.readout != "none" else None}

    def synapse(self, eff, l, u):
        """f_{l+1}(u): synapse `l` (0-indexed) applied to the state below it."""
        sy, p = self.synapses[l], eff["layers"][l]
        if isinstance(sy, ConvSynapse):
            return pool2d(conv2d(u, p["w"], sy.stride, sy.padding) + p["b"], sy.pool)
        return flat(u) @ p["w"] + p["b"]

    def input_drive(self, eff, x):
        """f_1(x): the first convolution of the input, pooled (a loop invariant)."""
        return self.synapse(eff, 0, self.image(x))

    def feedforward(self, eff, ctx, s):
        """`f_l(s_{l−1})` per layer (layer 1: the input drive)."""
        return (ctx,) + tuple(self.synapse(eff, l, s[l - 1]) for l in range(1, self.n_layers))

    def _phi(self, eff, ctx, s, target, beta):
        phi = sum(jnp.sum(sl * fl) for sl, fl in zip(s, self.feedforward(eff, ctx, s)))
        if target is not None:
            phi = phi + self._output_term(eff, s[-1], target, beta)
        return phi

    def drives(self, eff, ctx, s, target, beta):
        """`h_l = ∂Φ/∂s_l` (batch-summed Φ: each example's own partial), by `jax.grad`
        (complex derivative for complex states: Φ is holomorphic in s without max pooling)."""
        holo = jnp.iscomplexobj(s[0])
        return tuple(jax.grad(lambda st: self._phi(eff, ctx, st, target, beta), holomorphic=holo)(tuple(s)))

    def primitive(self, eff, ctx, s, target, beta):
        return self._phi(eff, ctx, s, target, beta) / s[0].shape[0]

    def lr_tree(self, lr):
        return tuple({"w": lr[l], "b": lr[l]} for l in range(self.n_synapses))
