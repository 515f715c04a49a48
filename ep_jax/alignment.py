"""EP-versus-BPTT gradient alignment (Ernoult et al. 2019), per parameter.

Final comparison: the run's estimate against `jax.grad` BPTT truncated to the last T2
free steps ("DBPTT" for the dendritic model): per-parameter cosine, relative RMSE, sign
agreement, and the angle between the two full gradient vectors (`compare`, `angle`).
For the standard EP network the two agree closely (cosine ≈ 1 at small β); for the
dendritic network only the output layer's do: its dynamics are not a gradient flow, so
its hidden-layer EP updates are a different learning signal (docs/ep-vs-bptt.md).

Gradient-descent-updates (GDU) check, for one fixed batch and k = 1..T2:

- EP side: the estimate from the states after the first k nudged steps,
  `−(∂_θΦ(s⁺_k) − ∂_θΦ(s⁻_k)) / (2β)` (symmetric) or `−(∂_θΦ(s⁺_k) − ∂_θΦ(s⁰)) / β`;
- BPTT side: the gradient of the mean cost after T1 free steps, truncated to the last k
  steps (the state k steps before the end held constant).

The truncated BPTT gradients for every k come from ONE reverse sweep: the per-step
parameter contributions of the backward pass, accumulated from the last step backwards
(a manual `jax.vjp` per step in a reverse `lax.scan`).

During training: `measure` is the jittable, vmappable form of the final comparison; the
experiment engine calls it every `align_every` steps on a fixed probe batch
(docs/ep-vs-bptt.md shows what it finds).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ep_jax import dynamics
from ep_jax.estimators import Estimator, check_batch, check_beta, ep_grad_from_states, ep_nudged_states
from ep_jax.models.base import check_network
from ep_jax.relaxation import Relaxation, check_shapes


class GDUResult(NamedTuple):
    """EP and truncated-BPTT gradients for k = 1..T2 (`gdu`), and the leaf names."""

    ep: object  # params-structured pytree, each leaf with a leading k axis (T2, ...)
    bptt: object  # same structure
    names: list  # leaf names, in `jax.tree.leaves` order


def _leaf_names(tree):
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for p, _ in paths]


def bptt_truncated_curve(model, params, buffers, x, y, rx: Relaxation, t_free: int, k_max: int):
    """BPTT gradients truncated to the last k = 1..k_max of `t_free` free steps.

    Returns a params-structured pytree with leaves of shape `(k_max, ...)`.
    """
    if not 1 <= k_max <= t_free:
        raise ValueError(
            f"the truncated BPTT curve needs 1 <= k_max <= t_free, got k_max={k_max}, "
            f"t_free={t_free} (t_nudge may not exceed t_free)"
        )
    check_network(model, params, buffers)
    check_batch(model, x, y)
    check_shapes(model, rx)
    y1h = model.one_hot(y, x.dtype)

    def step(p, s):
        eff = model.prepare(p, buffers)
        return dynamics.step(model, eff, model.input_drive(eff, x), s, None, 0.0, rx.dt)

    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    s_start = dynamics.free_phase(model, eff, ctx, rx.dt, t_free - k_max)
    _, traj = dynamics.relax(model, eff, ctx, s_start, None, 0.0, rx.dt, k_max, record=True)
    # inputs of each recorded step: s_start, then the first k_max − 1 recorded states
    prev = tuple(jnp.concatenate([a[None], t[:-1]], axis=0) for a, t in zip(s_start, traj))
    s_final = tuple(t[-1] for t in traj)
    # the cost's own parameter gradient starts the sums: a readout's (`model.output`), zero
    # when the output is s_L itself
    lam, g_out = jax.grad(
        lambda s, p: jnp.mean(model.cost(model.output(model.prepare(p, buffers), s), y1h)), argnums=(0, 1)
    )(s_final, params)

    def back(carry, s_prev):
        lam, acc = carry
        _, vjp = jax.vjp(step, params, s_prev)
        g, lam = vjp(lam)
        acc = jax.tree.map(jnp.add, acc, g)
        return (lam, acc), acc

    _, cum = lax.scan(back, (lam, g_out), prev, reverse=True)
    # reverse scan stacks outputs in input order: index i holds the sum over steps i..end,
    # i.e. truncation to the last k_max − i steps; flip so index k−1 is "last k steps".
    return jax.tree.map(lambda a: a[::-1], cum)


def _check(model, est: Estimator, params, buffers, x, y, rx):
    check_network(model, params, buffers)
    if not est.is_ep or est.nudge != "fixed":
        raise ValueError(
            f"the EP curve needs an EP estimator with fixed nudging (symmetric, one_sided or chl), "
            f"got kind={est.kind!r}, nudge={est.nudge!r}"
        )
    check_batch(model, x, y)
    check_shapes(model, rx)
    check_beta(est, rx.beta)


def ep_curve(model, est: Estimator, params, buffers, x, y, rx: Relaxation):
    """EP estimates after each of the first k = 1..T2 nudged steps (leaves `(T2, ...)`)."""
    _check(model, est, params, buffers, x, y, rx)
    y1h = model.one_hot(y, x.dtype)
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    s_free = dynamics.free_phase(model, eff, ctx, rx.dt, est.t_free)
    recorded = ep_nudged_states(model, est, eff, ctx, s_free, y1h, rx, record=True)
    trajs = [traj for _, traj in recorded]

    def at_k(states_k):
        return ep_grad_from_states(model, est, params, buffers, x, y1h, rx.beta, s_free, states_k)

    return jax.vmap(at_k)(trajs)


def gdu(model, est: Estimator, params, buffers, x, y, rx: Relaxation) -> GDUResult:
    """EP and truncated-BPTT gradient curves for k = 1..est.t_nudge."""
    _check(model, est, params, buffers, x, y, rx)
    ep = ep_curve(model, est, params, buffers, x, y, rx)
    bptt = bptt_truncated_curve(model, params, buffers, x, y, rx, est.t_free, est.t_nudge)
    return GDUResult(ep, bptt, _leaf_names(params))


def _leaf_metrics(u, v, atol):
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    sel = np.abs(v) > atol
    if nu == 0 and nv == 0:
        # both exactly zero: e.g. a layer k steps below the output at truncation k < its depth,
        # which neither the nudge nor the truncated backward pass has reached yet
        return {"rel_rmse": 0.0, "sign_err": float("nan"), "cosine": 1.0}
    return {
        "rel_rmse": float(np.linalg.norm(u - v) / nv) if nv > 0 else float("inf"),
        "sign_err": float(np.mean(np.sign(u[sel]) != np.sign(v[sel]))) if sel.any() else float("nan"),
        "cosine": float(u @ v / (nu * nv)) if nu > 0 and nv > 0 else 0.0,
    }


def compare(a, b, atol: float = 0.0):
    """Per-leaf agreement of gradient `a` with reference `b`.

    Returns `{name: {"rel_rmse", "sign_err", "cosine"}}`. The sign error is the fraction
    of entries, among those where |b| > atol (masked dendritic weights excluded), whose
    signs differ. Two all-zero leaves agree (cosine 1, rel_rmse 0); one all-zero leaf
    against a nonzero one has cosine 0 (rel_rmse inf when the reference is the zero one).
    """
    out = {}
    for name, u, v in zip(_leaf_names(b), jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        out[name] = _leaf_metrics(np.asarray(u, np.float64).ravel(), np.asarray(v, np.float64).ravel(), atol)
    return out


def angle(a, b) -> float:
    """Angle in degrees between two gradient pytrees seen as single flat vectors."""
    u = np.concatenate([np.asarray(l, np.float64).ravel() for l in jax.tree.leaves(a)])
    v = np.concatenate([np.asarray(l, np.float64).ravel() for l in jax.tree.leaves(b)])
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0:
        return float("nan")
    return float(np.degrees(np.arccos(np.clip(u @ v / (nu * nv), -1.0, 1.0))))


def gdu_table(result: GDUResult):
    """Metrics of `compare` for every k: `{name: {metric: [value for k=1..T2]}}`."""
    T = jax.tree.leaves(result.ep)[0].shape[0]
    per_k = [
        compare(jax.tree.map(lambda a: a[k], result.ep), jax.tree.map(lambda a: a[k], result.bptt)) for k in range(T)
    ]
    return {n: {m: [pk[n][m] for pk in per_k] for m in ("rel_rmse", "sign_err", "cosine")} for n in result.names}


def format_comparison(metrics: dict, title: str = "") -> str:
    """A plain-text table of `compare` output."""
    w = max(len(n) for n in metrics) + 2
    lines = [title] if title else []
    lines.append(f"{'parameter':<{w}}{'cosine':>10}{'rel_rmse':>12}{'sign_err':>10}")
    for n, m in metrics.items():
        lines.append(f"{n:<{w}}{m['cosine']:>10.5f}{m['rel_rmse']:>12.4g}{m['sign_err']:>10.4f}")
    return "\n".join(lines)


def report(model, est: Estimator, params, buffers, x, y, rx: Relaxation, print_fn=print):
    """Print and return the final EP-vs-BPTT comparison and the GDU curve summary."""
    res = gdu(model, est, params, buffers, x, y, rx)
    final = compare(jax.tree.map(lambda a: a[-1], res.ep), jax.tree.map(lambda a: a[-1], res.bptt))
    print_fn(format_comparison(final, f"EP ({est.kind}) vs truncated BPTT, k = T2 = {est.t_nudge}"))
    curves = gdu_table(res)
    print_fn("GDU: relative RMSE per k = 1..T2")
    for n, c in curves.items():
        print_fn(f"  {n}: " + " ".join(f"{v:.3g}" for v in c["rel_rmse"]))
    return final, curves


class Alignment(NamedTuple):
    """EP-vs-BPTT agreement on one batch; per-leaf fields are tuples in `jax.tree.leaves`
    order of the params (names from `leaf_names`)."""

    cosine: tuple  # per leaf: cosine similarity
    rel_rmse: tuple  # per leaf: ‖g_EP − g_BPTT‖ / ‖g_BPTT‖
    sign_agree: tuple  # per leaf: fraction of entries (|g_BPTT| > 0) with the same sign
    angle: jax.Array  # degrees between the two full gradient vectors


def leaf_names(params) -> list[str]:
    """Readable names of the params' leaves, in `jax.tree.leaves` order."""
    return _leaf_names(params)


REFERENCES = ("bptt", "bptt_full", "implicit")


def measure(model, est: Estimator, params, buffers, x, y, rx: Relaxation, reference: str = "bptt") -> Alignment:
    """The estimator's gradient against a reference on `(x, y)`: `reference="bptt"`,
    BPTT truncated to the same T2 (`est.t_free`, `est.t_nudge`); `"bptt_full"`, BPTT
    through all T1 free steps; `"implicit"`, the exact gradient at the free fixed point
    (`ep_jax.estimators.implicit_grad`; NaN metrics when the free phase has not
    converged to its default tolerance). Pure and jittable (arrays only), so it can be
    vmapped over sweep members. Random-sign nudging is measured with +β. Every estimator
    can be measured: `bptt` against itself gives cosine 1 (a sanity line)."""
    from ep_jax.estimators import estimate, implicit_grad

    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {list(REFERENCES)}, got {reference!r}")
    fixed = dataclasses.replace(est, nudge="fixed")
    g_ep, _ = estimate(model, fixed, None, params, buffers, x, y, rx)
    if reference == "implicit":
        g_bp = implicit_grad(model, params, buffers, x, y, rx, est.t_free)[0]
    else:
        g_bp, _ = estimate(model, Estimator(reference, est.t_free, est.t_nudge), None, params, buffers, x, y, rx)
    cos, rr, sa = [], [], []
    dot = nu2 = nv2 = 0.0
    for u, v in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g_bp)):
        u, v = u.ravel(), v.ravel()
        uv, uu, vv = jnp.vdot(u, v), jnp.vdot(u, u), jnp.vdot(v, v)
        cos.append(jnp.where((uu > 0) & (vv > 0), uv / jnp.sqrt(uu * vv), jnp.where((uu == 0) & (vv == 0), 1.0, 0.0)))
        rr.append(jnp.sqrt(jnp.vdot(u - v, u - v) / jnp.where(vv > 0, vv, jnp.nan)))
        nz = v != 0
        sa.append(jnp.sum(nz & (jnp.sign(u) == jnp.sign(v))) / jnp.maximum(jnp.sum(nz), 1))
        dot, nu2, nv2 = dot + uv, nu2 + uu, nv2 + vv
    angle = jnp.degrees(jnp.arccos(jnp.clip(dot / jnp.sqrt(nu2 * nv2), -1.0, 1.0)))
    return Alignment(tuple(cos), tuple(rr), tuple(sa), angle)
