"""The relaxation solvers (`ep_jax.solvers`): one signature, several ways of running a
phase. Checks: the default scan is today's relaxation bit for bit; the asynchronous
(even/odd) solver reaches the synchronous solver's fixed point (float64, every model
family, scalar and per-neuron dt); the adaptive stop; the estimators' and the config's
solver settings and their one-line refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import ep_jax
from ep_jax import dynamics, solvers
from ep_jax.solvers import Adaptive, Async, Pallas, Scan

# --- Estimator: step counts are integers ---------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [("t_free", 10.7), ("t_free", "10"), ("t_free", True), ("t_nudge", 2.5), ("t_nudge", False), ("t_nudge", None)],
)
def test_estimator_refuses_non_integer_steps(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be an integer number of steps, got "):
        ep_jax.Estimator(**{field: value})


def test_estimator_accepts_numpy_integer_steps():
    est = ep_jax.Estimator(t_free=np.int64(10), t_nudge=np.int32(3))
    assert (est.t_free, est.t_nudge) == (10, 3) and type(est.t_free) is int and type(est.t_nudge) is int
    assert est == ep_jax.Estimator(t_free=10, t_nudge=3) and hash(est) == hash(ep_jax.Estimator(t_free=10, t_nudge=3))


# --- models of every family ------------------------------------------------------------------

CONV = dict(
    input_shape=(7, 7, 1),
    channels=(2, 3),
    kernels=(3, 2),
    strides=(1, 1),
    paddings=(1, 0),
    pools=("max", "none"),
    fc=(5, 3),
)


def family(name):
    """`(model, settings)`: small networks of each family (several layers, so both halves
    of a sweep hold layers)."""
    return {
        "ep": (ep_jax.EPModel(sizes=(12, 20, 16, 10)), dict(gamma=1.0)),
        "hts": (
            ep_jax.EPModel(sizes=(12, 24, 10), activation="leaky_relu", output_activation="sigmoid"),
            dict(gamma=0.5),
        ),
        "dendritic": (ep_jax.DendriticModel(sizes=(12, 20, 16, 10), basal_branches=4), dict(alpha=0.3)),
        "conv": (ep_jax.build_model("conv", **CONV), {}),
        "dendritic_conv": (
            ep_jax.build_model("dendritic_conv", basal_branches=2, apical_branches=2, **CONV),
            dict(alpha=0.2),
        ),
    }[name]


def setup(name, batch=6, dtype=jnp.float64, per_neuron=False, seed=0):
    model, settings = family(name)
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    params, buffers = model.init(k[0], dtype, **settings)
    n0 = int(np.prod(model.input_shape)) if hasattr(model, "input_shape") else model.sizes[0]
    x = jax.random.uniform(k[1], (batch, n0), dtype)
    y = jax.random.randint(k[2], (batch,), 0, model.n_classes)
    if per_neuron:  # per neuron (MLP) or per channel (image layers)
        dt = [
            jax.random.uniform(kk, tuple(shape[-1:]), dtype, 0.3, 0.9)
            for kk, shape in zip(jax.random.split(k[3], model.n_layers), model.state_shapes)
        ]
    else:
        dt = 0.6
    rx = ep_jax.make_relaxation(model, beta=0.2, dt=dt, dtype=dtype)
    return model, params, buffers, x, y, rx


FAMILIES = ("ep", "hts", "dendritic", "conv", "dendritic_conv")


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("per_neuron", [False, True])
def test_async_reaches_the_synchronous_fixed_point(x64, name, per_neuron):
    """Free and nudged phases: the even/odd sweeps end where the synchronous steps end
    (float64, both run to a relative residual of 1e-13)."""
    model, params, buffers, x, y, rx = setup(name, per_neuron=per_neuron)
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    s0 = model.zero_state(x.shape[0], x.dtype)
    y1h = model.one_hot(y, x.dtype)
    run = jax.jit(
        lambda solver, s, target, beta: solver(model, eff, ctx, s, target, beta, rx.dt, 3000), static_argnums=0
    )
    sync, i_sync = run(Adaptive(1e-13), s0, None, 0.0)
    asyn, i_async = run(Async(1e-13), s0, None, 0.0)
    assert float(i_sync.residual) <= 1e-13 and float(i_async.residual) <= 1e-13
    assert rel_err(asyn, sync) < 1e-10
    assert min(float(jnp.linalg.norm(a)) for a in sync) > 0.01  # not trivially the zero start state
    # it is a fixed point of the synchronous step itself (independent of either loop)
    assert rel_err(dynamics.step(model, eff, ctx, asyn, None, 0.0, rx.dt), asyn) < 1e-12
    # the nudged phase (β = 0.2 from the free state)
    n_sync, _ = run(Adaptive(1e-13), sync, y1h, 0.2)
    n_async, _ = run(Async(1e-13), sync, y1h, 0.2)
    assert rel_err(n_async, n_sync) < 1e-10 and rel_err(n_sync, sync) > 1e-6


def test_one_sweep_is_odd_layers_then_even_layers(x64):
    """One asynchronous sweep of a 3-layer MLP against an explicit numpy computation:
    layers 1 and 3 from the old state, then layer 2 from their new values."""
    model, params, buffers, x, y, rx = setup("ep", per_neuron=True)
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    k = jax.random.split(jax.random.PRNGKey(7), 3)
    s = tuple(jax.random.uniform(kk, (x.shape[0], n), x.dtype) for kk, n in zip(k, model.state_sizes))
    got, info = Async()(model, eff, ctx, s, None, 0.0, rx.dt, 1)
    P = [{k2: np.asarray(v) for k2, v in layer.items()} for layer in params]
    sig = lambda z: np.clip(z, 0.0, 1.0)  # hard sigmoid
    xs, (s1, s2, s3), d = np.asarray(x), map(np.asarray, s), [np.asarray(v) for v in rx.dt]
    n1 = (1 - d[0]) * s1 + d[0] * sig(xs @ P[0]["w"] + P[0]["b"] + s2 @ P[1]["w"].T)
    n3 = (1 - d[2]) * s3 + d[2] * sig(s2 @ P[2]["w"] + P[2]["b"])
    n2 = (1 - d[1]) * s2 + d[1] * sig(n1 @ P[1]["w"] + P[1]["b"] + n3 @ P[2]["w"].T)
    for a, b in zip(got, (n1, n2, n3)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-12, atol=1e-14)
    assert int(info.steps) == 1
    assert float(info.residual) == pytest.approx(float(dynamics.relative_residual(got, s)), rel=1e-12)


@pytest.mark.parametrize("name", ["ep", "conv"])
def test_default_solver_is_the_scan_of_dynamics(name):
    """`Estimator()` (solver Scan) runs the `dynamics` functions the estimators called
    before solvers existed (a separately compiled program: equal up to the last bits that
    XLA's fusion choices may move; the bit-for-bit check against the previous code is the
    parity tests' of test_estimators / test_models)."""
    model, params, buffers, x, y, rx = setup(name, dtype=jnp.float32)
    est = ep_jax.Estimator(t_free=8, t_nudge=3)
    g, aux = jax.jit(ep_jax.estimate, static_argnums=(0, 1))(model, est, None, params, buffers, x, y, rx)

    def by_hand(params):
        eff = model.prepare(params, buffers)
        ctx = model.input_drive(eff, x)
        s, r = dynamics.free_phase(model, eff, ctx, rx.dt, 8, residual=True)
        y1h = model.one_hot(y, x.dtype)
        nudged, rn = dynamics.nudged_phases(model, eff, ctx, s, y1h, (rx.beta, -rx.beta), rx.dt, 3, residual=True)
        return ep_jax.estimators.ep_grad_from_states(model, est, params, buffers, x, y1h, rx.beta, s, nudged), s, r, rn

    g2, s2, r2, rn2 = jax.jit(by_hand)(params)
    assert rel_err(aux.s_free, s2) <= 1e-6 and rel_err(g, g2) <= 1e-4
    assert float(aux.residual_free) == pytest.approx(float(r2), rel=1e-4)
    assert float(aux.residual_nudge) == pytest.approx(float(rn2), rel=1e-4)
    assert est.solver == Scan() and est.phase_solvers == (Scan(), Scan())


def test_adaptive_and_async_stop_at_their_tolerance(x64):
    model, params, buffers, x, y, rx = setup("dendritic")
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    s0 = model.zero_state(x.shape[0], x.dtype)
    for solver in (Adaptive(1e-6), Async(1e-6)):
        s, info = solver(model, eff, ctx, s0, None, 0.0, rx.dt, 500)
        assert 1 <= int(info.steps) < 500 and float(info.residual) <= 1e-6
        # the same number of steps of the fixed-step version gives the same state
        fixed = Scan() if isinstance(solver, Adaptive) else Async()
        s2, info2 = fixed(model, eff, ctx, s0, None, 0.0, rx.dt, int(info.steps))
        assert rel_err(s, s2) < 1e-13 and float(info2.residual) == pytest.approx(float(info.residual), rel=1e-9)
    _, info = Adaptive(1e-30)(model, eff, ctx, s0, None, 0.0, rx.dt, 7)  # the budget caps it
    assert int(info.steps) == 7


def test_nudged_phases_of_a_solver_are_each_phase_alone(x64):
    model, params, buffers, x, y, rx = setup("hts", per_neuron=True)
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    y1h = model.one_hot(y, x.dtype)
    s, _ = Scan()(model, eff, ctx, model.zero_state(x.shape[0], x.dtype), None, 0.0, rx.dt, 30)
    phases, info = Async().phases(model, eff, ctx, s, y1h, (0.3, -0.3), rx.dt, 9)
    for beta, got in zip((0.3, -0.3), phases):
        alone, _ = Async()(model, eff, ctx, s, y1h, beta, rx.dt, 9)
        assert rel_err(got, alone) < 1e-13
    assert int(info.steps) == 9


@pytest.mark.parametrize("name", ["ep", "conv"])
def test_async_ep_gradient_matches_the_implicit_gradient(x64, name):
    """The symmetric EP gradient with asynchronous phases run to convergence against the
    implicit gradient (adjoint of the synchronous step, `jax.vjp`): equal up to the
    O(β²) bias of the symmetric estimate (energy-based models: there EP is the gradient)."""
    model, params, buffers, x, y, rx = setup(name)
    rx = rx._replace(beta=jnp.asarray(1e-3, jnp.float64))
    est = ep_jax.Estimator(t_free=2000, t_nudge=2000, solver=Async(1e-14))
    g, aux = ep_jax.estimate(model, est, None, params, buffers, x, y, rx)
    g_imp, _, info = ep_jax.estimators.implicit_grad(model, params, buffers, x, y, rx, 3000, solver=Adaptive(1e-14))
    assert bool(info.converged)
    assert rel_err(g, g_imp) < 1e-5
    assert float(aux.residual_free) <= 1e-14 and float(aux.residual_nudge) <= 1e-14


@pytest.mark.parametrize("name", ["dendritic", "hts", "dendritic_conv"])
def test_async_ep_gradient_equals_the_synchronous_one(x64, name):
    """Models without an energy (dendritic apical maps, γ ≠ 1): EP is not the loss gradient
    there, but the estimate is a function of the fixed points, so the asynchronous phases
    give the synchronous phases' estimate (both run to convergence)."""
    model, params, buffers, x, y, rx = setup(name, per_neuron=name == "hts")
    budget = dict(t_free=3000, t_nudge=3000)
    g_async, a1 = ep_jax.estimate(
        model, ep_jax.Estimator(**budget, solver=Async(1e-14)), None, params, buffers, x, y, rx
    )
    g_sync, a2 = ep_jax.estimate(
        model, ep_jax.Estimator(**budget, solver=Adaptive(1e-14)), None, params, buffers, x, y, rx
    )
    assert float(a1.residual_nudge) <= 1e-14 and float(a2.residual_nudge) <= 1e-14
    assert rel_err(g_async, g_sync) < 1e-8
    assert max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(g_sync)) > 0


def test_solver_spellings_round_trip_and_refusals():
    for text, want in [
        ("scan", Scan()),
        ("adaptive:1e-5", Adaptive(1e-5)),
        ("async", Async()),
        ("ASYNC:2e-6", Async(2e-6)),
        ("pallas", Pallas()),
        ("pallas:interpret", Pallas(True)),
    ]:
        got = solvers.parse(text)
        assert got == want and solvers.parse(got.spec()) == got
    assert solvers.parse_phases("adaptive:1e-5/scan") == (Adaptive(1e-5), Scan())
    assert solvers.parse_phases("async") == (Async(), Async())
    assert solvers.spell_phases(Async(1e-5), Async(1e-5)) == "async:1e-05"
    for bad, match in [
        ("adaptive", "^solver must be one of"),
        ("adaptive:x", "^solver: the tolerance of 'adaptive:x' is not a number"),
        ("async:0", "must be a positive number"),
        ("a/b/c", "FREE or FREE/NUDGE"),
        ("scan:1e-5", "^solver must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            solvers.parse_phases(bad)
    with pytest.raises(ValueError, match="^tol must be a positive number, got True"):
        Async(True)
    est = ep_jax.Estimator(solver="async:1e-5", nudge_solver="scan")
    assert est.phase_solvers == (Async(1e-5), Scan()) and hash(est) == hash(
        ep_jax.Estimator(solver=Async(1e-5), nudge_solver=Scan())
    )


# --- the config field ------------------------------------------------------------------------


def test_config_solver_field_and_old_digests():
    from ep_jax.experiments.build import build_estimator
    from ep_jax.experiments.config import ConfigError, RunConfig, parse_sets, validate

    cfg = validate(RunConfig.from_dict({"solver": "Async:1e-5/ASYNC"}))
    assert cfg.solver == "async:1e-05/async" and RunConfig.from_dict(cfg.to_json()) == cfg
    assert build_estimator(cfg).phase_solvers == (Async(1e-5), Async())
    # digests computed by the code before `solver` existed (free_tol / relaxation_impl fields)
    assert RunConfig().digest() == "2df086a7e774eea8"
    assert RunConfig.from_dict({"free_tol": 1e-5}).digest() == "6f6fb41ac4e03c0e"
    assert RunConfig.from_dict({"solver": "adaptive:1e-5/scan"}).digest() == "6f6fb41ac4e03c0e"
    assert RunConfig.from_dict({"relaxation_impl": "pallas"}).digest() == "dc3cb155a90c8a7a"
    assert RunConfig.from_dict({"solver": "pallas"}).digest() == "dc3cb155a90c8a7a"
    assert (
        len(
            {
                RunConfig.from_dict({"solver": s}).digest()
                for s in ("scan", "async", "async:1e-5", "adaptive:1e-5", "pallas", "adaptive:1e-5/scan")
            }
        )
        == 6
    )
    # an old config.json (both older fields at their defaults) loads as the default
    assert RunConfig.from_dict({"free_tol": None, "relaxation_impl": "xla"}) == RunConfig()
    assert RunConfig.from_dict(parse_sets(["solver=async:1e-6"])).solver == "async:1e-06"
    for d, match in [
        ({"solver": "fast"}, "^solver must be one of"),
        ({"solver": "async", "free_tol": 1e-5}, "^solver 'async' contradicts the older field"),
        ({"relaxation_impl": "cuda"}, "^relaxation_impl \\(replaced by solver\\): expected xla or pallas"),
        ({"free_tol": -1.0}, "^free_tol \\(replaced by solver\\): expected a positive number"),
        ({"solver": "pallas", "estimator": "implicit"}, "^solver: pallas needs estimator"),
        ({"solver": "async", "estimator": "bptt_full"}, "^solver: the bptt_full estimator"),
    ]:
        with pytest.raises(ConfigError, match=match):
            validate(RunConfig.from_dict(d))


def test_list_fields_explains_the_solver():
    from ep_jax.experiments.config import describe

    text = describe()
    line = next(l for l in text.splitlines() if l.lstrip().startswith("solver"))
    for word in ("scan", "adaptive:TOL", "async", "pallas"):
        assert word in text[text.index(line) : text.index(line) + 600]
