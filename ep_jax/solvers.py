"""Relaxation solvers: how a phase (free or nudged) is run, as a part the estimators take.

Every solver has the same call,

    state, info = solver(model, eff, ctx, s, target, beta, dt, steps)

— the model, its prepared parameters `eff` (`model.prepare`), the input drive `ctx`
(`model.input_drive`), the start state `s`, the target (`None` for the free phase), β (a
scalar or `(B, 1)`), the per-layer time steps `dt` (`Relaxation.dt`: scalars or
per-neuron arrays) and a step budget — and returns the final state and a `SolveInfo`:
the relative residual of the last step (`dynamics.relative_residual`) and the steps
taken. `solver.phases(...)` runs the nudged phases of several β (e.g. `(β, −β)`) from one
free state. Solvers are frozen dataclasses: hashable, so an `Estimator` holding them is a
`jit` static argument.

- `Scan()` (the default): `steps` synchronous updates in a `lax.scan` (`ep_jax.dynamics`),
  the papers' dynamics; every number of the library is what it was before solvers existed.
- `Adaptive(tol)`: synchronous updates until the last step's relative residual is at most
  `tol`, at most `steps` of them (a `lax.while_loop`: not reverse-differentiable).
- `Async(tol=None)`: asynchronous even/odd updates. One step is one *sweep*: the odd
  layers (1, 3, 5, ... counting from the input side) are updated from the current state,
  then the even layers (2, 4, ...) from the freshest values, the odd layers' new ones.
  On the layered energy a layer interacts only with its two neighbours, so each half is
  an exact block-coordinate step (damped by `dt < 1`); the fixed points are the
  synchronous update's (docs/equations.md). With `tol`, it stops early like `Adaptive`.
  A sweep costs what a synchronous step costs under `jit` (each half computes only its
  own layers' drives: the rest of `model.drives` is dead code XLA removes).
- `Pallas(interpret=False, block_b=None)`: the fused kernel of `ep_jax.kernels` (every
  step of a phase in one launch; the synchronous update, the same states as `Scan`);
  `interpret=True` runs it emulated on any backend (the CPU tests' mode).

`parse(text)` reads a solver from its spelling: ``scan``, ``adaptive:1e-5``, ``async``,
``async:1e-5``, ``pallas``, ``pallas:interpret``; `parse_phases` the config field `RunConfig.solver`, ``FREE``
(both phases) or ``FREE/NUDGE``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ep_jax import dynamics


class SolveInfo(NamedTuple):
    """What a solver knows about the phase it ran."""

    residual: jax.Array  # relative residual of the last step (sweep), over the whole batch
    steps: jax.Array  # steps (sweeps) taken, int32


def _steps(n) -> jax.Array:
    return jnp.asarray(n, jnp.int32)


def _stack(ctx, s, target, betas):
    """The phases of `betas` side by side along the batch axis (one larger batch)."""
    n, B = len(betas), ctx.shape[0]
    tile = lambda a: jnp.concatenate([a] * n, axis=0)
    beta_col = jnp.concatenate([jnp.full((B, 1), b, ctx.dtype) for b in betas], axis=0)
    return tile(ctx), tuple(tile(sl) for sl in s), jax.tree.map(tile, target), beta_col


def _split(state, n, B):
    return [tuple(lax.slice_in_dim(sl, i * B, (i + 1) * B, axis=0) for sl in state) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Solver:
    """The interface (module docstring). Subclasses define `__call__`; `phases` stacks the
    nudged phases along the batch axis and calls it once."""

    #: whether `jax.grad` can go through the solver (a fixed number of steps)
    differentiable: ClassVar[bool] = False

    def __call__(self, model, eff, ctx, s, target, beta, dt, steps: int):
        raise NotImplementedError

    def phases(self, model, eff, ctx, s_free, target, betas, dt, steps: int, batched: bool = True):
        """The nudged phases of `betas` from `s_free`: `(list of states, SolveInfo)`, the
        residual over every phase together, the steps those of the slowest."""
        B = ctx.shape[0]
        final, info = self(model, eff, *_stack(ctx, s_free, target, betas), dt, steps)
        return _split(final, len(betas), B), info

    def spec(self) -> str:
        """The config spelling (`parse(solver.spec()) == solver`)."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Scan(Solver):
    """`steps` synchronous updates in a `lax.scan` (`ep_jax.dynamics.relax`); the default."""

    differentiable: ClassVar[bool] = True

    def __call__(self, model, eff, ctx, s, target, beta, dt, steps: int):
        final, r = dynamics.relax(model, eff, ctx, s, target, beta, dt, steps, residual=True)
        return final, SolveInfo(r, _steps(steps))

    def phases(self, model, eff, ctx, s_free, target, betas, dt, steps: int, batched: bool = True):
        finals, r = dynamics.nudged_phases(model, eff, ctx, s_free, target, betas, dt, steps, batched, residual=True)
        return finals, SolveInfo(r, _steps(steps))

    def spec(self) -> str:
        return "scan"


def _check_tol(tol, name="tol"):
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < float("inf"):
        raise ValueError(f"{name} must be a positive number, got {tol!r}")
    return float(tol)


def _until(update, s, max_steps: int, tol):
    """`update` from `s` until the relative residual is at most `tol` or `max_steps`
    updates: `(state, SolveInfo)` (a `lax.while_loop`)."""
    rdtype = jnp.real(jnp.zeros((), s[0].dtype)).dtype

    def cond(c):
        _, k, r = c
        return (k < max_steps) & (r > tol)

    def body(c):
        st, k, _ = c
        new = update(st)
        return new, k + 1, dynamics.relative_residual(new, st).astype(rdtype)

    st, k, r = lax.while_loop(cond, body, (s, jnp.zeros((), jnp.int32), jnp.asarray(jnp.inf, rdtype)))
    return st, SolveInfo(r, k)


@dataclasses.dataclass(frozen=True)
class Adaptive(Solver):
    """Synchronous updates until the last step's relative residual is at most `tol`; the
    step budget is the most steps (`dynamics.relax_adaptive`)."""

    tol: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "tol", _check_tol(self.tol))

    def __call__(self, model, eff, ctx, s, target, beta, dt, steps: int):
        final, r, k = dynamics.relax_adaptive(model, eff, ctx, s, target, beta, dt, steps, self.tol)
        return final, SolveInfo(r, k)

    def spec(self) -> str:
        return f"adaptive:{self.tol!r}"


def async_sweep(model, eff, ctx, s, target, beta, dts):
    """One asynchronous sweep: the odd layers (1, 3, ...; index 0, 2, ... here) from `s`,
    then the even layers from the result. `dts`: per-neuron time steps
    (`dynamics.per_neuron`)."""
    acts = model.layer_activations()
    for parity in (0, 1):
        h = model.drives(eff, ctx, s, target, beta)
        s = tuple(
            (1 - d) * sl + d * act(hl) if l % 2 == parity else sl
            for l, (sl, hl, d, act) in enumerate(zip(s, h, dts, acts))
        )
    return s


@dataclasses.dataclass(frozen=True)
class Async(Solver):
    """Asynchronous even/odd sweeps (module docstring); `steps` sweeps, or fewer with `tol`
    (stop once a sweep's relative residual is at most `tol`)."""

    tol: float | None = None

    def __post_init__(self):
        if self.tol is not None:
            object.__setattr__(self, "tol", _check_tol(self.tol))

    @property
    def differentiable(self) -> bool:  # type: ignore[override]
        """Whether reverse-mode differentiation can run through it: without `tol` (a fixed
        number of sweeps in a `lax.scan`), not with it (a `lax.while_loop`)."""
        return self.tol is None

    def __call__(self, model, eff, ctx, s, target, beta, dt, steps: int):
        dts = dynamics.per_neuron(dt, s)
        update = lambda st: async_sweep(model, eff, ctx, st, target, beta, dts)
        if self.tol is not None:
            return _until(update, tuple(s), steps, self.tol)
        if steps == 0:
            return tuple(s), SolveInfo(dynamics.relative_residual(s, s), _steps(0))

        def body(carry, _):
            st, _prev, d = carry
            return (async_sweep(model, eff, ctx, st, target, beta, d), st, d), None

        # dt rides in the carry (as in `dynamics`): no constant folding of a scalar dt
        (final, prev, _), _ = lax.scan(body, (tuple(s), tuple(s), dts), None, length=steps)
        return final, SolveInfo(dynamics.relative_residual(final, prev), _steps(steps))

    def spec(self) -> str:
        return "async" if self.tol is None else f"async:{self.tol!r}"


@dataclasses.dataclass(frozen=True)
class Pallas(Solver):
    """The fused Pallas kernel (`ep_jax.kernels`): `steps` synchronous updates in one
    launch, the states of `Scan`. `interpret`: emulate the kernel (any backend; slow);
    `block_b`: rows per program (a power of 2 >= 16). Real-valued phases only; where the
    kernel cannot run (a model without a kernel, no GPU) it warns once and runs `Scan`."""

    interpret: bool = False
    block_b: int | None = None

    def __post_init__(self):
        if not isinstance(self.interpret, bool):
            raise ValueError(f"interpret must be True or False, got {self.interpret!r}")
        b = self.block_b
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1)):
            raise ValueError(f"block_b must be a power of 2 >= 16 (or None), got {b!r}")

    def __call__(self, model, eff, ctx, s, target, beta, dt, steps: int):
        from ep_jax import kernels

        final, r = kernels.relax(
            model, eff, ctx, s, target, beta, dt, steps, residual=True, block_b=self.block_b, interpret=self.interpret
        )
        return final, SolveInfo(r, _steps(steps))

    def phases(self, model, eff, ctx, s_free, target, betas, dt, steps: int, batched: bool = True):
        from ep_jax import kernels

        finals, r = kernels.nudged_phases(
            model,
            eff,
            ctx,
            s_free,
            target,
            betas,
            dt,
            steps,
            batched,
            residual=True,
            block_b=self.block_b,
            interpret=self.interpret,
        )
        return finals, SolveInfo(r, _steps(steps))

    def spec(self) -> str:
        return "pallas:interpret" if self.interpret else "pallas"


#: the config spellings (`parse`)
SPELLINGS = ("scan", "adaptive:TOL", "async", "async:TOL", "pallas", "pallas:interpret")


def parse(text: str, name: str = "solver") -> Solver:
    """A solver from its config spelling (module docstring); one-line ValueError naming
    `name` otherwise."""
    if isinstance(text, Solver):
        return text
    if not isinstance(text, str):
        raise ValueError(f"{name} must be one of {', '.join(SPELLINGS)}, got {text!r}")
    head, sep, arg = text.strip().lower().partition(":")
    if head == "pallas" and arg == "interpret":
        return Pallas(interpret=True)
    try:
        tol = float(arg) if sep else None
    except ValueError:
        raise ValueError(f"{name}: the tolerance of {text!r} is not a number (e.g. {head}:1e-5)") from None
    if sep and not (tol is not None and 0 < tol < float("inf")):
        raise ValueError(f"{name}: the tolerance of {text!r} must be a positive number")
    if head == "scan" and not sep:
        return Scan()
    if head == "pallas" and not sep:
        return Pallas()
    if head == "adaptive" and sep:
        return Adaptive(tol)
    if head == "async":
        return Async(tol)
    raise ValueError(f"{name} must be one of {', '.join(SPELLINGS)}, got {text!r}")


DEFAULT = Scan()


def parse_phases(text: str, name: str = "solver") -> tuple:
    """`(free solver, nudged solver)` from ``FREE`` (both phases) or ``FREE/NUDGE``, each a
    spelling of `parse` (e.g. ``adaptive:1e-5/scan``: an adaptive free phase, scanned
    nudged phases)."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string such as 'scan' or 'async:1e-5/async', got {text!r}")
    parts = text.split("/")
    if len(parts) > 2:
        raise ValueError(f"{name} must be FREE or FREE/NUDGE (e.g. async:1e-5/async), got {text!r}")
    free = parse(parts[0], name)
    return free, (parse(parts[1], name) if len(parts) == 2 else free)


def spell_phases(free: Solver, nudge: Solver | None = None) -> str:
    """The canonical spelling of `(free, nudge)`: one part when both phases agree."""
    nudge = free if nudge is None else nudge
    return free.spec() if nudge == free else f"{free.spec()}/{nudge.spec()}"
