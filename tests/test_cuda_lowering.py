"""GPU-only failures caught on the CPU: lower (not run) for CUDA.

JAX lowers for a platform it does not have (`jax.export` with `platforms=("cuda",)`):
the fused Pallas kernel goes through the Triton lowering (block shapes, dot dimensions,
the kernel body's ops), whose custom call has no compatibility guarantee and must be
allowed explicitly. A GPU then finds nothing new to refuse in what these tests lower.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

import ep_jax
from ep_jax.kernels import fused as K
from ep_jax.solvers import Pallas

#: the custom call of a Pallas Triton kernel
TRITON = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


def lower_for_cuda(fn, *args, kernel: bool = False):
    """`fn` jitted and exported for CUDA from abstract `args`; its StableHLO text."""
    checks = [TRITON] if kernel else []
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), args)
    exp = export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=checks)(*abstract)
    assert exp.platforms == ("cuda",)
    return exp.mlir_module()


@pytest.fixture
def kernel_lowers(monkeypatch):
    """The kernel path without the "needs a GPU" fallback of this CPU (what is lowered is
    the Triton kernel, as a GPU would compile it)."""
    monkeypatch.setattr(K, "_lowers", lambda plan, interp, backend: True)


FAMILIES = {
    "ep": (ep_jax.EPModel(sizes=(784, 256, 10)), dict(gamma=1.0)),
    "ep-2h-ce": (ep_jax.EPModel(sizes=(784, 128, 100, 10), activation="tanh", loss="ce"), dict(gamma=1.0)),
    "hts": (
        ep_jax.EPModel(sizes=(784, 1024, 10), activation="leaky_relu", output_activation="sigmoid", loss="mse"),
        dict(gamma=1.0),
    ),
    "dendritic": (ep_jax.DendriticModel(sizes=(784, 256, 256, 10)), dict(alpha=0.2)),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("per_neuron", [False, True])
@pytest.mark.parametrize("phase", ["free", "nudged"])
def test_fused_kernel_lowers_for_cuda(kernel_lowers, name, per_neuron, phase):
    model, settings = FAMILIES[name]
    params, buffers = model.init(jax.random.PRNGKey(0), **settings)
    B = 50  # not a multiple of the tile: padded rows
    x = jnp.zeros((B, model.sizes[0]))
    y1h = model.one_hot(jnp.arange(B) % model.n_classes)
    dt = [jnp.full((n,), 0.5) for n in model.state_sizes] if per_neuron else [0.5] * model.n_layers
    rx = ep_jax.make_relaxation(model, beta=0.3, dt=dt)
    solver = Pallas()

    def phase_fn(params, buffers, x, y1h, rx):
        eff = model.prepare(params, buffers)
        ctx = model.input_drive(eff, x)
        s0 = model.zero_state(x.shape[0], x.dtype)
        if phase == "free":
            return solver(model, eff, ctx, s0, None, 0.0, rx.dt, 30)
        return solver.phases(model, eff, ctx, s0, y1h, (rx.beta, -rx.beta), rx.dt, 8)

    text = lower_for_cuda(phase_fn, params, buffers, x, y1h, rx, kernel=True)
    assert text.count("__gpu$xla.gpu.triton") == 1  # the phase is one kernel launch


def test_without_allowing_the_triton_call_export_refuses(kernel_lowers):
    """The check the tests above switch off is real: the kernel is in the lowered module."""
    model, settings = FAMILIES["ep"]
    params, buffers = model.init(jax.random.PRNGKey(0), **settings)
    rx = ep_jax.make_relaxation(model, beta=0.3, dt=0.5)

    def free(params, x):
        eff = model.prepare(params, buffers)
        return Pallas()(model, eff, model.input_drive(eff, x), model.zero_state(16), None, 0.0, rx.dt, 5)

    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility guarantees"):
        lower_for_cuda(free, params, jnp.zeros((16, 784)))


def test_a_block_shape_the_gpu_refuses_is_refused_when_lowering(kernel_lowers):
    model, settings = FAMILIES["ep"]
    params, buffers = model.init(jax.random.PRNGKey(0), **settings)
    rx = ep_jax.make_relaxation(model, beta=0.3, dt=0.5)
    bad = Pallas()
    object.__setattr__(bad, "block_b", 24)  # past the solver's own check: the kernel's must hold

    def free(params, x):
        eff = model.prepare(params, buffers)
        return bad(model, eff, model.input_drive(eff, x), model.zero_state(48), None, 0.0, rx.dt, 5)

    with pytest.raises(K.KernelShapeError, match="batch tile 24 must be a power of 2"):
        lower_for_cuda(free, params, jnp.zeros((48, 784)), kernel=True)


# --- the whole training step of every preset ---------------------------------------------------

#: one preset per kind of program in the default run (each family, the HTS network, BPTT,
#: cross-entropy, the readout); every other preset with `-m slow` (about 4 s each on 2 cores)
DEFAULT_RUN = (
    "mnist-ep",
    "mnist-dep",
    "mnist-dbptt",
    "mnist-hts-normal",
    "fmnist-ep",
    "fmnist-conv-small",
    "cifar10-conv-ep",
    "cifar10-conv-dep",
)


def _presets():
    from ep_jax.experiments.presets import PRESETS

    return [p if p in DEFAULT_RUN else pytest.param(p, marks=pytest.mark.slow) for p in sorted(PRESETS)]


def _train_step_module(preset: str, solver: str | None = None, batch: int | None = None) -> str:
    from ep_jax.experiments import build
    from ep_jax.experiments.config import RunConfig, validate
    from ep_jax.experiments.presets import PRESETS

    values = dict(PRESETS[preset])
    if solver:
        values["solver"] = solver
    if batch:
        values["batch_size"] = batch
    cfg = validate(RunConfig.from_dict(values))
    model, est = build.build_model(cfg), build.build_estimator(cfg)
    opt = build.build_optimizer(cfg, model)
    dtype = jnp.float64 if cfg.float64 else jnp.float32
    with jax.enable_x64(cfg.float64):
        state = jax.eval_shape(
            lambda k: ep_jax.init_state(model, est, opt, k, dtype=dtype, **build.model_settings(cfg)),
            jax.random.PRNGKey(0),
        )
        rx = jax.eval_shape(lambda: build.build_relaxation(cfg, model))
        x = jax.ShapeDtypeStruct((cfg.batch_size, cfg.n_inputs()), dtype)
        y = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32)
        key = jax.ShapeDtypeStruct((2,), jnp.uint32)
        step = lambda k, st, x, y, rx: ep_jax.train_step(model, est, opt, k, st, x, y, rx)
        exp = export.export(
            jax.jit(step), platforms=("cuda",), disabled_checks=[TRITON] if solver and "pallas" in solver else []
        )(key, state, x, y, rx)
    return exp.mlir_module()


@pytest.mark.parametrize("preset", _presets())
def test_every_presets_training_step_lowers_for_cuda(preset):
    text = _train_step_module(preset)
    assert "func.func public @main" in text


@pytest.mark.parametrize(
    "preset,solver",
    [
        ("mnist-dep", "pallas"),
        ("mnist-hts-normal", "pallas"),
        ("fmnist-ep", "pallas"),
        ("mnist-dep", "async:1e-5"),
        ("fmnist-conv-small", "async:1e-5/async"),
    ],
)
def test_training_step_with_other_solvers_lowers_for_cuda(kernel_lowers, preset, solver):
    text = _train_step_module(preset, solver)
    assert ("__gpu$xla.gpu.triton" in text) == solver.startswith("pallas")
