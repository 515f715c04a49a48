"""The figures, drawn from small data: the PNG is written, epoch and k axes have integer
ticks only, a one-epoch curve is a visible marker, legends and y-labels are there, and
the HTS histogram titles what it draws."""

import json

import jax
import numpy as np
import pytest
from exp_helpers import run_cli, tiny

import ep_jax
from ep_jax.experiments import figures
from experiments import aggregate, engine, gdu, hidden_states, plot_dt_hist

PNG = b"\x89PNG\r\n\x1a\n"


def visible_ticks(ax, axis="x"):
    ax.figure.canvas.draw()
    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    ticks = ax.get_xticks() if axis == "x" else ax.get_yticks()
    return [t for t in ticks if min(lo, hi) <= t <= max(lo, hi)]


def assert_integer_ticks(ax, axis="x"):
    ticks = visible_ticks(ax, axis)
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def history(n):
    return [
        {
            "epoch": i + 1,
            "train_acc": 50.0 + i,
            "loss": 0.1,
            "test_acc": 55.0 + i,
            "test_loss": 0.1,
            "time_s": 1.0,
            "steps": 6 * (i + 1),
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_learning_curve_integer_epochs_and_markers(tmp_path, n):
    fig = figures.learning_curve_figure(history(n), "t")
    (ax,) = fig.axes
    assert_integer_ticks(ax)
    assert all(l.get_marker() not in (None, "", "None") for l in ax.get_lines())
    assert ax.get_legend() is not None and ax.get_ylabel()
    figures.pyplot().close(fig)
    figures.learning_curve(tmp_path, history(n), "t")
    assert (tmp_path / "learning_curve.png").read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learning_curve.png"]  # no temporary left


def write_run(d, seed, accs):
    cfg = tiny(seed=seed)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg.to_json()))
    rows = history(len(accs))
    for r, a in zip(rows, accs):
        r["test_acc"] = a
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps(engine.summarize(rows, "ok")))


@pytest.mark.parametrize("epochs", [1, 2])
def test_aggregate_plot_one_epoch_is_a_visible_point(tmp_path, epochs):
    for s in (0, 1):
        write_run(tmp_path / "runs" / f"s{s}", s, [60.0 + s + e for e in range(epochs)])
    cs = aggregate.cells(aggregate.load_runs([tmp_path / "runs"]))
    fig = aggregate.plot_figure(cs)
    ax = fig.axes[0]
    (mean,) = [l for l in ax.get_lines() if l.get_label() == "mean"]
    assert len(mean.get_xdata()) == epochs and mean.get_marker() not in (None, "", "None")
    x0, x1 = ax.get_xlim()
    assert x0 < 1 <= epochs < x1  # the point is inside the frame, not on it
    assert_integer_ticks(ax)
    assert ax.get_legend() is not None and ax.get_ylabel() == "test accuracy (%)"
    figures.pyplot().close(fig)
    aggregate.plot(cs, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG


def test_dt_hist_titles_what_is_drawn_and_has_a_legend(tmp_path):
    samples = plot_dt_hist.sample(256, 0, {"mean": None, "std": None, "dt_min": None, "dt_max": None})
    fig = plot_dt_hist.figure(samples, 256)
    axes = dict(zip(samples, fig.axes))
    spec, dt = samples["scalar"]
    assert float(np.std(dt)) == 0.0
    title = axes["scalar"].get_title()
    assert "σ" not in title and f"dt = {spec.mean:g}" in title, title
    assert "σ=" in axes["lognormal"].get_title()
    for dist, ax in axes.items():
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any("dt_max" in t for t in texts) and any("dt_min" in t for t in texts), (dist, texts)
    assert fig.axes[0].get_ylabel() == "neurons (of 256)"
    figures.pyplot().close(fig)
    rc, out, err = run_cli(plot_dt_hist.main, ["--n", "64", "--out", tmp_path / "o"])
    assert rc == 0, err
    assert (tmp_path / "o" / "dt_hist.png").read_bytes()[:8] == PNG


def test_gdu_panels_have_ylabels_and_integer_k(tmp_path):
    model = ep_jax.build_model("ep", sizes=(6, 5, 3), activation="sigmoid")
    rx = ep_jax.make_relaxation(model, beta=0.05, dt=1.0)
    params, buffers = model.init(jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (8, 6))
    y = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, 3)
    res = ep_jax.alignment.gdu(model, ep_jax.Estimator("symmetric", 10, 3), params, buffers, x, y, rx)
    table = ep_jax.alignment.gdu_table(res)
    fig = gdu.plot_figure(res, res.names, table, "t")
    used = [ax for ax in fig.axes if ax.axison]
    assert len(used) == len(res.names) + 1
    for ax in used:
        assert ax.get_ylabel(), ax.get_title()
        assert_integer_ticks(ax)
    figures.pyplot().close(fig)
    gdu.plot(res, res.names, table, "t", tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG


def test_hidden_states_figure_integer_steps(tmp_path):
    layer = {"mean_abs": [0.1, 0.2, 0.3], "frac_active": [0.5, 0.6, 0.7]}
    results = {"EP": {"layers": [layer, layer]}, "DEP": {"layers": [layer, layer]}}
    fig = hidden_states.plot_figure(results)
    for ax in fig.axes:
        assert_integer_ticks(ax)
        assert ax.get_ylabel() and ax.get_legend() is not None
    figures.pyplot().close(fig)
    hidden_states.plot(results, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == PNG
