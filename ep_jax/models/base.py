"""The model contract, and what every layered EP model shares.

A model is a frozen (hashable) dataclass of static structure — widths, activations,
branch counts — so it can be a `jit` static argument; every array lives in pytrees that
its pure methods take and return. `Model` states the contract; `dynamics`, the
estimators and the training step are written against it and nothing else.

Shapes: `B` batch, `n_0` input width, `n_l` width of state layer `l = 1..L`. A state `s`
is a tuple of `L` arrays `(B, n_l)` — `(B, *state_shapes[l])` in general: the conv models keep
image-shaped `(B, H, W, C)` layers, with `n_l = H·W·C` their flat size. The six methods:

- `init(key, dtype=None, **settings) -> (params, buffers)`: the trainable pytree, and the
  fixed arrays of one network: masks, and the model's numeric settings (α for the
  dendritic model, γ for the standard one) as scalar arrays, so a sweep can vmap them;
- `prepare(params, buffers) -> eff`: loop invariants computed once per batch (masked
  kernels, settings); differentiable, so masked positions get zero gradient;
- `input_drive(eff, x) -> ctx`: the part of layer 1's drive that depends on `x` only,
  `x: (B, n_0)`;
- `drives(eff, ctx, s, target, beta) -> h`: tuple of `L` drives `(B, n_l)`; `target` is a
  one-hot `(B, n_L)`, an `OutputGrad`, or `None` for the free phase; `beta` a scalar or
  `(B, 1)`;
- `primitive(eff, ctx, s, target, beta) -> ()`: the batch-mean sum of the layer
  primitives `Σ_l φ_l`; its parameter gradient, states held fixed, is what the EP
  estimators difference;
- `feedforward(eff, ctx, s) -> f`: tuple of `L` feedforward drives `(B, n_l)` (layer 1:
  `ctx`), used by the contrastive rule.

The relaxation settings (β, time steps) are not the model's: `dynamics` owns them.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from ep_jax import activations, losses
from ep_jax._checks import numeric, whole_numbers

State = tuple  # L arrays (B, n_l)


class KernelDrive(NamedTuple):
    """What the fused relaxation kernel (`ep_jax.kernels`) needs to know of a model's
    drives, `h_l = F_l(s_{l−1}) + c · G_l(s_{l+1})` (plus the input drive for l = 1 and
    the output force for l = L): `kind` ``"linear"`` (F_l: `s W_l + b_l`, G_l: `s W_{l+1}ᵀ`)
    or ``"dendritic"`` (F_l, G_l: soma averages of `basal` / `apical` ReLU branches,
    `ep_jax.dendrites`). The arrays come from `model.kernel_weights(eff)`."""

    kind: str
    basal: int = 1
    apical: int = 1


class OutputGrad(NamedTuple):
    """A fixed output-cost gradient `g` `(B, n_L)` standing in for the one-hot target:
    the nudged phases then minimise the linear cost ⟨g, s_L⟩ (the EP layer's custom VJP)."""

    g: jax.Array


@runtime_checkable
class Model(Protocol):
    """What `dynamics`, the estimators and `train_step` need of a model (module docstring)."""

    sizes: tuple[int, ...]

    @property
    def n_layers(self) -> int:
        """Number of state layers L."""

    @property
    def state_sizes(self) -> tuple[int, ...]:
        """Widths `(n_1, ..., n_L)` (flat sizes of the state layers)."""

    @property
    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Each state layer's shape without the batch axis: `(n_l,)`, or `(H, W, C)` for
        the image-shaped layers of convolutional models."""

    @property
    def n_synapses(self) -> int:
        """Weight layers, one learning rate each (`lr_tree`): L, plus a readout if any."""

    @property
    def n_classes(self) -> int:
        """Width of the output layer."""

    def init(self, key: jax.Array, dtype: Any = None, **settings) -> tuple[Any, Any]:
        """`(params, buffers)` of a fresh network (module docstring)."""

    def prepare(self, params: Any, buffers: Any) -> Any:
        """Loop invariants `eff`, computed once per batch."""

    def input_drive(self, eff: Any, x: jax.Array) -> Any:
        """The part of layer 1's drive that depends on `x` only."""

    def drives(self, eff: Any, ctx: Any, s: State, target: Any, beta: Any) -> State:
        """Drives `h_l` of every layer `(B, n_l)`."""

    def primitive(self, eff: Any, ctx: Any, s: State, target: Any, beta: Any) -> jax.Array:
        """Batch-mean sum of the layer primitives `Σ_l φ_l`."""

    def feedforward(self, eff: Any, ctx: Any, s: State) -> State:
        """Feedforward drive of every layer (layer 1: `ctx`)."""

    def output(self, eff: Any, s: State) -> jax.Array:
        """The output `(B, n_classes)` read from a state: `s_L`, or a readout of it (the
        conv models' softmax readout). Prediction `argmax`, cost `ℓ(output, ŷ)`."""

    # shared helpers (LayeredModel implements them)
    def layer_activations(self) -> tuple[Callable, ...]:
        """σ of each state layer."""

    def zero_state(self, batch: int, dtype: Any = jnp.float32) -> State:
        """The all-zero state of a batch."""

    def one_hot(self, y: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """One-hot targets `(B, n_L)`."""

    def cost(self, s_out: jax.Array, y1h: jax.Array) -> jax.Array:
        """ℓ(s_L, ŷ) per example `(B,)`."""

    def check_input(self, x: jax.Array, name: str = "x") -> None:
        """Raise naming `name` unless `x` has shape `(B, n_0)`."""

    def lr_tree(self, lr: jax.Array) -> Any:
        """Per-leaf learning rates from one rate per synapse `(L,)`."""


def default_float():
    """float64 when `jax_enable_x64` is on, else float32."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


@dataclasses.dataclass(frozen=True)
class LayeredModel(abc.ABC):
    """Widths, activations and the output cost of a layered EP network.

    sizes: `(n_0, n_1, ..., n_L)`, input first. activation: σ of the hidden layers (by
    name, `ep_jax.activations`). output_activation: σ of the output layer; by default σ
    with the MSE cost and the identity with cross-entropy. loss: `"mse"` (½‖s_L − ŷ‖²)
    or `"ce"` (softmax cross-entropy).
    """

    sizes: tuple[int, ...]
    activation: str = "hard_sigmoid"
    output_activation: str | None = None
    loss: str = "mse"

    #: numeric settings kept in `buffers` (name -> default); subclasses override.
    SETTINGS: ClassVar[dict[str, float]] = {}
    name: ClassVar[str] = "layered"

    def __post_init__(self):
        object.__setattr__(self, "sizes", whole_numbers("sizes", self.sizes))
        if len(self.sizes) < 2 or any(n < 1 for n in self.sizes):
            raise ValueError(f"sizes must list >= 2 positive widths (input, ..., output), got {self.sizes}")
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
        """Widths `(n_1, ..., n_L)` of the state layers."""
        return self.sizes[1:]

    @property
    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Each state layer's shape without the batch axis: `(n_l,)`."""
        return tuple((n,) for n in self.state_sizes)

    @property
    def n_synapses(self) -> int:
        """Weight layers (one learning rate each): one per state layer."""
        return self.n_layers

    @property
    def n_classes(self) -> int:
        """Width of the output layer."""
        return self.sizes[-1]

    @property
    def out_activation_name(self) -> str:
        """With MSE the output passes through σ; with cross-entropy it is the raw drive."""
        if self.output_activation is not None:
            return self.output_activation
        return self.activation if self.loss == "mse" else "identity"

    def non_holomorphic(self) -> list[str]:
        """The parts of this model that are not holomorphic functions (empty: the
        holomorphic estimator may run it at complex states): activations outside
        `ep_jax.activations.HOLOMORPHIC`. Both costs are holomorphic (the cross-entropy's
        log-softmax shifts by a constant, which leaves it holomorphic). Subclasses add
        their own parts."""
        bad = []
        for role, name in (("activation", self.activation), ("output activation", self.out_activation_name)):
            if name not in activations.HOLOMORPHIC and f"{role} {name!r}" not in bad:
                bad.append(f"{role} {name!r}")
        return bad

    def layer_activations(self):
        """σ of each state layer: the hidden σ, then the output's."""
        hidden = activations.get_activation(self.activation)
        out = activations.get_activation(self.out_activation_name)
        return (hidden,) * (self.n_layers - 1) + (out,)

    def zero_state(self, batch: int, dtype=jnp.float32):
        """Every state starts at zero for every example."""
        return tuple(jnp.zeros((batch,) + shape, dtype) for shape in self.state_shapes)

    def one_hot(self, y, dtype=jnp.float32):
        """One-hot targets `(B, n_L)` from integer labels `(B,)`."""
        return jax.nn.one_hot(y, self.n_classes, dtype=dtype)

    def output(self, eff, s):
        """The output is the last state layer `s_L` (a readout model overrides this)."""
        return s[-1]

    def kernel_drive(self) -> KernelDrive | None:
        """The fused kernel's description of this model's drives (`KernelDrive`), or None:
        no kernel (the `Pallas` solver then runs the scan)."""
        return None

    def kernel_weights(self, eff) -> dict:
        """The kernel's arrays from `eff`, for synapses 2..L (layer 1's drive is `ctx`):
        `{"w": (F_l's kernel, ...), "b": (F_l's bias, ...), "back": (G_l's kernel for the
        hidden layers, ...), "scale": c}` (`KernelDrive`)."""
        raise NotImplementedError

    # --- settings --------------------------------------------------------------------
    def settings(self, dtype=None, **given) -> dict:
        """The numeric settings as scalar arrays, defaults from `SETTINGS` filled in.

        Raises on unknown names and non-finite values (both are user mistakes)."""
        unknown = sorted(set(given) - set(self.SETTINGS))
        if unknown:
            known = sorted(self.SETTINGS) or "none"
            raise ValueError(f"unknown setting(s) {unknown} for the {self.name!r} model; its settings: {known}")
        dtype = dtype or default_float()
        out = {}
        for k, default in self.SETTINGS.items():
            v = numeric(f"setting {k}", given.get(k, default))
            if jnp.ndim(v) != 0:
                raise ValueError(f"setting {k} must be a scalar, got shape {jnp.shape(v)}")
            try:
                bad = not bool(jnp.isfinite(v))
            except jax.errors.ConcretizationTypeError:
                bad = False  # traced (vmapped init): checked by whoever built the values
            if bad:
                raise ValueError(f"setting {k} must be finite, got {v}")
            out[k] = jnp.asarray(v, dtype)
        return out

    @abc.abstractmethod
    def init(self, key, dtype=None, **settings):
        """`(params, buffers)` of a fresh network (see `Model`)."""

    @abc.abstractmethod
    def prepare(self, params, buffers):
        """Loop invariants `eff` (see `Model`)."""

    @abc.abstractmethod
    def input_drive(self, eff, x):
        """Layer 1's input-dependent drive (see `Model`)."""

    @abc.abstractmethod
    def drives(self, eff, ctx, s, target, beta):
        """Drives `h_l` of every layer (see `Model`)."""

    @abc.abstractmethod
    def primitive(self, eff, ctx, s, target, beta):
        """Batch-mean `Σ_l φ_l` (see `Model`)."""

    @abc.abstractmethod
    def feedforward(self, eff, ctx, s):
        """Feedforward drive of every layer (see `Model`)."""

    @abc.abstractmethod
    def lr_tree(self, lr):
        """Per-leaf learning rates (a pytree like params) from one rate per synapse `(L,)`."""

    # --- output cost -------------------------------------------------------------------
    def cost(self, s_out, y1h):
        """ℓ(s_L, ŷ) per example, shape `(B,)`."""
        return losses.loss(self.loss, s_out, y1h)

    def nudge(self, s_out, target, beta):
        """The output force −β ∂ℓ/∂s_L; `beta` is a scalar or broadcastable to `(B, 1)`.

        `target` is a one-hot `(B, n_L)` or an `OutputGrad(g)`: then the cost is the
        linear ⟨g, s_L⟩ and the force −β g."""
        if isinstance(target, OutputGrad):
            return -beta * target.g
        return -beta * losses.loss_grad(self.loss, s_out, target)

    def output_term(self, s_out, target, beta):
        """−β ℓ(s_L, y), batch-summed (the θ-free part of the output primitive)."""
        if isinstance(target, OutputGrad):
            return -jnp.sum(beta * jnp.sum(target.g * s_out, axis=-1, keepdims=True))
        return -jnp.sum(jnp.ravel(beta) * self.cost(s_out, target))

    # --- checks (shapes are static, so these run at trace time) -----------------------
    def check_input(self, x, name: str = "x"):
        """Raise naming `name` unless `x` has shape `(B, n_0)`."""
        if jnp.ndim(x) != 2 or jnp.shape(x)[1] != self.sizes[0]:
            raise ValueError(
                f"{name} must have shape (batch, {self.sizes[0]}) for a model with sizes "
                f"{self.sizes}, got {tuple(jnp.shape(x))}"
            )

    def check_state(self, s):
        """Raise unless `s` holds one `(B, *state_shapes[l])` array per state layer."""
        if len(s) != self.n_layers:
            raise ValueError(f"state must hold {self.n_layers} layers, got {len(s)}")
        for l, (sl, shape) in enumerate(zip(s, self.state_shapes), start=1):
            if sl.ndim <= len(shape) or tuple(sl.shape[-len(shape) :]) != shape:
                raise ValueError(
                    f"state layer {l} must have shape (batch, {', '.join(map(str, shape))}), got {tuple(sl.shape)}"
                )


# --- the network's pytrees against the model (shapes are static: free, at trace time) ----


def _paths(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(jnp.shape(leaf)) for p, leaf in leaves}


def _expected(model):
    # the shapes `model.init` makes, traced abstractly (no arrays are drawn)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    params, buffers = jax.eval_shape(lambda k: model.init(k), key)
    return _paths(params), _paths(buffers)


_expected_cached = functools.lru_cache(maxsize=64)(_expected)


def _describe(model) -> str:
    name = getattr(model, "name", type(model).__name__)
    return f"the {name!r} model with sizes {tuple(model.sizes)}"


def _leaves(names) -> str:
    shown = ", ".join(names[:4]) + (f" (and {len(names) - 4} more)" if len(names) > 4 else "")
    return ("leaf " if len(names) == 1 else "leaves ") + shown


def _compare(what: str, given: dict, expected: dict, model):
    missing = [k or "(root)" for k in expected if k not in given]
    if missing:
        raise ValueError(f"{what} is missing the {_leaves(missing)} that {_describe(model)} needs")
    extra = [k or "(root)" for k in given if k not in expected]
    if extra:
        raise ValueError(
            f"{what} has the {_leaves(extra)}, which {_describe(model)} does not have ({what} of another model?)"
        )
    for k, shape in expected.items():
        if given[k] != shape:
            raise ValueError(
                f"{what} leaf {k} has shape {given[k]}, expected {shape} for {_describe(model)} "
                f"({what} of another model?)"
            )


def check_network(model, params, buffers=None):
    """Raise a one-line ValueError unless `params` (and `buffers`, when given) have the
    leaves and shapes that `model.init` makes: naming the missing or unexpected leaf, or
    the leaf whose shape differs and the shape expected. Shapes are static, so under jit
    this runs once, at trace time, and costs nothing per step; dtypes are not checked."""
    try:
        try:
            hash(model)
        except TypeError:  # an unhashable (user-defined) model: not cached
            expected = _expected(model)
        else:
            expected = _expected_cached(model)
    except Exception:  # noqa: BLE001 - a user model whose init cannot be traced abstractly: nothing to compare
        return
    _compare("params", _paths(params), expected[0], model)
    if buffers is not None:
        _compare("buffers", _paths(buffers), expected[1], model)
