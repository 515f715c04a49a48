"""EP-vs-BPTT alignment tracked through training (`align_every`), and the GDU command."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ep_jax
from ep_jax import alignment
from experiments import alignment_report, engine, gdu
from experiments.config import RunConfig, validate

BASE = dict(
    dataset="synthetic",
    sizes=[12, 10, 4],
    synthetic_train=96,
    synthetic_test=48,
    t_free=12,
    t_nudge=4,
    batch_size=16,
    epochs=2,
    chunk=3,
    lr=[0.2, 0.1],
    eval_batch=48,
)


def cfg(**kw):
    return validate(RunConfig.from_dict({**BASE, **kw}))


def rows(d):
    return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]


def checkpoint_arrays(d):
    from experiments import checkpoint

    meta, sd = checkpoint.decode((d / engine.CHECKPOINT).read_bytes())
    return jax.tree.leaves(sd)


@pytest.mark.parametrize("model", ["ep", "dendritic"])
def test_measuring_does_not_perturb_training(tmp_path, model):
    off = engine.Member(cfg(model=model), "off", tmp_path / "off")
    on = engine.Member(cfg(model=model, align_every=2, align_batch=8), "on", tmp_path / "on")
    engine.run([off], progress=False, print_fn=lambda *a: None)
    engine.run([on], progress=False, print_fn=lambda *a: None)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("time_s", "align_time_s", "alignment")} for r in rs]
    assert strip(rows(tmp_path / "on")) == strip(rows(tmp_path / "off"))
    a, b = checkpoint_arrays(tmp_path / "on"), checkpoint_arrays(tmp_path / "off")
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))  # bit for bit
    recs = [r for row in rows(tmp_path / "on") for r in row["alignment"]]
    steps = [r["step"] for r in recs]
    # step 0, then the first chunk end at or after each multiple of 2 (chunks of 3 steps, 6 steps per epoch)
    assert steps == [0, 3, 6, 9, 12]
    assert (tmp_path / "on" / "alignment.png").is_file()
    assert all(set(r["cosine"]) == set(recs[0]["cosine"]) for r in recs)


def test_first_measurement_of_the_standard_model_in_float64_agrees(tmp_path):
    c = cfg(
        model="ep",
        activation="sigmoid",
        beta=0.005,
        t_free=150,
        t_nudge=20,
        float64=True,
        epochs=1,
        align_every=50,
        align_batch=16,
    )
    engine.run([engine.Member(c, "ep64", tmp_path)], progress=False, print_fn=lambda *a: None)
    first = rows(tmp_path)[0]["alignment"][0]
    assert first["step"] == 0
    assert min(first["cosine"].values()) > 0.99, first["cosine"]
    assert first["angle"] < 5.0


def test_measure_equals_an_independent_comparison(x64):
    model = ep_jax.build_model("dendritic", sizes=(9, 7, 3))
    params, buffers = model.init(jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (6, 9))
    y = jnp.arange(6) % 3
    rx = ep_jax.make_relaxation(model, beta=0.05)
    est = ep_jax.Estimator("symmetric", 15, 5)
    got = alignment.measure(model, est, params, buffers, x, y, rx)
    g_ep, _ = ep_jax.estimate(model, est, None, params, buffers, x, y, rx)
    g_bp, _ = ep_jax.estimate(model, ep_jax.Estimator("bptt", 15, 5), None, params, buffers, x, y, rx)
    ref = alignment.compare(g_ep, g_bp)
    for name, c, r, s in zip(alignment.leaf_names(params), got.cosine, got.rel_rmse, got.sign_agree):
        assert float(c) == pytest.approx(ref[name]["cosine"], abs=1e-12)
        assert float(r) == pytest.approx(ref[name]["rel_rmse"], rel=1e-10)
        assert float(s) == pytest.approx(1 - ref[name]["sign_err"], abs=1e-12)
    assert float(got.angle) == pytest.approx(alignment.angle(g_ep, g_bp), abs=1e-8)


def test_sweep_members_each_measure_their_own_alignment_for_every_estimator(tmp_path):
    members = []
    for model in ("ep", "dendritic"):
        for est in ("symmetric", "one_sided", "chl", "bptt"):
            c = cfg(
                model=model,
                estimator=est,
                epochs=1,
                align_every=3,
                align_batch=8,
                nudge="random_sign" if est == "one_sided" else "fixed",
            )
            members.append(engine.Member(c, f"{model}-{est}", tmp_path / f"{model}-{est}"))
    members.append(
        engine.Member(
            cfg(model="ep", estimator="symmetric", epochs=1, align_every=3, align_batch=8, seed=1),
            "ep-symmetric-seed1",
            tmp_path / "ep-symmetric-seed1",
        )
    )
    summaries = engine.run(members, progress=False, print_fn=lambda *a: None)
    assert all(s["status"] == "ok" for s in summaries)
    first = {m.name: rows(m.dir)[0]["alignment"][0] for m in members}
    assert all(len(rows(m.dir)[0]["alignment"]) == 3 for m in members)  # steps 0, 3, 6
    assert all(v == 1.0 for v in first["ep-bptt"]["cosine"].values())  # BPTT against itself
    assert first["ep-symmetric"]["cosine"] != first["ep-symmetric-seed1"]["cosine"]  # own params, own numbers
    assert first["dendritic-chl"]["cosine"] != first["dendritic-symmetric"]["cosine"]
    text = alignment_report.report([tmp_path], None)
    assert "angle (°)" in text and "measuring every 3 steps" in text


def test_gdu_command_draws_the_figure(tmp_path):
    run = tmp_path / "run"
    engine.run([engine.Member(cfg(model="ep", epochs=1), "run", run)], progress=False, print_fn=lambda *a: None)
    assert gdu.main(["--run", str(run), "--float64", "--batch", "8", "--out", str(tmp_path / "g")]) is None
    data = json.loads((tmp_path / "g" / "gdu.json").read_text())
    assert (tmp_path / "g" / "gdu.png").is_file()
    curves = data["per_k"]["[0]['w']"]
    assert len(curves["rel_rmse"]) == 4 and len(curves["cosine"]) == 4
