"""What every layered EP model shares: widths, activations, output cost, input checks.

A model is a frozen (hashable) dataclass of static structure; all arrays live in pytrees
passed to its pure methods:

- `init(key)` -> `(params, buffers)`: trainable pytree, and fixed arrays (masks);
- `prepare(params, buffers)` -> `eff`: loop invariants computed once per batch
  (masked kernels); differentiable, so masked positions get zero gradient;
- `input_drive(eff, x)` -> `ctx`: the part of layer 1's drive that depends on `x` only;
- `drives(eff, ctx, s, y1h, beta, hyper)` -> tuple of `h_l`, one per state layer;
- `primitive(eff, ctx, s, y1h, beta, hyper)` -> scalar Σ_l φ_l, batch-mean; its
  gradient with respect to params is what the EP estimators difference.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ep_jax import activations, losses


class OutputGrad(NamedTuple):
    """A fixed output-cost gradient `g` (batch, n_L) standing in for the one-hot target:
    the nudged phases then minimise the linear cost ⟨g, s_L⟩."""
    g: jax.Array


@dataclasses.dataclass(frozen=True)
class LayeredModel:
    sizes: tuple[int, ...]
    activation: str = "hard_sigmoid"
    output_activation: str | None = None
    loss: str = "mse"

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(int(n) for n in self.sizes))
        if len(self.sizes) < 2 or any(n < 1 for n in self.sizes):
            raise ValueError(
                f"sizes must list >= 2 positive widths (input, ..., output), got {self.sizes}"
            )
        losses.check_loss(self.loss)
        activations.get_activation(self.activation)
        activations.get_activation(self.out_activation_name)

    # --- structure -------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Number of state layers L (= number of synapses)."""
        return len(self.sizes) - 1

    @property
    def state_sizes(self) -> tuple[int, ...]:
        return self.sizes[1:]

    @property
    def n_classes(self) -> int:
        return self.sizes[-1]

    @property
    def out_activation_name(self) -> str:
        # SPEC §1: with MSE the output passes through σ; with cross-entropy it is the raw drive.
        if self.output_activation is not None:
            return self.output_activation
        return self.activation if self.loss == "mse" else "identity"

    def layer_activations(self):
        hidden = activations.get_activation(self.activation)
        out = activations.get_activation(self.out_activation_name)
        return (hidden,) * (self.n_layers - 1) + (out,)

    def zero_state(self, batch: int, dtype=jnp.float32):
        """Every state starts at zero for every example (SPEC)."""
        return tuple(jnp.zeros((batch, n), dtype) for n in self.state_sizes)

    def one_hot(self, y, dtype=jnp.float32):
        return jax.nn.one_hot(y, self.n_classes, dtype=dtype)

    # --- output cost -------------------------------------------------------------------
    def cost(self, s_out, y1h):
        return losses.loss(self.loss, s_out, y1h)

    def nudge(self, s_out, y1h, beta):
        """−β ∂ℓ/∂s_L; `beta` is a scalar or broadcastable to (batch, 1).

        `y1h` is a one-hot target, or an `OutputGrad(g)`: then the cost is the linear
        ⟨g, s_L⟩ and the force is −β g (used by the EP layer's custom VJP)."""
        if isinstance(y1h, OutputGrad):
            return -beta * y1h.g
        return -beta * losses.loss_grad(self.loss, s_out, y1h)

    def output_term(self, s_out, y1h, beta):
        """−β ℓ(s_L, y), batch-summed (the θ-free part of the output primitive)."""
        if isinstance(y1h, OutputGrad):
            return -jnp.sum(beta * jnp.sum(y1h.g * s_out, axis=-1, keepdims=True))
        return -jnp.sum(jnp.ravel(beta) * self.cost(s_out, y1h))

    # --- checks (shapes are static, so these run at trace time) -----------------------
    def check_input(self, x, name: str = "x"):
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(
                f"{name} must have shape (batch, {self.sizes[0]}) for a model with sizes "
                f"{self.sizes}, got {tuple(x.shape)}"
            )

    def check_state(self, s):
        if len(s) != self.n_layers:
            raise ValueError(f"state must hold {self.n_layers} layers, got {len(s)}")
        for l, (sl, n) in enumerate(zip(s, self.state_sizes), start=1):
            if sl.shape[-1] != n:
                raise ValueError(f"state layer {l} must have width {n}, got shape {sl.shape}")

    # --- learning rates ------------------------------------------------------------------
    def lr_tree(self, lr):
        """Per-leaf learning rates (a pytree like params) from one rate per synapse."""
        raise NotImplementedError
