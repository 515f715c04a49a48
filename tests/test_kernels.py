"""The fused Pallas relaxation kernel (ep_jax.kernels) against the XLA path (ep_jax.dynamics).

On the CPU the kernel runs in Pallas interpret mode: the same kernel body and block
layout as on the GPU, emulated. Widths are small and not powers of 2 (the wrapper pads
them), batches not multiples of the tile (padded rows), so padding is exercised."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

import ep_jax
from ep_jax import dynamics, kernels
from ep_jax.kernels import fused as K
from ep_jax.models.base import OutputGrad
from ep_jax.reference import Unhoisted

F32_TOL = 1e-5
F64_TOL = 1e-12


def models():
    return {
        "ep": (ep_jax.EPModel(sizes=(12, 24, 10)), dict(gamma=1.0)),
        "ep-2h-ce": (ep_jax.EPModel(sizes=(12, 20, 18, 10), activation="tanh", loss="ce"), dict(gamma=1.0)),
        "hts": (
            ep_jax.EPModel(sizes=(12, 40, 10), activation="leaky_relu", output_activation="sigmoid"),
            dict(gamma=0.5),
        ),
        "dendritic": (ep_jax.DendriticModel(sizes=(12, 24, 10)), dict(alpha=0.2)),
        "dendritic-2h": (ep_jax.DendriticModel(sizes=(12, 20, 18, 10), basal_branches=4), dict(alpha=0.3)),
    }


def setup(name, batch=20, dtype=jnp.float32, per_neuron=False, seed=0):
    model, settings = models()[name]
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    params, buffers = model.init(k[0], dtype, **settings)
    eff = model.prepare(params, buffers)
    x = jax.random.uniform(k[1], (batch, model.sizes[0]), dtype)
    y = jax.random.randint(k[2], (batch,), 0, model.n_classes)
    if per_neuron:
        dt = tuple(
            jax.random.uniform(kk, (n,), dtype, 0.2, 1.0)
            for kk, n in zip(jax.random.split(k[3], model.n_layers), model.state_sizes)
        )
    else:
        dt = (jnp.asarray(0.6, dtype),) * model.n_layers
    return model, params, buffers, eff, model.input_drive(eff, x), x, y, dt


@pytest.mark.parametrize("name", list(models()))
@pytest.mark.parametrize("per_neuron", [False, True])
def test_free_and_nudged_states_match_xla(name, per_neuron):
    model, _, _, eff, ctx, _, y, dt = setup(name, per_neuron=per_neuron)
    y1h = model.one_hot(y)
    sk = kernels.free_phase(model, eff, ctx, dt, 9, interpret=True)
    nk = kernels.nudged_phases(model, eff, ctx, sk, y1h, (0.5, -0.5), dt, 4, interpret=True)
    sx = dynamics.free_phase(model, eff, ctx, dt, 9)
    nx = dynamics.nudged_phases(model, eff, ctx, sx, y1h, (0.5, -0.5), dt, 4)
    assert rel_err(sk, sx) <= F32_TOL
    for a, b in zip(nk, nx):
        assert rel_err(a, b) <= F32_TOL
    # the ±β phases differ from each other (the force acts), so the check could fail
    assert rel_err(nx[0], nx[1]) > 1e-4


@pytest.mark.parametrize("name", ["ep", "dendritic"])
def test_float64_matches_xla(x64, name):
    model, _, _, eff, ctx, _, y, dt = setup(name, dtype=jnp.float64, per_neuron=True)
    sk = kernels.free_phase(model, eff, ctx, dt, 9, interpret=True)
    (nk,) = kernels.nudged_phases(model, eff, ctx, sk, model.one_hot(y, jnp.float64), (0.3,), dt, 4, interpret=True)
    sx = dynamics.free_phase(model, eff, ctx, dt, 9)
    (nx,) = dynamics.nudged_phases(model, eff, ctx, sx, model.one_hot(y, jnp.float64), (0.3,), dt, 4)
    assert sk[0].dtype == jnp.float64
    assert rel_err(sk, sx) <= F64_TOL and rel_err(nk, nx) <= F64_TOL


@pytest.mark.parametrize(
    "name,kind", [("ep", "symmetric"), ("hts", "chl"), ("dendritic", "symmetric"), ("ep-2h-ce", "one_sided")]
)
def test_ep_gradients_match_xla(name, kind):
    model, params, buffers, _, _, x, y, dt = setup(name, per_neuron=name == "hts")
    rx = ep_jax.make_relaxation(model, beta=0.4, dt=list(dt))
    grads = {}
    for impl, solver in (("xla", ep_jax.solvers.Scan()), ("pallas", ep_jax.solvers.Pallas(interpret=True))):
        est = ep_jax.Estimator(kind, t_free=9, t_nudge=4, solver=solver)
        g, aux = jax.jit(ep_jax.estimate, static_argnums=(0, 1))(model, est, None, params, buffers, x, y, rx)
        grads[impl] = (g, aux)
    (gx, ax), (gk, ak) = grads["xla"], grads["pallas"]
    assert rel_err(gk, gx) <= F32_TOL
    assert rel_err(ak.s_free, ax.s_free) <= F32_TOL
    assert np.isclose(float(ak.loss), float(ax.loss), rtol=F32_TOL)
    assert max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(gx)) > 0


def test_vmapped_members_equal_solo():
    model, _ = models()["hts"]
    M, B = 3, 20
    keys = jax.random.split(jax.random.PRNGKey(3), M)
    params, buffers = jax.vmap(lambda k: model.init(k, gamma=0.5))(keys)
    buffers = dict(buffers, gamma=jnp.asarray([0.5, 0.7, 1.0]))
    x = jax.random.uniform(jax.random.PRNGKey(4), (B, model.sizes[0]))
    y1h = model.one_hot(jnp.arange(B) % model.n_classes)
    dts = tuple(
        jax.random.uniform(jax.random.PRNGKey(5 + l), (M, n), minval=0.2, maxval=1.0)
        for l, n in enumerate(model.state_sizes)
    )

    def phases(p, b, dt):
        eff = model.prepare(p, b)
        ctx = model.input_drive(eff, x)
        s = kernels.free_phase(model, eff, ctx, dt, 7, interpret=True)
        return s, kernels.nudged_phases(model, eff, ctx, s, y1h, (0.5, -0.5), dt, 3, interpret=True)

    vm = jax.vmap(phases)(params, buffers, dts)
    for m in range(M):
        pick = lambda t: jax.tree.map(lambda a: a[m], t)
        solo = phases(pick(params), pick(buffers), pick(dts))
        assert rel_err(pick(vm), solo) <= 1e-6
    # and the members differ (γ and dt differ), so equality is not trivial
    assert rel_err(jax.tree.map(lambda a: a[0], vm[0]), jax.tree.map(lambda a: a[2], vm[0])) > 1e-3


def test_output_grad_target_and_residual():
    model, _, _, eff, ctx, _, _, dt = setup("ep")
    g = OutputGrad(jax.random.normal(jax.random.PRNGKey(9), (ctx.shape[0], model.n_classes)))
    s = dynamics.free_phase(model, eff, ctx, dt, 9)
    (nk,), rk = kernels.nudged_phases(model, eff, ctx, s, g, (0.2,), dt, 5, residual=True, interpret=True)
    fk, rfk = kernels.free_phase(model, eff, ctx, dt, 9, residual=True, interpret=True)
    (nx,), rx = dynamics.nudged_phases(model, eff, ctx, s, g, (0.2,), dt, 5, residual=True)
    fx, rfx = dynamics.free_phase(model, eff, ctx, dt, 9, residual=True)
    assert rel_err(nk, nx) <= F32_TOL and rel_err(fk, fx) <= F32_TOL
    np.testing.assert_allclose([float(rk), float(rfk)], [float(rx), float(rfx)], rtol=1e-4)
    assert float(rfx) > 0


def test_padding_and_block_checks():
    model, _, _, eff, ctx, _, _, dt = setup("ep", batch=20)
    plan = K.plan_of(model, ctx, None, None, 5)
    assert plan.padded == (32, 16) and plan.rows % plan.tile == 0 and plan.tile == 32
    K.check_blocks(plan)
    with pytest.raises(K.KernelShapeError, match="power of 2"):
        K.check_blocks(K.Plan(**{**plan.__dict__, "padded": (24, 10)}))
    with pytest.raises(K.KernelShapeError, match="batch tile 24"):
        kernels.free_phase(model, eff, ctx, dt, 5, block_b=24, interpret=True)
    with pytest.raises(K.KernelShapeError, match="batch tile 8"):
        K.check_blocks(K.Plan(**{**plan.__dict__, "tile": 8, "rows": 24}))
    assert K.padded(10) == 16 and K.padded(256) == 256 and K.padded(784) == 1024


def test_fallbacks_warn_once_and_run_xla():
    model, params, buffers, eff, ctx, x, _, dt = setup("ep")
    want = dynamics.free_phase(model, eff, ctx, dt, 5)
    K._lowers.cache_clear()
    with pytest.warns(RuntimeWarning, match="needs a GPU"):  # CPU without interpret mode
        got = kernels.free_phase(model, eff, ctx, dt, 5)
    assert rel_err(got, want) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call does not warn again
        kernels.free_phase(model, eff, ctx, dt, 5)
    um = Unhoisted(model)
    eff_u = um.prepare(params, buffers)
    with pytest.warns(RuntimeWarning, match="no Pallas relaxation kernel for Unhoisted"):
        got = kernels.free_phase(um, eff_u, um.input_drive(eff_u, x), dt, 5)
    assert rel_err(got, want) <= 1e-6


def test_estimator_solver_validation():
    assert ep_jax.Estimator().solver == ep_jax.solvers.Scan() and ep_jax.Estimator().nudge_solver is None
    with pytest.raises(ValueError, match="^solver must be one of scan, "):
        ep_jax.Estimator(solver="cuda")
    with pytest.raises(ValueError, match="^solver must be an ep_jax.solvers.Solver"):
        ep_jax.Estimator(solver=3)
    with pytest.raises(ValueError, match="^solver: the pallas solver needs estimator"):
        ep_jax.Estimator("holomorphic", solver=ep_jax.solvers.Pallas())
    with pytest.raises(ValueError, match="^nudge_solver: the 'bptt' estimator differentiates the synchronous scan"):
        ep_jax.Estimator("bptt", nudge_solver="pallas")
    with pytest.raises(ValueError, match="^block_b must be a power of 2 >= 16"):
        ep_jax.solvers.Pallas(block_b=24)


def test_run_config_field_is_opt_in_and_keeps_old_digests():
    from ep_jax.experiments.build import build_estimator
    from ep_jax.experiments.config import ConfigError, RunConfig, validate

    base = dict(model="ep", sizes=[12, 24, 10], dataset="synthetic")
    cfg = validate(RunConfig.from_dict(base))
    assert cfg.solver == "scan" and build_estimator(cfg).solver == ep_jax.solvers.Scan()
    # a run saved before the field existed keeps its digest: the field is `later`, so at its
    # default it does not enter the digest (and a non-default value does, below)
    field = {f.name: f for f in dataclasses.fields(cfg)}["solver"]
    assert field.metadata.get("later") is True
    fast = validate(RunConfig.from_dict(dict(base, solver="pallas")))
    assert build_estimator(fast).solver == ep_jax.solvers.Pallas() and fast.digest() != cfg.digest()
    # the field it replaced still loads (an old config.json), as the same config
    old = validate(RunConfig.from_dict(dict(base, relaxation_impl="pallas")))
    assert old == fast and old.digest() == fast.digest()
    with pytest.raises(ConfigError, match="^solver: the bptt estimator differentiates the synchronous scan"):
        validate(RunConfig.from_dict(dict(base, solver="pallas", estimator="bptt")))


def test_estimator_pallas_runs_both_phases_in_the_kernel():
    model, params, buffers, _, _, x, y, dt = setup("ep")
    rx = ep_jax.make_relaxation(model, beta=0.4, dt=list(dt))
    jaxpr = lambda solver: str(
        jax.make_jaxpr(
            lambda p: ep_jax.estimate(
                model, ep_jax.Estimator(t_free=5, t_nudge=3, solver=solver), None, p, buffers, x, y, rx
            )
        )(params)
    )
    assert jaxpr(ep_jax.solvers.Pallas(interpret=True)).count("pallas_call") == 2  # free, and the stacked ±β phases
    assert jaxpr(ep_jax.solvers.Scan()).count("pallas_call") == 0


def test_block_rows_knob(monkeypatch):
    model, _, _, eff, ctx, _, _, dt = setup("hts", batch=40)
    assert K.plan_of(model, ctx, None, None, 3).tile == 64
    monkeypatch.setenv("EP_JAX_PALLAS_BLOCK_B", "16")
    plan = K.plan_of(model, ctx, None, None, 3)
    assert plan.tile == 16 and plan.rows == 48
    got = kernels.free_phase(model, eff, ctx, dt, 4, interpret=True)
    assert rel_err(got, dynamics.free_phase(model, eff, ctx, dt, 4)) <= F32_TOL


def test_missing_triton_backend_warns_and_runs_xla(monkeypatch):
    model, _, _, eff, ctx, _, _, dt = setup("ep")
    K._lowers.cache_clear()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # as if on a GPU ...

    def no_triton(interp):  # ... whose jax has no Triton backend
        raise K.BackendUnavailable(
            "jax X has no Pallas Triton backend (pallas.triton.CompilerParams): use the default solver (scan)"
        )

    monkeypatch.setattr(K, "_compiler_params", no_triton)
    with pytest.warns(RuntimeWarning, match="no Pallas Triton backend"):
        got = kernels.free_phase(model, eff, ctx, dt, 5)
    assert rel_err(got, dynamics.free_phase(model, eff, ctx, dt, 5)) == 0
    K._lowers.cache_clear()


def test_the_model_describes_its_drives_to_the_kernel():
    from ep_jax.models.base import KernelDrive

    ep, dend = models()["ep"][0], models()["dendritic-2h"][0]
    assert ep.kernel_drive() == KernelDrive("linear") and dend.kernel_drive() == KernelDrive("dendritic", 4, 2)
    conv = ep_jax.build_model(
        "conv", input_shape=(7, 7, 1), channels=(2,), kernels=(3,), strides=(1,), paddings=(1,), pools=("max",), fc=(3,)
    )
    assert conv.kernel_drive() is None and "kernel_drive() describes none" in K.supported(conv)
    odd = ep_jax.DendriticModel(sizes=(12, 20, 10), basal_branches=3)
    assert "power-of-2 branch counts, got basal 3" in K.supported(odd)
    # the operands follow the one layout (`_operands` asserts it), for both kinds and phases
    for name in ("ep-2h-ce", "dendritic-2h"):
        model, params, buffers, eff, ctx, x, y, dt = setup(name)
        for target in (None, model.one_hot(y)):
            plan = K.plan_of(model, ctx, model.zero_state(ctx.shape[0]), target, 3)
            ops = K._operands(plan, model, eff, ctx, model.zero_state(ctx.shape[0]), target, 0.5, dt)
            assert [o.shape for o in ops] == [a.shape for a in K._abstract_operands(plan)]
