"""Gradient estimates of ∂L/∂θ, L = batch mean of ℓ(s⁰_L, y).

Every estimator returns gradients with the params' pytree structure, ready for optax
(descend them). With `Φ` the model's (sum of per-layer) primitive and the states treated
as constants:

- ``symmetric``  g = −(∂_θ Φ(s⁺, +β) − ∂_θ Φ(s⁻, −β)) / (2β)      (default; bias O(β²))
- ``one_sided``  g = −(∂_θ Φ(s⁺, +β) − ∂_θ Φ(s⁰, 0)) / β          (bias O(β))
- ``chl``        contrastive / predictive Hebbian rule:
                 g_W_l = −(1/β) ⟨s⁺_{l−1} ⊗ (s⁺_l − s⁰_l)⟩,  g_b_l = −(1/β) ⟨s⁺_l − s⁰_l⟩
                 (⟨·⟩ the batch mean; written as ∂_θ of −(1/β) Σ_l (s⁺_l − s⁰_l)·f_l(θ; s⁺_{l−1}),
                 f the feedforward drive, so it applies to the dendritic model too; apical
                 maps then get no update)
- ``bptt``       `T1 − T2` free steps under stop_gradient, `T2` more, jax.grad of the mean
                 cost through those `T2` steps ("DBPTT" for the dendritic model)
- ``bptt_full``  jax.grad through all `T1` free steps
- ``holomorphic`` nudged phases at N complex strengths on a circle,
                 β_k = |β| ω^k with ω = e^{2πi/N}, k = 0..N−1, started from the free state,
                 and the first Fourier coefficient of the nudged parameter derivative:
                 g = −Re[(1/(N|β|)) Σ_k ω^{−k} ∂_θ Φ(s_k, β_k)]
                 (Laborieux & Zenke 2022). By Cauchy's formula this is −d/dβ ∂_θΦ at β = 0,
                 the loss gradient at the free equilibrium, up to an error that falls
                 geometrically with N at any |β| (for converged phases). N = 2 is the
                 symmetric estimate. Needs holomorphic activations (`check_holomorphic`).
- ``implicit``   the gradient of ℓ at the free fixed point s* = G(s*, θ) (G one
                 relaxation step) by implicit differentiation: the adjoint λ = G_sᵀλ + ∂ℓ/∂s
                 solved by fixed-point iteration (it converges as the relaxation does), then
                 g = G_θᵀλ. The reference EP approximates; refused when the free phase's
                 relative residual exceeds `tol` (`implicit_grad`).

Nudging sign: `nudge="random_sign"` draws the sign of β afresh for every call from the
`key` given, `β_t = β · rademacher(key)`, which makes the one-sided estimate unbiased on
average (Scellier & Bengio; Laborieux et al. 2021); it is refused for the symmetric
estimator (where it changes nothing) and for BPTT (where it means nothing).

See docs/equations.md for the derivation and docs/ep-vs-bptt.md for how the estimates
compare with BPTT.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ep_jax import dynamics, solvers
from ep_jax.models.base import check_network
from ep_jax.relaxation import Relaxation, check_shapes, concrete

KINDS = ("symmetric", "one_sided", "chl", "bptt", "bptt_full", "holomorphic", "implicit")
EP_KINDS = ("symmetric", "one_sided", "chl", "holomorphic")
#: points on the circle of the holomorphic estimator when `n_points` is not given
DEFAULT_N_POINTS = 4
#: the free phase's relative residual the implicit gradient accepts when `tol` is not given
DEFAULT_TOL = 1e-5
NUDGES = ("fixed", "random_sign")
RANDOM_SIGN_KINDS = ("one_sided", "chl")
#: the estimators the fused Pallas kernel (`solvers.Pallas`, real-valued phases) can run
PALLAS_KINDS = ("symmetric", "one_sided", "chl")


@dataclasses.dataclass(frozen=True)
class Estimator:
    """How gradients are obtained; static and hashable (a `jit` static argument).

    kind: one of `KINDS` (module docstring). t_free: free-phase steps T1 (also the
    prediction's). t_nudge: nudged-phase steps T2 (for ``bptt``: the truncation length).
    batched_nudge: run the ±β phases as one scan over a doubled batch (same numbers).
    nudge: ``"fixed"`` or ``"random_sign"`` (module docstring).
    n_points: ``holomorphic`` only: the N points on the circle (>= 2; default 4).
    tol: ``implicit`` only: the largest relative residual of the free phase's last step
    accepted as converged (default 1e-5).
    solver: how the free phase relaxes, an `ep_jax.solvers.Solver` (or its config
    spelling, e.g. ``"async:1e-5"``): `Scan()` (default: `t_free` synchronous steps, the
    papers' dynamics), `Adaptive(tol)` (stop once the relative residual is at most tol;
    `t_free` the most steps), `Async(tol=None)` (even/odd sweeps), `Pallas()` (the fused
    kernel; symmetric, one_sided and chl only). The BPTT estimators differentiate the
    scan and take only `Scan()`.
    nudge_solver: how the nudged phases relax (`t_nudge` the step budget); None (default):
    the free phase's solver.
    """

    kind: str = "symmetric"
    t_free: int = 60
    t_nudge: int = 12
    batched_nudge: bool = True
    nudge: str = "fixed"
    n_points: int | None = None
    tol: float | None = None
    solver: solvers.Solver = solvers.DEFAULT
    nudge_solver: solvers.Solver | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown estimator {self.kind!r}; choose one of {list(KINDS)}")
        for name in ("t_free", "t_nudge"):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{name} must be an integer number of steps, got {v!r}")
            object.__setattr__(self, name, int(v))  # numpy integers: a plain int (hashable, static)
        if self.t_free < 1 or self.t_nudge < 1:
            raise ValueError(f"t_free and t_nudge must be >= 1, got {self.t_free}, {self.t_nudge}")
        if self.t_nudge > self.t_free and self.kind != "bptt_full":
            raise ValueError(f"t_nudge must be <= t_free, got t_nudge={self.t_nudge} > t_free={self.t_free}")
        if self.nudge not in NUDGES:
            raise ValueError(f"nudge must be one of {list(NUDGES)}, got {self.nudge!r}")
        if self.nudge == "random_sign" and self.kind not in RANDOM_SIGN_KINDS:
            raise ValueError(f"nudge='random_sign' needs estimator one of {list(RANDOM_SIGN_KINDS)}, got {self.kind!r}")
        if self.n_points is not None:
            if self.kind != "holomorphic":
                raise ValueError(f"n_points is a setting of the 'holomorphic' estimator, not of {self.kind!r}")
            if isinstance(self.n_points, bool) or int(self.n_points) != self.n_points or self.n_points < 2:
                raise ValueError(f"n_points must be an integer >= 2, got {self.n_points!r}")
        if self.tol is not None:
            if self.kind != "implicit":
                raise ValueError(f"tol is a setting of the 'implicit' estimator, not of {self.kind!r}")
            if not 0 < self.tol < float("inf"):
                raise ValueError(f"tol must be a positive number, got {self.tol!r}")
        for name in ("solver", "nudge_solver"):
            v = getattr(self, name)
            if v is None and name == "nudge_solver":
                continue
            if isinstance(v, str):
                object.__setattr__(self, name, v := solvers.parse(v, name))
            if not isinstance(v, solvers.Solver):
                raise ValueError(
                    f"{name} must be an ep_jax.solvers.Solver (or its spelling: "
                    f"{', '.join(solvers.SPELLINGS)}), got {v!r}"
                )
            if self.kind in ("bptt", "bptt_full") and v != solvers.Scan():
                raise ValueError(
                    f"{name}: the {self.kind!r} estimator differentiates the synchronous scan; "
                    f"it takes only solver='scan', got {v.spec()!r}"
                )
            if isinstance(v, solvers.Pallas) and self.kind not in PALLAS_KINDS:
                raise ValueError(
                    f"{name}: the pallas solver needs estimator one of {list(PALLAS_KINDS)}, got {self.kind!r}"
                )

    @property
    def phase_solvers(self) -> tuple:
        """`(free phase's solver, nudged phases' solver)`."""
        return self.solver, (self.solver if self.nudge_solver is None else self.nudge_solver)

    @property
    def points(self) -> int:
        """N of the holomorphic estimator (`n_points`, default 4)."""
        return DEFAULT_N_POINTS if self.n_points is None else int(self.n_points)

    @property
    def residual_tol(self) -> float:
        """The implicit estimator's residual tolerance (`tol`, default 1e-5)."""
        return DEFAULT_TOL if self.tol is None else float(self.tol)

    @property
    def is_ep(self) -> bool:
        """True for the estimators that difference nudged phases (they need β ≠ 0)."""
        return self.kind in EP_KINDS


class Aux(NamedTuple):
    """What an estimate returns beside the gradients."""

    s_free: tuple  # free state after t_free steps (the prediction)
    loss: jax.Array  # batch mean of ℓ(s⁰_L, y)
    correct: jax.Array  # number of examples with argmax s⁰_L == y
    beta: jax.Array  # the β used (signed, for nudge="random_sign")
    residual_free: jax.Array = jnp.nan  # relative residual of the free phase's last step
    residual_nudge: jax.Array = jnp.nan  # ... of the nudged phases' last step (all phases; NaN: none ran)


def check_batch(model, x, y):
    """Checks of a batch: input width, at least one example, label shape and dtype
    (static: free under jit), and the label values where `y` is concrete
    (`check_labels`). Raise naming the argument."""
    model.check_input(x)
    if x.shape[0] < 1:
        raise ValueError(f"x must hold at least one example (batch >= 1), got shape {tuple(x.shape)}")
    if jnp.ndim(y) != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(jnp.shape(y))}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    check_labels(model, y)


def check_labels(model, y):
    """Labels must lie in [0, n_classes): a one-line ValueError when `y` is concrete
    (eager calls; drivers check their datasets once with this function). Under jit the
    values are not known: there `labels_in_range` is the traced check (an out-of-range
    label would otherwise give an all-zero one-hot target, silently)."""
    v = concrete(y)
    if v is not None and v.size and (v.min() < 0 or v.max() >= model.n_classes):
        raise ValueError(
            f"y holds labels in [{v.min()}, {v.max()}], outside [0, {model.n_classes}) "
            f"for a model with {model.n_classes} outputs"
        )


def labels_in_range(model, y) -> jax.Array:
    """`()` bool, traceable: every label of `y` lies in [0, n_classes). Under jit an
    out-of-range label makes `Aux.loss` / `Evaluation.loss` NaN and `train_step` refuse
    the step (`StepInfo.finite` False); numbers for valid labels are unchanged."""
    return jnp.all((y >= 0) & (y < model.n_classes))


def _aux(model, s_free, y, y1h, beta, res_free, res_nudge=None, out=None):
    # NaN for out-of-range labels (only reachable under jit: eager calls refuse them)
    out = s_free[-1] if out is None else out  # the model's output (`model.output`): s_L or a readout of it
    loss = jnp.where(labels_in_range(model, y), jnp.mean(model.cost(out, y1h)), jnp.nan)
    correct = jnp.sum(jnp.argmax(out, axis=-1) == y)
    rdtype = loss.dtype
    res_nudge = jnp.full((), jnp.nan, rdtype) if res_nudge is None else res_nudge.astype(rdtype)
    return Aux(s_free, loss, correct, beta, res_free.astype(rdtype), res_nudge)


def primitive_grad(model, params, buffers, x, terms, y1h):
    """∂_θ Σ_i c_i Φ(s_i, β_i) for `terms = [(c_i, s_i, β_i), ...]`, states held fixed."""

    def f(p):
        eff = model.prepare(p, buffers)
        ctx = model.input_drive(eff, x)
        return sum(c * model.primitive(eff, ctx, jax.lax.stop_gradient(s), y1h, b) for c, s, b in terms)

    return jax.grad(f)(params)


def chl_grad(model, params, buffers, x, s_plus, s_free, beta):
    """Contrastive / predictive rule as a gradient (see module docstring)."""
    s_plus = jax.lax.stop_gradient(s_plus)
    diff = jax.lax.stop_gradient(tuple(p - f for p, f in zip(s_plus, s_free)))

    def f(p):
        eff = model.prepare(p, buffers)
        ff = model.feedforward(eff, model.input_drive(eff, x), s_plus)
        return -sum(jnp.sum(d * fl) for d, fl in zip(diff, ff)) / (beta * x.shape[0])

    return jax.grad(f)(params)


def ep_nudged_states(model, est, eff, ctx, s_free, y1h, rx: Relaxation, record=False, residual=False):
    """The nudged states the estimator needs: `[s⁺, s⁻]` (symmetric), `[s⁺]` (one-sided,
    chl) or the N complex states at `holomorphic_betas` (holomorphic). `record`,
    `residual`: as `dynamics.nudged_phases`."""
    if est.kind == "holomorphic":
        cdtype = complex_dtype(ctx.dtype)
        betas = tuple(holomorphic_betas(rx.beta, est.points, cdtype))
        ctx, s_free = jax.tree.map(lambda a: a.astype(cdtype), (ctx, tuple(s_free)))
    else:
        betas = (rx.beta, -rx.beta) if est.kind == "symmetric" else (rx.beta,)
    solver = est.phase_solvers[1]
    if record:  # the trajectory: the synchronous scan's (only `dynamics` records one)
        return dynamics.nudged_phases(
            model,
            eff,
            ctx,
            s_free,
            y1h,
            betas,
            rx.dt,
            est.t_nudge,
            batched=est.batched_nudge,
            record=True,
            residual=residual,
        )
    phases, info = solver.phases(model, eff, ctx, s_free, y1h, betas, rx.dt, est.t_nudge, est.batched_nudge)
    return (phases, info.residual) if residual else phases


def free_state(model, est, eff, ctx, dt):
    """The free phase of the estimator (its solver, `t_free` the step budget, from the
    zero state) and its last step's relative residual."""
    s0 = model.zero_state(ctx.shape[0], ctx.dtype)
    s, info = est.solver(model, eff, ctx, s0, None, 0.0, dt, est.t_free)
    return s, info.residual


def complex_dtype(dtype):
    """complex64 for float32 (and narrower), complex128 for float64."""
    return jnp.result_type(dtype, jnp.complex64)


def unit_roots(n: int) -> np.ndarray:
    """ω^k = e^{2πik/N}, k = 0..N−1, with the points on the axes exact (±1, ±i)."""
    w = np.exp(2j * np.pi * np.arange(n) / n)
    return np.where(np.abs(w.real) < 1e-12, 0, w.real) + 1j * np.where(np.abs(w.imag) < 1e-12, 0, w.imag)


def holomorphic_betas(beta, n: int, cdtype):
    """The N nudging strengths β_k = |β| ω^k of the holomorphic estimator."""
    r = jnp.abs(beta).astype(cdtype)
    return [r * jnp.asarray(w, cdtype) for w in unit_roots(n)]


def holomorphic_grad(model, params, buffers, x, y1h, beta, nudged):
    """−Re[(1/(N|β|)) Σ_k ω^{−k} ∂_θ Φ(s_k, β_k)] (module docstring), states held fixed.

    θ is real, so Re[c ∂_θΦ] = ∂_θ Re[c Φ]: one real-valued `jax.grad`."""
    n = len(nudged)
    cdtype = complex_dtype(x.dtype)
    betas = holomorphic_betas(beta, n, cdtype)
    coef = [jnp.asarray(np.conj(w) / n, cdtype) / jnp.abs(beta).astype(cdtype) for w in unit_roots(n)]

    def f(p):
        eff = model.prepare(p, buffers)
        ctx = model.input_drive(eff, x)
        return -sum(
            jnp.real(c * model.primitive(eff, ctx, jax.lax.stop_gradient(s_k), y1h, b_k))
            for c, s_k, b_k in zip(coef, nudged, betas)
        )

    return jax.grad(f)(params)


def check_holomorphic(model):
    """Refuse (one-line ValueError) a model with a part that is not holomorphic: the
    holomorphic estimator evaluates the dynamics at complex states. Models that do not
    describe themselves (no `non_holomorphic` method) are not checked."""
    parts = getattr(model, "non_holomorphic", None)
    bad = parts() if callable(parts) else []
    if bad:
        from ep_jax.activations import HOLOMORPHIC

        raise ValueError(
            f"the holomorphic estimator needs holomorphic functions, and this model uses "
            f"{', '.join(bad)}; holomorphic activations: {', '.join(HOLOMORPHIC)}"
        )


def ep_grad_from_states(model, est, params, buffers, x, y1h, beta, s_free, nudged):
    """The EP estimate from already relaxed states (`nudged` as from `ep_nudged_states`)."""
    if est.kind == "holomorphic":
        return holomorphic_grad(model, params, buffers, x, y1h, beta, nudged)
    if est.kind == "symmetric":
        s_p, s_m = nudged
        terms = [(-0.5 / beta, s_p, beta), (0.5 / beta, s_m, -beta)]
        return primitive_grad(model, params, buffers, x, terms, y1h)
    if est.kind == "one_sided":
        (s_p,) = nudged
        terms = [(-1.0 / beta, s_p, beta), (1.0 / beta, s_free, 0.0)]
        return primitive_grad(model, params, buffers, x, terms, y1h)
    (s_p,) = nudged
    return chl_grad(model, params, buffers, x, s_p, s_free, beta)


def _bptt(model, est, params, buffers, x, y, y1h, rx):
    def loss_fn(p):
        eff = model.prepare(p, buffers)
        ctx = model.input_drive(eff, x)
        if est.kind == "bptt":
            s = jax.lax.stop_gradient(dynamics.free_phase(model, eff, ctx, rx.dt, est.t_free - est.t_nudge))
            s, r = dynamics.relax(model, eff, ctx, s, None, 0.0, rx.dt, est.t_nudge, residual=True)
        else:
            s, r = dynamics.free_phase(model, eff, ctx, rx.dt, est.t_free, residual=True)
        return jnp.mean(model.cost(model.output(eff, s), y1h)), (s, jax.lax.stop_gradient(r))

    (_, (s, r)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, _aux(model, s, y, y1h, rx.beta, r, out=model.output(model.prepare(params, buffers), s))


class ImplicitInfo(NamedTuple):
    """How the implicit gradient was obtained."""

    residual_free: jax.Array  # relative residual of the free phase's last step
    residual_adjoint: jax.Array  # relative change of λ in the adjoint's last iteration
    iterations: jax.Array  # adjoint iterations run
    converged: jax.Array  # bool: residual_free <= tol


def implicit_grad(
    model,
    params,
    buffers,
    x,
    y,
    rx: Relaxation,
    t_free: int,
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    solver: solvers.Solver | None = None,
):
    """∂ℓ/∂θ at the free fixed point by implicit differentiation; `(grads, s_free, info)`.

    With G(s, θ) one relaxation step (β = 0), s* = G(s*, θ) the state after `t_free`
    steps, and ℓ the batch mean of the cost: λ = G_sᵀλ + ∂ℓ/∂s* is iterated from
    λ = ∂ℓ/∂s* (each iteration one `jax.vjp` of the step; it contracts at the rate of the
    relaxation itself) until λ changes by at most 100 ulp relative, or `max_iter`
    iterations (default 20·t_free + 100); then grads = G_θᵀλ. `solver`: how the free phase
    relaxes (default `solvers.Scan()`; `t_free` its step budget). `info.converged` is False
    when the free phase's relative residual exceeds `tol`: the grads are then NaN
    (eager calls of `estimate` raise a ValueError instead).
    """
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    s0 = model.zero_state(ctx.shape[0], ctx.dtype)
    s, info = (solvers.DEFAULT if solver is None else solver)(model, eff, ctx, s0, None, 0.0, rx.dt, t_free)
    res = info.residual
    y1h = model.one_hot(y, x.dtype)
    # the cost reads the model's output (`model.output`); a readout's own parameter gradient
    # is added to the adjoint's (zero when the output is s_L itself)
    g_s, g_out = jax.grad(
        lambda st, p: jnp.mean(model.cost(model.output(model.prepare(p, buffers), st), y1h)), argnums=(0, 1)
    )(s, params)

    def G(p, st):
        e = model.prepare(p, buffers)
        return dynamics.step(model, e, model.input_drive(e, x), st, None, 0.0, rx.dt)

    _, vjp = jax.vjp(G, params, s)
    eps = 100 * jnp.finfo(x.dtype).eps
    limit = 20 * t_free + 100 if max_iter is None else int(max_iter)

    def cond(c):
        _, k, change = c
        return (k < limit) & (change > eps)

    def body(c):
        lam, k, _ = c
        new = jax.tree.map(jnp.add, vjp(lam)[1], g_s)
        return new, k + 1, dynamics.relative_residual(new, lam)

    lam, k, change = jax.lax.while_loop(cond, body, (g_s, jnp.zeros((), jnp.int32), jnp.asarray(jnp.inf, x.dtype)))
    grads = jax.tree.map(jnp.add, vjp(lam)[0], g_out)
    ok = res <= tol
    grads = jax.tree.map(lambda a: jnp.where(ok, a, jnp.nan), grads)
    return grads, s, ImplicitInfo(res, change, k, ok)


def _implicit(model, est, params, buffers, x, y, y1h, rx):
    grads, s, info = implicit_grad(model, params, buffers, x, y, rx, est.t_free, est.residual_tol, solver=est.solver)
    r = concrete(info.residual_free)
    if r is not None and not r <= est.residual_tol:
        raise ValueError(
            f"the free phase has not converged: relative residual {float(r):.3g} > tol="
            f"{est.residual_tol:g} after t_free={est.t_free} steps (raise t_free, or tol)"
        )
    return grads, _aux(
        model,
        s,
        y,
        y1h,
        rx.beta,
        info.residual_free,
        info.residual_adjoint,
        out=model.output(model.prepare(params, buffers), s),
    )


def signed_beta(est: Estimator, key, beta):
    """β, or β times a random sign drawn from `key` when `est.nudge == "random_sign"`."""
    if est.nudge != "random_sign":
        return beta
    if key is None:
        raise ValueError("nudge='random_sign' draws the sign of beta from the key: pass a jax.random key")
    return jax.random.rademacher(key, (), jnp.result_type(beta)) * beta


def check_beta(est: Estimator, beta):
    """EP estimators divide by β: refuse β = 0 where β is concrete (under jit the training
    step's finite check stops the non-finite result instead)."""
    b = concrete(beta)
    if est.is_ep and b is not None and b == 0:
        raise ValueError(f"beta must be nonzero for the {est.kind!r} EP estimator (it divides by beta)")


def estimate(model, est: Estimator, key, params, buffers, x, y, rx: Relaxation):
    """Gradient estimate and `Aux` for one batch.

    key: a `jax.random` key (used by `nudge="random_sign"`; may be None otherwise).
    x: `(B, n_0)` float, B >= 1; y: `(B,)` int labels in [0, n_classes); rx: `Relaxation`
    (β, time steps). Returns `(grads, aux)`, grads with the structure of `params`.

    Refused with a one-line ValueError: params/buffers whose leaves or shapes are not the
    model's (`check_network`, at trace time), a bad batch (`check_batch`), and, where the
    values are concrete (eager calls), out-of-range labels and β = 0 for EP estimators.
    Under jit those values are not known: an out-of-range label then gives a NaN
    `aux.loss` (its one-hot target would be all zero; the gradients are not a gradient
    of any loss of the batch), and β = 0 non-finite EP gradients.
    """
    check_network(model, params, buffers)
    check_batch(model, x, y)
    check_shapes(model, rx)
    check_beta(est, rx.beta)
    y1h = model.one_hot(y, x.dtype)
    if est.kind in ("bptt", "bptt_full"):
        return _bptt(model, est, params, buffers, x, y, y1h, rx)
    if est.kind == "implicit":
        return _implicit(model, est, params, buffers, x, y, y1h, rx)
    if est.kind == "holomorphic":
        check_holomorphic(model)
    rx = rx._replace(beta=signed_beta(est, key, rx.beta))
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    s_free, r_free = free_state(model, est, eff, ctx, rx.dt)
    nudged, r_nudge = ep_nudged_states(model, est, eff, ctx, s_free, y1h, rx, residual=True)
    grads = ep_grad_from_states(model, est, params, buffers, x, y1h, rx.beta, s_free, nudged)
    return grads, _aux(model, s_free, y, y1h, rx.beta, r_free, r_nudge, out=model.output(eff, s_free))
