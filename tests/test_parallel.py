"""Data parallelism (ep_jax.parallel): sharded steps equal one device on the global batch.

The 8-device run happens in a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=8`
set before jax is imported (this process's jax already has one CPU device); it saves its
params, and the single-device reference is computed here, in this process.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ep_jax
from ep_jax import parallel
from ep_jax import sweep as S

ROOT = Path(__file__).resolve().parents[1]
CASES = [("ep", "symmetric"), ("dendritic", "one_sided"), ("dendritic", "bptt")]
STEPS, GLOBAL_BATCH = 3, 16


def setup(model_kind, est_kind):
    """Model, estimator, hyper, init state and data shared by parent and child."""
    model = ep_jax.build_model(model_kind, sizes=(10, 8, 4))
    est = ep_jax.Estimator(est_kind, t_free=12, t_nudge=4)
    hyper = ep_jax.make_hyper(model, beta=0.2, lr=[0.2, 0.1], dt=0.8)
    state = ep_jax.init_state(model, jax.random.PRNGKey(0), hyper, est)
    data = []
    for t in range(STEPS):
        kx, ky = jax.random.split(jax.random.PRNGKey(100 + t))
        data.append((jax.random.uniform(kx, (GLOBAL_BATCH, 10)), jax.random.randint(ky, (GLOBAL_BATCH,), 0, 4)))
    return model, est, hyper, state, data


def sweep_setup(model, est, hyper):
    h2 = hyper._replace(beta=jnp.asarray(0.3, hyper.beta.dtype), lr=hyper.lr * 0.5)
    return S.init_sweep(model, est, [jax.random.PRNGKey(0), jax.random.PRNGKey(7)], [hyper, h2])


CHILD = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    sys.path.insert(0, os.environ["TEST_DIR"])
    from test_parallel import CASES, setup, sweep_setup
    from ep_jax import parallel
    out = {"n_devices": np.array(len(jax.devices()))}
    for mk, ek in CASES:
        model, est, hyper, state, data = setup(mk, ek)
        step = parallel.data_parallel_step(model, est)
        sstep = parallel.data_parallel_step(model, est, sweep=True)
        sstate, sh = sweep_setup(model, est, hyper)
        for x, y in data:
            state, m = step(state, x, y, hyper)
            sstate, sm = sstep(sstate, x, y, sh)
        for i, leaf in enumerate(jax.tree.leaves(state.params)):
            out[f"{mk}_{ek}_p{i}"] = np.asarray(leaf)
        for i, leaf in enumerate(jax.tree.leaves(sstate.train.params)):
            out[f"{mk}_{ek}_sweep_p{i}"] = np.asarray(leaf)
        out[f"{mk}_{ek}_loss"] = np.asarray(m["loss"])
        out[f"{mk}_{ek}_correct"] = np.asarray(m["correct"])
        out[f"{mk}_{ek}_sweep_loss"] = np.asarray(sm["loss"])
    try:
        step(state, data[0][0][:12], data[0][1][:12], hyper)
    except ValueError as e:
        out["batch_error"] = np.array(str(e))
    np.savez(sys.argv[1], **out)
""")


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    path = tmp_path_factory.mktemp("dp") / "out.npz"
    env = dict(os.environ, TEST_DIR=str(Path(__file__).parent),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(np.load(path))


@pytest.mark.parametrize("model_kind,est_kind", CASES)
def test_eight_devices_equal_one_device_global_batch(eight_devices, model_kind, est_kind):
    assert int(eight_devices["n_devices"]) == 8
    model, est, hyper, state, data = setup(model_kind, est_kind)
    init = [np.asarray(a) for a in jax.tree.leaves(state.params)]
    for x, y in data:
        state, m = ep_jax.train_step_jit(model, est, state, x, y, hyper)
    for i, leaf in enumerate(jax.tree.leaves(state.params)):
        got = eight_devices[f"{model_kind}_{est_kind}_p{i}"]
        np.testing.assert_allclose(got, leaf, rtol=1e-5, atol=1e-6)
        if i == 0:
            assert not np.allclose(got, init[0])            # training moved the params
    np.testing.assert_allclose(eight_devices[f"{model_kind}_{est_kind}_loss"], m["loss"], rtol=1e-5)
    assert int(eight_devices[f"{model_kind}_{est_kind}_correct"]) == int(m["correct"])


@pytest.mark.parametrize("model_kind,est_kind", CASES)
def test_eight_devices_sweep_equals_one_device_sweep(eight_devices, model_kind, est_kind):
    model, est, hyper, _, data = setup(model_kind, est_kind)
    sstate, sh = sweep_setup(model, est, hyper)
    for x, y in data:
        sstate, sm = S.sweep_step(model, est, sstate, x, y, sh)
    for i, leaf in enumerate(jax.tree.leaves(sstate.train.params)):
        np.testing.assert_allclose(eight_devices[f"{model_kind}_{est_kind}_sweep_p{i}"], leaf, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eight_devices[f"{model_kind}_{est_kind}_sweep_loss"], sm["loss"], rtol=1e-5)


def test_batch_must_divide_over_devices(eight_devices):
    msg = str(eight_devices["batch_error"])
    assert "divisible by the 8 devices" in msg and "(12, 10)" in msg


def test_one_device_mesh_equals_train_step():
    model, est, hyper, state, data = setup("ep", "symmetric")
    step = parallel.data_parallel_step(model, est, devices=jax.devices()[:1])
    a = b = state
    for x, y in data:
        a, ma = step(a, x, y, hyper)
        b, mb = ep_jax.train_step_jit(model, est, b, x, y, hyper)
    for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
    assert float(ma["accuracy"]) == pytest.approx(float(mb["accuracy"]))


def test_bad_mesh_arguments():
    model, est, *_ = setup("ep", "symmetric")
    mesh = parallel.make_mesh(axis_name="batch")
    with pytest.raises(ValueError, match="no axis 'data'"):
        parallel.data_parallel_step(model, est, mesh)
    with pytest.raises(ValueError, match="either mesh or devices"):
        parallel.data_parallel_step(model, est, mesh, devices=jax.devices(), axis_name="batch")
    with pytest.raises(ValueError, match="at least one device"):
        parallel.make_mesh([])
