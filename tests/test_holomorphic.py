"""Exact gradients at finite β: the holomorphic estimator, the implicit (equilibrium)
gradient it converges to, and the convergence residuals of the phases.

References are independent of the estimators' code: `jax.grad` through a relaxation
written out here, and a dense linear solve of the adjoint system with numpy."""

import dataclasses

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, synthetic_problem

import ep_jax
from ep_jax import alignment, dynamics
from ep_jax.estimators import estimate
from experiments.config import ConfigError, RunConfig, validate

SIZES = (6, 5, 3)


def setup(activation="sigmoid", beta=0.3, dt=0.5, seed=0, sizes=SIZES, batch=4):
    model = ep_jax.EPModel(sizes=sizes, activation=activation)
    params, buffers = model.init(jax.random.PRNGKey(seed), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, sizes[0]), jnp.float64)
    y = jax.random.randint(jax.random.PRNGKey(seed + 2), (batch,), 0, sizes[-1])
    rx = ep_jax.make_relaxation(model, beta=beta, dt=dt, dtype=jnp.float64)
    return model, params, buffers, x, y, rx


def est(kind, **kw):
    return ep_jax.Estimator(kind, t_free=400, t_nudge=kw.pop("t_nudge", 400), **kw)


def explicit_relaxation_loss(params, x, y1h, dt, steps, act):
    """The batch-mean cost after `steps` updates s ← (1 − dt) s + dt σ(h) of a one-hidden-
    layer network, h₁ = x W₁ + b₁ + s₂ W₂ᵀ and h₂ = s₁ W₂ + b₂, written from the equations."""
    (l1, l2) = params
    s1 = jnp.zeros((x.shape[0], l1["w"].shape[1]))
    s2 = jnp.zeros((x.shape[0], l2["w"].shape[1]))
    for _ in range(steps):
        h1 = x @ l1["w"] + l1["b"] + s2 @ l2["w"].T
        h2 = s1 @ l2["w"] + l2["b"]
        s1, s2 = (1 - dt) * s1 + dt * act(h1), (1 - dt) * s2 + dt * act(h2)
    return jnp.mean(0.5 * jnp.sum((s2 - y1h) ** 2, axis=-1))


def test_implicit_equals_grad_through_a_long_converged_relaxation(x64):
    model, params, buffers, x, y, rx = setup("tanh")
    g_imp, aux = estimate(model, est("implicit", t_nudge=1), None, params, buffers, x, y, rx)
    y1h = jax.nn.one_hot(y, SIZES[-1], dtype=jnp.float64)
    ref = jax.grad(explicit_relaxation_loss)(params, x, y1h, 0.5, 400, jnp.tanh)
    assert float(aux.residual_free) < 1e-12
    assert rel_err(g_imp, ref) < 1e-9


def test_implicit_equals_a_dense_adjoint_solve(x64):
    """λ = (I − G_sᵀ)⁻¹ ∂ℓ/∂s by numpy's dense solve, then G_θᵀ λ: the same gradient as
    the fixed-point iteration, per-neuron dt and a two-hidden-layer network included."""
    sizes = (5, 4, 4, 3)
    model, params, buffers, x, y, _ = setup("sigmoid", sizes=sizes, batch=3)
    dt = [jnp.linspace(0.2, 0.9, 4), 0.6, jnp.array([0.3, 0.5, 1.0])]
    rx = ep_jax.make_relaxation(model, beta=0.2, dt=dt, dtype=jnp.float64)
    grads, s, info = ep_jax.estimators.implicit_grad(model, params, buffers, x, y, rx, 600)
    assert bool(info.converged) and float(info.residual_adjoint) < 1e-12

    def G(p, flat):
        st = jax.flatten_util.ravel_pytree(s)[1](flat)
        eff = model.prepare(p, buffers)
        return jax.flatten_util.ravel_pytree(
            dynamics.step(model, eff, model.input_drive(eff, x), st, None, 0.0, rx.dt)
        )[0]

    flat = jax.flatten_util.ravel_pytree(s)[0]
    J = np.asarray(jax.jacobian(G, argnums=1)(params, flat))
    y1h = jax.nn.one_hot(y, sizes[-1], dtype=jnp.float64)
    g = np.asarray(jax.grad(lambda f: jnp.mean(model.cost(jax.flatten_util.ravel_pytree(s)[1](f)[-1], y1h)))(flat))
    lam = np.linalg.solve(np.eye(J.shape[0]) - J.T, g)
    ref = jax.vjp(lambda p: G(p, flat), params)[1](jnp.asarray(lam))[0]
    assert rel_err(grads, ref) < 1e-10


def test_holomorphic_two_points_is_the_symmetric_estimate(x64):
    model, params, buffers, x, y, rx = setup("tanh", beta=0.2)
    g_sym, _ = estimate(model, est("symmetric", t_nudge=30), None, params, buffers, x, y, rx)
    g_h2, _ = estimate(model, est("holomorphic", n_points=2, t_nudge=30), None, params, buffers, x, y, rx)
    assert rel_err(g_h2, g_sym) < 1e-12


def test_holomorphic_is_exact_at_finite_beta_where_the_differences_are_biased(x64):
    """|β| = 0.3: one-sided and symmetric estimates are off by percent; the holomorphic
    one with N = 8 agrees with the equilibrium gradient to < 1e-6, and its error falls
    with N (geometrically: N = 4 is orders of magnitude worse than N = 8)."""
    model, params, buffers, x, y, rx = setup("sigmoid", beta=0.3)
    exact, _ = estimate(model, est("implicit", t_nudge=1), None, params, buffers, x, y, rx)
    err = {
        k: rel_err(estimate(model, est(k), None, params, buffers, x, y, rx)[0], exact)
        for k in ("one_sided", "symmetric")
    }
    for n in (4, 8):
        err[n] = rel_err(estimate(model, est("holomorphic", n_points=n), None, params, buffers, x, y, rx)[0], exact)
    print(err)
    assert err["one_sided"] > 1e-2 and err["symmetric"] > 1e-3
    assert err[8] < 1e-6
    assert err[4] > 100 * err[8]


def test_holomorphic_with_the_cross_entropy_cost(x64):
    """The softmax cross-entropy is holomorphic too: N = 8 at |β| = 0.3 is exact to < 1e-5,
    N = 4 two orders worse, N = 2 (symmetric) worse still."""
    model = ep_jax.EPModel(sizes=SIZES, activation="sigmoid", loss="ce")
    params, buffers = model.init(jax.random.PRNGKey(0), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, SIZES[0]), jnp.float64)
    y = jnp.array([0, 1, 2, 0])
    rx = ep_jax.make_relaxation(model, beta=0.3, dt=0.5, dtype=jnp.float64)
    exact, _ = estimate(model, est("implicit", t_nudge=1), None, params, buffers, x, y, rx)
    err = {
        n: rel_err(estimate(model, est("holomorphic", n_points=n), None, params, buffers, x, y, rx)[0], exact)
        for n in (2, 4, 8)
    }
    assert err[8] < 1e-5 and err[4] > 100 * err[8] and err[2] > 10 * err[4], err


def test_holomorphic_with_per_neuron_dt_and_vmapped_members(x64):
    """The equilibrium does not depend on dt: per-neuron time steps give the same exact
    gradient; vmapping over β gives each member's solo estimate."""
    model, params, buffers, x, y, rx = setup("sigmoid", beta=0.25)
    dt = [jnp.linspace(0.3, 1.0, SIZES[1]), jnp.array([0.5, 0.7, 0.9])]
    rx_h = ep_jax.make_relaxation(model, beta=0.25, dt=dt, dtype=jnp.float64)
    e = est("holomorphic", n_points=8)
    exact, _ = estimate(model, est("implicit", t_nudge=1), None, params, buffers, x, y, rx)
    g, aux = estimate(model, e, None, params, buffers, x, y, rx_h)
    assert rel_err(g, exact) < 1e-6
    betas = jnp.array([0.1, 0.25, 0.4])
    batched = jax.vmap(lambda b: estimate(model, e, None, params, buffers, x, y, rx_h._replace(beta=b))[0])(betas)
    for i, b in enumerate(betas):
        solo = estimate(model, e, None, params, buffers, x, y, rx_h._replace(beta=b))[0]
        assert rel_err(jax.tree.map(lambda a: a[i], batched), solo) < 1e-12


def test_holomorphic_precision_follows_the_float_type():
    model = ep_jax.EPModel(sizes=SIZES, activation="tanh")
    params, buffers = model.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, SIZES[0]))
    rx = ep_jax.make_relaxation(model, beta=0.2, dt=0.5)
    e = ep_jax.Estimator("holomorphic", t_free=20, t_nudge=5, n_points=4)
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    s = dynamics.free_phase(model, eff, ctx, rx.dt, 20)
    states = ep_jax.estimators.ep_nudged_states(model, e, eff, ctx, s, model.one_hot(jnp.zeros(4, int)), rx)
    assert len(states) == 4 and all(sl.dtype == jnp.complex64 for st in states for sl in st)
    g, _ = estimate(model, e, None, params, buffers, x, jnp.zeros(4, int), rx)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(g))
    with jax.enable_x64(True):
        assert ep_jax.estimators.complex_dtype(jnp.float64) == jnp.complex128


@pytest.mark.parametrize(
    "build,what",
    [
        (lambda: ep_jax.EPModel(sizes=SIZES), "hard_sigmoid"),
        (lambda: ep_jax.EPModel(sizes=SIZES, activation="relu", output_activation="sigmoid"), "relu"),
        (lambda: ep_jax.EPModel(sizes=SIZES, activation="leaky_relu", output_activation="sigmoid"), "leaky_relu"),
        (lambda: ep_jax.DendriticModel(sizes=SIZES, activation="sigmoid"), "dendritic branches"),
    ],
)
def test_holomorphic_refuses_non_holomorphic_models(build, what):
    model = build()
    params, buffers = model.init(jax.random.PRNGKey(0))
    x, y = jnp.ones((2, SIZES[0])), jnp.zeros(2, int)
    rx = ep_jax.make_relaxation(model, beta=0.2)
    with pytest.raises(ValueError, match="holomorphic") as e:
        estimate(model, ep_jax.Estimator("holomorphic", 10, 5), None, params, buffers, x, y, rx)
    msg = str(e.value)
    assert what in msg and "tanh, sigmoid" in msg and "\n" not in msg


def test_non_holomorphic_parts_are_named():
    assert ep_jax.EPModel(sizes=SIZES, activation="tanh", loss="ce").non_holomorphic() == []
    assert ep_jax.EPModel(sizes=SIZES, activation="sigmoid", output_activation="hard_sigmoid").non_holomorphic() == [
        "output activation 'hard_sigmoid'"
    ]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(kind="symmetric", n_points=4), "n_points is a setting of the 'holomorphic'"),
        (dict(kind="holomorphic", n_points=1), "n_points must be an integer >= 2"),
        (dict(kind="holomorphic", n_points=2.5), "n_points must be an integer >= 2"),
        (dict(kind="bptt", tol=1e-3), "tol is a setting of the 'implicit'"),
        (dict(kind="implicit", tol=0.0), "tol must be a positive number"),
        (dict(kind="holomorphic", nudge="random_sign"), "random_sign"),
    ],
)
def test_estimator_settings_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        ep_jax.Estimator(**kw)


def test_implicit_refuses_an_unconverged_free_phase(x64):
    model, params, buffers, x, y, rx = setup("tanh", dt=0.2)
    short = ep_jax.Estimator("implicit", t_free=5, t_nudge=1)
    with pytest.raises(
        ValueError,
        match=r"free phase has not converged: relative residual .* > tol=1e-05 after "
        r"t_free=5 steps",
    ):
        estimate(model, short, None, params, buffers, x, y, rx)
    # under jit the step is refused instead (non-finite gradients), the state unchanged
    opt = ep_jax.optim.sgd(model, lr=[0.1, 0.1])
    state = ep_jax.init_state(model, short, opt, jax.random.PRNGKey(0), dtype=jnp.float64)
    new, info = ep_jax.train_step_jit(model, short, opt, None, state, x, y, rx)
    assert not bool(info.finite) and int(new.step) == 0
    assert float(info.residual_free) > 1e-5


def test_residuals_in_step_info_match_the_trajectory(x64):
    """StepInfo.residual_free is ‖s_T − s_{T−1}‖ / ‖s_T‖ over every layer, computed here
    from the recorded free trajectory; it falls as t_free grows; the nudged residual is
    reported for EP estimators and is NaN for BPTT."""
    model, params, buffers, x, y, rx = setup("tanh", dt=0.3)
    opt = ep_jax.optim.sgd(model, lr=[0.1, 0.1])
    res = {}
    for T in (10, 40):
        e = ep_jax.Estimator("symmetric", t_free=T, t_nudge=5)
        state = ep_jax.init_state(model, e, opt, jax.random.PRNGKey(0), dtype=jnp.float64)
        state = state._replace(params=params)
        _, info = ep_jax.train_step(model, e, opt, None, state, x, y, rx)
        eff = model.prepare(params, buffers)
        _, traj = dynamics.free_phase(model, eff, model.input_drive(eff, x), rx.dt, T, record=True)
        last = np.concatenate([np.ravel(t[-1]) for t in traj])
        prev = np.concatenate([np.ravel(t[-2]) for t in traj])
        expected = np.linalg.norm(last - prev) / np.linalg.norm(last)
        np.testing.assert_allclose(float(info.residual_free), expected, rtol=1e-10)
        assert np.isfinite(float(info.residual_nudge)) and float(info.residual_nudge) > 0
        res[T] = float(info.residual_free)
    assert res[40] < res[10] / 10
    _, info = ep_jax.train_step(model, ep_jax.Estimator("bptt", 10, 5), opt, None, state, x, y, rx)
    assert np.isnan(float(info.residual_nudge)) and float(info.residual_free) > 0


def test_residual_does_not_change_the_states(x64):
    model, params, buffers, x, y, rx = setup("tanh", dt=0.3)
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    a = dynamics.free_phase(model, eff, ctx, rx.dt, 17)
    b, r = dynamics.free_phase(model, eff, ctx, rx.dt, 17, residual=True)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    y1h = model.one_hot(y, x.dtype)
    for batched in (True, False):
        plain = dynamics.nudged_phases(model, eff, ctx, a, y1h, (0.2, -0.2), rx.dt, 6, batched=batched)
        with_r, r_n = dynamics.nudged_phases(
            model, eff, ctx, a, y1h, (0.2, -0.2), rx.dt, 6, batched=batched, residual=True
        )
        for p, q in zip(jax.tree.leaves(plain), jax.tree.leaves(with_r)):
            np.testing.assert_array_equal(np.asarray(p), np.asarray(q))
        if batched:
            r_batched = float(r_n)
        else:
            np.testing.assert_allclose(float(r_n), r_batched, rtol=1e-12)


def test_alignment_gains_the_implicit_reference(x64):
    """`alignment.measure` compares with truncated BPTT; the implicit gradient is an
    estimator kind, so the same measure applies to it against itself (cosine 1)."""
    model, params, buffers, x, y, rx = setup("sigmoid")
    m = alignment.measure(model, est("holomorphic", n_points=8), params, buffers, x, y, rx)
    assert min(float(c) for c in m.cosine) > 0.999


def test_a_short_training_run_with_the_holomorphic_estimator_learns():
    (x, y), (xt, yt) = synthetic_problem(jax.random.PRNGKey(0), n_train=512, n_test=256)
    model = ep_jax.EPModel(sizes=(16, 32, 4), activation="sigmoid")
    e = ep_jax.Estimator("holomorphic", t_free=30, t_nudge=10, n_points=4)
    opt = ep_jax.optim.sgd(model, lr=[2.0, 1.0], momentum=0.9)
    state = ep_jax.init_state(model, e, opt, jax.random.PRNGKey(1))
    rx = ep_jax.make_relaxation(model, beta=0.5, dt=0.5)
    before = ep_jax.evaluate_jit(model, e, state.params, state.buffers, xt, yt, rx)
    idx = jnp.arange(512).reshape(-1, 32)
    for epoch in range(3):
        state, info = ep_jax.train_steps_jit(
            model,
            e,
            opt,
            jax.random.PRNGKey(2),
            state,
            x,
            y,
            jax.random.permutation(jax.random.PRNGKey(epoch), idx),
            rx,
        )
    after = ep_jax.evaluate_jit(model, e, state.params, state.buffers, xt, yt, rx)
    assert bool(jnp.all(info.finite))
    assert float(after.accuracy) > 0.8 > float(before.accuracy) + 0.2


def test_estimator_replace_keeps_the_new_settings():
    e = ep_jax.Estimator("holomorphic", 20, 5, n_points=6)
    assert dataclasses.replace(e, nudge="fixed").points == 6
    assert ep_jax.Estimator("implicit", 20, 5).residual_tol == 1e-5


# --- the experiment layer ---------------------------------------------------------------

ENGINE = dict(
    dataset="synthetic",
    sizes=[12, 10, 4],
    synthetic_train=96,
    synthetic_test=48,
    t_free=40,
    t_nudge=10,
    batch_size=16,
    epochs=1,
    chunk=3,
    lr=[0.2, 0.1],
    eval_batch=48,
    model="ep",
    activation="sigmoid",
)


def _run(tmp_path, **kw):
    import json

    from experiments import engine
    from experiments.config import RunConfig, validate

    c = validate(RunConfig.from_dict({**ENGINE, **kw}))
    engine.run([engine.Member(c, "m", tmp_path)], progress=False, print_fn=lambda *a: None)
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_engine_runs_the_holomorphic_estimator_and_logs_residuals(tmp_path):
    rows = _run(
        tmp_path / "h",
        estimator="holomorphic",
        n_points=4,
        beta=0.5,
        align_every=3,
        align_batch=8,
        align_reference="implicit",
        float64=True,
    )
    r = rows[0]
    assert 0 < r["residual_free"] < 1e-2 and 0 < r["residual_nudge"] < 1e-2
    # the alignment log against the implicit gradient: holomorphic EP is close to exact
    assert min(r["alignment"][0]["cosine"].values()) > 0.999
    rows = _run(tmp_path / "b", estimator="bptt")
    assert "residual_free" in rows[0] and "residual_nudge" not in rows[0]  # no nudged phase: no column


def test_config_refuses_holomorphic_for_non_holomorphic_models():
    with pytest.raises(
        ConfigError,
        match=r"estimator: holomorphic needs holomorphic functions, and this model "
        r"uses activation 'hard_sigmoid'",
    ):
        validate(RunConfig.from_dict({**ENGINE, "activation": "hard_sigmoid", "estimator": "holomorphic"}))
    with pytest.raises(ConfigError, match="relu \\(the dendritic branches\\)"):
        validate(RunConfig.from_dict({**ENGINE, "model": "dendritic", "estimator": "holomorphic"}))
    with pytest.raises(ConfigError, match="n_points: is a setting of the holomorphic estimator"):
        validate(RunConfig.from_dict({**ENGINE, "n_points": 8}))
    with pytest.raises(ConfigError, match="solver: the bptt estimator differentiates the synchronous scan"):
        validate(RunConfig.from_dict({**ENGINE, "estimator": "bptt", "free_tol": 1e-6}))  # the older field
    with pytest.raises(ConfigError, match="solver: the bptt estimator differentiates the synchronous scan"):
        validate(RunConfig.from_dict({**ENGINE, "estimator": "bptt", "solver": "adaptive:1e-6/scan"}))
    with pytest.raises(ConfigError, match="implicit_tol: is a setting of the implicit estimator"):
        validate(RunConfig.from_dict({**ENGINE, "implicit_tol": 1e-6}))


def test_gradient_error_command_writes_its_figure_and_numbers(tmp_path):
    """The command on a synthetic batch and a small run folder: the table's errors are the
    estimators' (symmetric = holomorphic N=2, N=4 far below symmetric at β = 0.1), and the
    residual curve of the run ends at the value StepInfo-style residuals give."""
    import json

    from experiments import gradient_error

    run = tmp_path / "run"
    _run(run)
    out = tmp_path / "ge"
    gradient_error.main(
        [
            "--out",
            str(out),
            "--dataset",
            "synthetic",
            "--sizes",
            "784",
            "8",
            "10",
            "--t-free",
            "100",
            "--betas",
            "0.1",
            "0.5",
            "--n-points",
            "2",
            "4",
            "--presets",
            str(run),
            "--horizon",
            "30",
            "--batch",
            "8",
        ]
    )
    data = json.loads((out / "gradient_error.json").read_text())
    assert (out / "gradient_error.png").is_file()
    c = data["errors"]["curves"]
    np.testing.assert_allclose(c["holomorphic N=2"], c["symmetric"], rtol=1e-8)
    assert c["holomorphic N=4"][0] < 1e-2 * c["symmetric"][0] < c["one-sided"][0]
    r = data["residuals"]["run"]
    assert r["t_free"] == 40 and len(r["free"]) == 40 and r["at_t_free"] == r["free"][39]
    with pytest.raises(ConfigError, match="neither a preset"):
        gradient_error.main(
            [
                "--out",
                str(out),
                "--dataset",
                "synthetic",
                "--sizes",
                "784",
                "8",
                "10",
                "--t-free",
                "20",
                "--betas",
                "0.1",
                "--presets",
                str(tmp_path / "missing"),
            ]
        )


def test_fields_added_later_keep_the_digest_of_runs_saved_before_them():
    """A checkpoint saved before a field existed carries the digest of the fields of its
    day: every field added since (`later=True`) must leave it unchanged at its default,
    and change it away from it."""
    import hashlib
    import json

    from experiments.config import RunConfig

    original = [
        "dataset",
        "data_dir",
        "subset",
        "test_subset",
        "subset_seed",
        "synthetic_train",
        "synthetic_test",
        "synthetic_noise",
        "model",
        "sizes",
        "activation",
        "output_activation",
        "loss",
        "basal_branches",
        "apical_branches",
        "sparsity",
        "apical_dense",
        "alpha",
        "gamma",
        "estimator",
        "t_free",
        "t_nudge",
        "nudge",
        "beta",
        "dt",
        "dt_dist",
        "dt_mean",
        "dt_std",
        "dt_min",
        "dt_max",
        "dt_out",
        "optimizer",
        "lr",
        "momentum",
        "batch_size",
        "epochs",
        "seed",
        "eval_batch",
        "chunk",
        "max_state",
        "float64",
        "align_every",
        "align_batch",
    ]
    c = RunConfig.from_dict(ENGINE)
    old = {k: v for k, v in c.to_json().items() if k in original and k != "epochs"}
    assert c.digest() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert c.replace(align_reference="implicit").digest() != c.digest()
    assert (
        RunConfig.from_dict({**ENGINE, "estimator": "holomorphic", "n_points": 8}).digest()
        != RunConfig.from_dict({**ENGINE, "estimator": "holomorphic"}).digest()
    )


# --- the adaptive free phase --------------------------------------------------------------


def test_adaptive_free_phase_stops_at_the_tolerance_with_the_fixed_phase_states(x64):
    model, params, buffers, x, y, rx = setup("tanh", dt=0.5)
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    s, r, k = dynamics.free_phase_adaptive(model, eff, ctx, rx.dt, 400, 1e-8)
    k = int(k)
    assert 1 < k < 400 and float(r) <= 1e-8
    fixed, r_fixed = dynamics.free_phase(model, eff, ctx, rx.dt, k, residual=True)
    np.testing.assert_allclose(float(r), float(r_fixed), rtol=1e-9)
    for a, b in zip(s, fixed):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)
    _, r_prev = dynamics.free_phase(model, eff, ctx, rx.dt, k - 1, residual=True)
    assert float(r_prev) > 1e-8  # it stopped at the first step below tol
    # an unreachable tolerance: every step runs
    s, r, k = dynamics.free_phase_adaptive(model, eff, ctx, rx.dt, 7, 1e-30)
    assert int(k) == 7
    for a, b in zip(s, dynamics.free_phase(model, eff, ctx, rx.dt, 7)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


def test_adaptive_free_phase_under_vmap_stops_each_member_at_its_own_step(x64):
    model, params, buffers, x, y, _ = setup("tanh")
    eff = model.prepare(params, buffers)
    ctx = model.input_drive(eff, x)
    dts = jnp.array([0.2, 0.5, 0.9])
    run = lambda d: dynamics.free_phase_adaptive(model, eff, ctx, (d, d), 400, 1e-9)
    s_v, r_v, k_v = jax.vmap(run)(dts)
    assert len(set(np.asarray(k_v).tolist())) == 3
    for i, d in enumerate(dts):
        s, r, k = run(d)
        assert int(k) == int(k_v[i])
        for a, b in zip(s, s_v):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b[i]), rtol=1e-12, atol=1e-14)


def test_estimators_with_an_adaptive_free_phase(x64):
    model, params, buffers, x, y, rx = setup("sigmoid", beta=0.1)
    for kind in ("symmetric", "implicit"):
        fixed, _ = estimate(model, est(kind, t_nudge=20), None, params, buffers, x, y, rx)
        adaptive = ep_jax.solvers.Adaptive(1e-10)
        early, aux = estimate(
            model,
            est(kind, t_nudge=20, solver=adaptive, nudge_solver=ep_jax.solvers.Scan()),
            None,
            params,
            buffers,
            x,
            y,
            rx,
        )
        assert float(aux.residual_free) <= 1e-10
        assert rel_err(early, fixed) < 1e-7
    for kw, match in [
        (dict(kind="bptt", solver=ep_jax.solvers.Adaptive(1e-6)), "differentiates the synchronous scan"),
        (dict(kind="symmetric", solver="adaptive:0"), "tolerance of 'adaptive:0' must be a positive"),
        (dict(kind="holomorphic", nudge_solver="pallas"), "the pallas solver needs estimator"),
    ]:
        with pytest.raises(ValueError, match=match):
            ep_jax.Estimator(**kw)
    with pytest.raises(ValueError, match="^tol must be a positive number, got 0.0"):
        ep_jax.solvers.Adaptive(0.0)
