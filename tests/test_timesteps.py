"""HTS samplers (docs/equations.md) and per-neuron time steps in every model and estimator."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ep_jax
from ep_jax import timesteps as T
from experiments import stability

# the project's offline MNIST, in shared/ beside the checkout (CI has it too)
SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"

N = 200_000


@pytest.mark.parametrize("dist", ["normal", "lognormal", "gamma"])
@pytest.mark.parametrize("mean,std", [(0.25, 0.1), (0.2, 0.15)])
def test_unclipped_moments_match(dist, mean, std):
    spec = T.DtSpec(dist, mean, std)
    u = np.asarray(T.sample_dt_unclipped(jax.random.PRNGKey(1), spec, N), np.float64)
    se_mean = std / math.sqrt(N)
    assert abs(u.mean() - mean) < 5 * se_mean
    # std of the sample std ≈ σ·sqrt((κ − 1)/(4N)) with κ the kurtosis; take it from the sample
    kurt = np.mean((u - u.mean()) ** 4) / u.var() ** 2
    assert abs(u.std() - std) < 5 * std * math.sqrt((kurt - 1) / (4 * N))
    if dist != "normal":
        assert u.min() > 0


@pytest.mark.parametrize("dist", T.DISTRIBUTIONS)
def test_clipped_bounds_same_key_and_tails(dist):
    spec = T.DtSpec(dist, 0.25, 0.15, dt_min=0.05, dt_max=0.4)
    k = jax.random.PRNGKey(2)
    c = np.asarray(T.sample_dt(k, spec, N))
    assert c.min() >= spec.dt_min and c.max() <= spec.dt_max
    np.testing.assert_array_equal(c, T.sample_dt(k, spec, N))
    u = np.asarray(T.sample_dt_unclipped(k, spec, N))
    # clipping maps exactly the tail beyond dt_max onto dt_max
    assert np.mean(c == spec.dt_max) == pytest.approx(np.mean(u >= spec.dt_max), abs=1e-9)
    if dist == "scalar":
        assert np.all(c == 0.25)
        return
    assert not np.array_equal(c, T.sample_dt(jax.random.PRNGKey(3), spec, N))
    if dist == "lognormal":  # independent tail probability: P(ln X > ln dt_max)
        var_u = math.log1p(0.15**2 / 0.25**2)
        z = (math.log(0.4) - (math.log(0.25) - var_u / 2)) / math.sqrt(var_u)
        p = 0.5 * math.erfc(z / math.sqrt(2))
        assert np.mean(c == spec.dt_max) == pytest.approx(p, abs=5 * math.sqrt(p / N))
    if dist in ("lognormal", "gamma"):  # heavy tails pile visible mass at dt_max
        assert np.mean(c == spec.dt_max) > 0.03


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown dt distribution 'cauchy'"):
        T.DtSpec("cauchy")
    with pytest.raises(ValueError, match="dt_min <= dt_max <= 1"):
        T.DtSpec("normal", dt_max=1.5)
    with pytest.raises(ValueError, match="mean must be > 0"):
        T.DtSpec("gamma", mean=0.0)


def test_layer_dts_shapes_and_independence():
    model = ep_jax.build_model("ep", sizes=(10, 64, 32, 4))
    dts = T.layer_dts(jax.random.PRNGKey(0), model, T.default_spec("gamma"), 0.3)
    assert [jnp.shape(d) for d in dts] == [(64,), (32,), ()]
    assert float(dts[-1]) == pytest.approx(0.3)
    assert not np.allclose(dts[0][:32], dts[1])
    rx = ep_jax.make_relaxation(model, dt=list(dts))  # accepted as per-neuron vectors
    assert [jnp.shape(d) for d in rx.dt] == [(64,), (32,), ()]
    np.testing.assert_array_equal(rx.dt[0], dts[0])
    # hidden=None: scalar 1.0 for the hidden layers
    assert [float(d) for d in T.layer_dts(jax.random.PRNGKey(0), model, None, 0.3)] == [1.0, 1.0, pytest.approx(0.3)]


@pytest.mark.parametrize("kind", ["ep", "dendritic"])
def test_hts_with_every_estimator(kind):
    model = ep_jax.build_model(kind, sizes=(12, 10, 8, 4))
    dts = T.layer_dts(jax.random.PRNGKey(1), model, T.default_spec("lognormal"), 0.25)
    rx = ep_jax.make_relaxation(model, beta=0.2, dt=list(dts))
    opt = ep_jax.optim.sgd(model, lr=0.1)
    x = jax.random.uniform(jax.random.PRNGKey(2), (8, 12))
    y = jax.random.randint(jax.random.PRNGKey(3), (8,), 0, 4)
    state = ep_jax.init_state(model, ep_jax.Estimator(), opt, jax.random.PRNGKey(0))
    estimate = jax.jit(ep_jax.estimate, static_argnums=(0, 1))
    for est_kind in ("symmetric", "one_sided", "chl", "bptt", "bptt_full"):
        g, aux = estimate(model, ep_jax.Estimator(est_kind, 40, 8), None, state.params, state.buffers, x, y, rx)
        leaves = [np.asarray(l) for l in jax.tree.leaves(g)]
        assert all(np.all(np.isfinite(l)) for l in leaves) and sum(np.abs(l).sum() for l in leaves) > 0, est_kind
    new, info = ep_jax.train_step_jit(model, ep_jax.Estimator("symmetric", 40, 8), opt, None, state, x, y, rx)
    assert bool(info.finite) and float(info.grad_norm) > 0
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)))
    # the relaxation really uses the vectors: a different draw changes the free state
    other = ep_jax.make_relaxation(
        model, beta=0.2, dt=list(T.layer_dts(jax.random.PRNGKey(9), model, T.default_spec("lognormal"), 0.25))
    )
    est = ep_jax.Estimator("symmetric", 10, 5)
    a = ep_jax.predict(model, est, state.params, state.buffers, x, rx)
    b = ep_jax.predict(model, est, state.params, state.buffers, x, other)
    assert not np.allclose(a[0], b[0])


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="shared MNIST files not beside the checkout")
def test_paper003_network_with_hts_learns(tmp_path):
    """The paper-003 preset (784-1024-10, leaky-ReLU/sigmoid, CHL rule, 125/12 steps,
    batch 256, lognormal hidden dt) on 10 000 MNIST examples for 3 epochs.
    Measured: 88.8 % on 2000 test images (chance 10 %)."""
    from experiments import engine
    from experiments.train import main

    mnist = SHARED_MNIST
    out = tmp_path / "run"
    rc = main(
        [
            "--preset",
            "mnist-hts-lognormal",
            "--data-dir",
            str(mnist),
            "--epochs",
            "3",
            "--subset",
            "10000",
            "--test-subset",
            "2000",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["final_test_acc"] > 80, s
    # the sampled dt vector is saved with the run (the checkpoint's relaxation settings)
    rx = engine.load_run(out)[5]
    assert rx.dt[0].shape == (1024,) and jnp.shape(rx.dt[1]) == ()
    assert len(np.unique(np.asarray(rx.dt[0]))) > 500
    assert np.asarray(rx.dt[0]).min() >= 0.05 and np.asarray(rx.dt[0]).max() <= 0.5


def test_stability_table(tmp_path):
    """Run folders (config, metrics, summary as the engine writes them) -> the Table 1 cell:
    mean ± sample std of the final accuracy over finished seeds, the fluctuation (std of
    epoch-to-epoch changes over the last 10 epochs, averaged over runs), diverged counted."""
    from experiments import aggregate

    rng = np.random.default_rng(0)
    expect = {}

    def write_run(d, dist, seed, acc, status="ok"):
        """A run folder as the engine writes one (every config field, full metric rows)."""
        from ep_jax.experiments import engine
        from ep_jax.experiments.config import RunConfig, validate

        d.mkdir()
        cfg = validate(RunConfig.from_dict(dict(dataset="mnist", dt_dist=dist, dt_out=0.25, dt=0.25, seed=seed)))
        (d / "config.json").write_text(json.dumps(cfg.to_json()))
        rows = [
            {
                "epoch": i + 1,
                "train_acc": a,
                "loss": 0.1,
                "test_acc": a,
                "test_loss": 0.1,
                "time_s": 1.0,
                "steps": 10 * (i + 1),
            }
            for i, a in enumerate(acc)
        ]
        # a diverged run keeps the rows of the epochs before its divergence (metrics and summary alike)
        rows = rows if status == "ok" else rows[:1]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "summary.json").write_text(json.dumps(engine.summarize(rows, status)))

    for dist in ("lognormal", "scalar"):
        finals, flucts = [], []
        for seed in range(3):
            acc = list(90 + rng.normal(0, 1, 12))
            write_run(tmp_path / f"{dist}-{seed}", dist, seed, acc)
            finals.append(acc[-1])
            flucts.append(np.diff(acc[-10:]).std(ddof=1))
        expect[dist] = (np.mean(finals), np.std(finals, ddof=1), np.mean(flucts))
    write_run(tmp_path / "div", "scalar", 9, [50.0, 11.0], status="diverged")
    runs = [aggregate.load_run(p) for p in aggregate.find_runs([tmp_path])]
    table = stability.stability_cells(aggregate.cells(runs), last=10)
    for dist, (m, s, f) in expect.items():
        (c,) = table[("mnist", dist, 0.25)]
        assert c["mean"] == pytest.approx(m) and c["std"] == pytest.approx(s) and c["fluct"] == pytest.approx(f)
    (c,) = table[("mnist", "scalar", 0.25)]
    assert c["diverged"] == 1 and c["n"] == 3 and c["unfinished"] == 0
    assert table[("mnist", "lognormal", 0.25)][0]["diverged"] == 0
    text = stability.format_table1(table)
    assert f"**{expect['lognormal'][0]:.2f} ± {expect['lognormal'][1]:.2f}**" in text
    assert "paper 98.44 ± 0.03" in text and "1 diverged" in text
