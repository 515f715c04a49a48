"""The validating readers (`experiments.files`), config extremes and the memory check,
and the analysis commands' refusals: every damaged file or bad value is one `error:` line
naming the file (and line or field), never a traceback, never a silent default."""

import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from exp_helpers import TINY, assert_one_line_error, run_cli, snapshot, tiny, tiny_args

import ep_jax
from ep_jax.experiments import files
from ep_jax.experiments.errors import RunError
from experiments import aggregate, engine, hidden_states, stability, train
from experiments import checkpoint as ckpt
from experiments.config import (
    INT32_MAX,
    MAX_STEPS,
    ConfigError,
    RunConfig,
    check_memory,
    estimate_memory,
    memory_breakdown,
    validate,
    warnings_for,
)

QUIET = dict(progress=False, print_fn=lambda *a: None)


def write_run(d: Path, seed=0, accs=(60.0, 70.0), status="ok", **changes) -> Path:
    """A run folder as the engine writes it (config.json of every field, metrics, summary)."""
    cfg = tiny(seed=seed, **changes)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg.to_json(), indent=1))
    rows = [
        {
            "epoch": i + 1,
            "train_acc": a - 1,
            "loss": 0.1,
            "test_acc": a,
            "test_loss": 0.2,
            "time_s": 1.0,
            "steps": 6 * (i + 1),
        }
        for i, a in enumerate(accs)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps(engine.summarize(rows, status)))
    return d


def edit_json(path: Path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


DEEP = "[" * 100_000 + "]" * 100_000


# --- read_json ---------------------------------------------------------------------------


def test_read_json_missing_none_or_error(tmp_path):
    assert files.read_json(tmp_path / "nope.json") is None
    with pytest.raises(RunError, match="nope.json: missing"):
        files.read_json(tmp_path / "nope.json", required=True)
    (tmp_path / "a.json").write_text('{"x": 1}')
    assert files.read_json(tmp_path / "a.json") == {"x": 1}


@pytest.mark.parametrize(
    "data,needle",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (DEEP.encode(), "nested too deep"),
        (b"[1, 2]", "expected a table"),
        (b'"text"', "expected a table"),
        (("1" * 5000).encode(), "not readable JSON"),
    ],
)
def test_read_json_damage_is_one_error_naming_the_file(tmp_path, data, needle):
    p = tmp_path / "x.json"
    p.write_bytes(data)
    with pytest.raises(RunError) as e:
        files.read_json(p, "table")
    msg = str(e.value)
    assert str(p) in msg and needle in msg and "\n" not in msg and len(msg) < 400


def test_read_json_of_a_folder(tmp_path):
    (tmp_path / "d.json").mkdir()
    with pytest.raises(RunError, match="is a folder"):
        files.read_json(tmp_path / "d.json")


def test_read_json_kinds(tmp_path):
    p = tmp_path / "l.json"
    p.write_text("[1]")
    assert files.read_json(p, "list") == [1] and files.read_json(p, "any") == [1]
    with pytest.raises(ValueError, match="kind"):
        files.read_json(p, "tuple")


# --- read_config ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,needles",
    [
        ({"epochs": 10**400}, ["epochs", "401 digits"]),
        ({"seed": 10**400}, ["seed"]),
        ({"beta": 10**400}, ["beta", "float range"]),
        ({"beta": float("nan")}, ["beta", "finite"]),
        ({"lr": -1}, ["lr", ">= 0"]),
        ({"dt": 5}, ["dt", "(0, 1]"]),
        ({"t_free": 2**31}, ["t_free", f"<= {MAX_STEPS}"]),
        ({"sizes": [16, 10**400, 4]}, ["sizes"]),
        ({"bogus": 1}, ["unknown config field", "bogus"]),
    ],
)
def test_read_config_refuses_bad_values_naming_file_and_field(tmp_path, changes, needles):
    d = write_run(tmp_path / "r")
    edit_json(d / "config.json", **changes)
    with pytest.raises(ConfigError) as e:
        files.read_config(d)
    msg = str(e.value)
    assert msg.startswith(f"{d}/config.json: ") and "\n" not in msg and len(msg) < 500, msg
    for n in needles:
        assert n in msg, (n, msg)


def test_read_config_missing_field_is_damage(tmp_path):
    d = write_run(tmp_path / "r")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["beta"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"missing config field\(s\) \['beta'\]"):
        files.read_config(d)


def test_read_config_round_trip_and_no_folder(tmp_path):
    d = write_run(tmp_path / "r", seed=3)
    assert files.read_config(d) == tiny(seed=3)
    with pytest.raises(RunError, match="no config.json"):
        files.read_config(tmp_path)
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "config.json").write_text(DEEP)
    with pytest.raises(RunError, match="nested too deep"):
        files.read_config(tmp_path / "deep")


# --- read_summary / read_metrics -----------------------------------------------------------


def test_read_summary_accepts_what_the_engine_writes(tmp_path):
    d = write_run(tmp_path / "r")
    s = files.read_summary(d)
    assert s["status"] == "ok" and s["epochs_done"] == 2 and s["final_test_acc"] == 70.0
    (d / "summary.json").write_text(json.dumps(engine.summarize([], "not started")))
    assert files.read_summary(d)["final_test_acc"] is None
    (d / "summary.json").unlink()
    assert files.read_summary(d) is None


@pytest.mark.parametrize(
    "content,needle",
    [
        ("[1, 2]", "expected a table"),
        ('{"status": "ok"}', "missing key(s)"),
        ({"status": "great"}, "status"),
        ({"epochs_done": -1}, "epochs_done"),
        ({"epochs_done": 2.5}, "epochs_done"),
        ({"final_test_acc": "high"}, "final_test_acc"),
        ({"best_test_acc": float("nan")}, "best_test_acc"),
        ({"epochs_done": 0}, "epochs_done = 0 but final_test_acc"),
    ],
)
def test_read_summary_refuses_damage(tmp_path, content, needle):
    d = write_run(tmp_path / "r")
    if isinstance(content, str):  # the whole file
        (d / "summary.json").write_text(content)
    else:  # some keys of a good summary
        edit_json(d / "summary.json", **content)
    with pytest.raises(RunError) as e:
        files.read_summary(d)
    assert str(e.value).startswith(f"{d}/summary.json: ") and needle in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "line,needle",
    [
        ("[1, 2]", "expected a table"),
        ('{"epoch": 2, "train_acc": 1}', "missing column(s)"),
        ("{nope", "not valid JSON"),
        (
            '{"epoch": 1, "train_acc": 1, "loss": 0, "test_acc": 1, "test_loss": 0, "time_s": 1, "steps": 6}',
            "epochs must increase",
        ),
        (
            '{"epoch": 2, "train_acc": 1, "loss": 0, "test_acc": 101, "test_loss": 0, "time_s": 1, "steps": 6}',
            "test_acc",
        ),
        (
            '{"epoch": 2, "train_acc": 1, "loss": 0, "test_acc": 1, "test_loss": 0, "time_s": 1, "steps": 6, '
            '"alignment": [{"step": 0}]}',
            "alignment record 1",
        ),
    ],
)
def test_read_metrics_names_the_bad_line(tmp_path, line, needle):
    d = write_run(tmp_path / "r", accs=(60.0,))
    with open(d / "metrics.jsonl", "a") as f:
        f.write("\n" + line + "\n")  # line 1: good; 2: blank (skipped); 3: bad
    with pytest.raises(RunError) as e:
        files.read_metrics(d)
    assert str(e.value).startswith(f"{d}/metrics.jsonl: line 3") and needle in str(e.value), str(e.value)


def test_read_metrics_good_and_missing(tmp_path):
    d = write_run(tmp_path / "r", accs=(60.0, 65.0, 70.0))
    assert [r["test_acc"] for r in files.read_metrics(d)] == [60.0, 65.0, 70.0]
    (d / "metrics.jsonl").unlink()
    assert files.read_metrics(d) == []


def test_checkpoint_epoch():
    assert files.checkpoint_epoch({"epoch": 3}, "c") == 3
    for meta in ({}, {"epoch": -1}, {"epoch": "3"}, {"epoch": True}, []):
        with pytest.raises(ckpt.CheckpointError, match="c: damaged checkpoint metadata"):
            files.checkpoint_epoch(meta, "c")


# --- aggregate and stability on damaged folders ----------------------------------------------


def _summary_list(d):
    (d / "summary.json").write_text("[]")


def _summary_no_keys(d):
    (d / "summary.json").write_text('{"status": "ok"}')


def _metrics_no_test_acc(d):
    (d / "metrics.jsonl").write_text(
        '{"epoch": 1, "train_acc": 50, "loss": 0.1, "test_loss": 0.1, "time_s": 1, "steps": 6}\n'
    )


def _metrics_list(d):
    (d / "metrics.jsonl").write_text("[1, 2, 3]\n")


def _config_field(**kw):
    return lambda d: edit_json(d / "config.json", **kw)


def _config_missing(d):
    cfg = json.loads((d / "config.json").read_text())
    del cfg["lr"]
    (d / "config.json").write_text(json.dumps(cfg))


def _config_deep(d):
    (d / "config.json").write_text(DEEP)


DAMAGE = {
    "summary-list": (_summary_list, "summary.json"),
    "summary-no-keys": (_summary_no_keys, "summary.json"),
    "metrics-no-test_acc": (_metrics_no_test_acc, "metrics.jsonl: line 1"),
    "metrics-list": (_metrics_list, "metrics.jsonl: line 1"),
    "beta-nan": (_config_field(beta=float("nan")), "config.json: beta"),
    "lr-negative": (_config_field(lr=-1), "config.json: lr"),
    "dt-5": (_config_field(dt=5), "config.json: dt"),
    "epochs-10^400": (_config_field(epochs=10**400), "config.json: epochs"),
    "lr-missing": (_config_missing, "config.json: missing config field(s) ['lr']"),
    "config-deep": (_config_deep, "config.json: JSON nested too deep"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_aggregate_refuses_damaged_run_folders_and_writes_nothing(tmp_path, damage):
    write_run(tmp_path / "runs" / "good")
    bad = write_run(tmp_path / "runs" / "bad", seed=1)
    fn, needle = DAMAGE[damage]
    fn(bad)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "t.md").write_text("old table")
    before = snapshot(tmp_path)
    rc, out, err = run_cli(
        aggregate.main, [tmp_path / "runs", "--out", tmp_path / "out" / "t.md", "--plot", tmp_path / "out" / "t.png"]
    )
    assert_one_line_error(rc, err, str(bad), needle)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["summary-list", "summary-no-keys", "metrics-list"])
def test_stability_refuses_damaged_run_folders(tmp_path, damage):
    bad = write_run(tmp_path / "bad")
    fn, needle = DAMAGE[damage]
    fn(bad)
    rc, out, err = run_cli(stability.main, [tmp_path])
    assert_one_line_error(rc, err, str(bad), needle)


def test_stability_refuses_last_below_three(tmp_path):
    write_run(tmp_path / "r")
    rc, out, err = run_cli(stability.main, [tmp_path, "--last", "0"])
    assert_one_line_error(rc, err, "--last must be >= 3")


def test_aggregate_outputs_are_whole_and_leave_no_temporary_files(tmp_path):
    write_run(tmp_path / "runs" / "a", seed=0, accs=(55.0,))
    write_run(tmp_path / "runs" / "b", seed=1, accs=(65.0,))
    out = tmp_path / "out"
    rc, text, err = run_cli(aggregate.main, [tmp_path / "runs", "--out", out / "t.md", "--plot", out / "t.png"])
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".ep_jax-files.json", "t.md", "t.png"]
    assert (out / "t.md").read_text().strip() in text and "60.00 ± 7.07" in text
    assert (out / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aggregate_plot_refuses_runs_without_an_epoch(tmp_path):
    write_run(tmp_path / "runs" / "a", accs=(), status="interrupted")
    rc, out, err = run_cli(aggregate.main, [tmp_path / "runs", "--plot", tmp_path / "t.png"])
    assert_one_line_error(rc, err, "--plot: no run has a finished epoch")
    assert not (tmp_path / "t.png").exists()


# --- config extremes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"epochs": 10**400}, "epochs: must be <= 2147483647, got an integer of 401 digits"),
        ({"seed": 10**400}, "seed: must be <= 4294967295"),
        ({"t_free": 2**31}, f"t_free: must be <= {MAX_STEPS}"),
        ({"t_nudge": 2**31}, f"t_nudge: must be <= {MAX_STEPS}"),
        ({"chunk": 2**31}, "chunk: must be <= 2147483647"),
        ({"eval_batch": 2**40}, "eval_batch: must be <="),
        ({"sizes": [16, 2**31, 4]}, "sizes: widths must be <="),
        ({"epochs": INT32_MAX}, "int32 step counter"),  # 6 steps per epoch: too many steps
        ({"subset": 10**400}, "subset"),
    ],
)
def test_validate_refuses_integers_beyond_int32_counters(changes, needle):
    with pytest.raises(ConfigError) as e:
        validate(RunConfig.from_dict({**TINY, **changes}))
    assert needle in str(e.value) and len(str(e.value)) < 400, str(e.value)


def test_epoch_bound_is_steps_times_epochs():
    ok = INT32_MAX // 6
    assert validate(RunConfig.from_dict({**TINY, "epochs": ok})).epochs == ok
    with pytest.raises(ConfigError, match=f"at most {ok} epochs"):
        validate(RunConfig.from_dict({**TINY, "epochs": ok + 1}))


def test_train_refuses_huge_epochs_in_one_line_and_creates_nothing(tmp_path):
    rc, out, err = run_cli(train.main, tiny_args(epochs=10**400) + ["--out", tmp_path / "r"])
    assert_one_line_error(rc, err, "epochs")
    assert not (tmp_path / "r").exists()


def test_deeply_nested_set_value_is_one_line():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({**TINY, "sizes": json.loads("[" * 500 + "]" * 500)})
    assert "sizes: expected a list of integer widths" in str(e.value) and len(str(e.value)) < 200


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"beta": 1e30}, "> 10"),
        ({"beta": -1e30}, "> 10"),
        ({"beta": 1e-30}, "< 1e-6"),
        ({"dt": 1e-30}, "barely moves"),
        ({"dt": [1.0, 1e-5]}, "barely moves"),
    ],
)
def test_warnings_for_extreme_beta_and_dt(changes, needle):
    assert warnings_for(tiny()) == []
    ws = warnings_for(tiny(**changes))
    assert len(ws) == 1 and needle in ws[0], ws


def test_no_beta_warning_for_bptt():
    assert warnings_for(tiny(estimator="bptt", beta=1e-30)) == []


# --- memory -------------------------------------------------------------------------------------


def test_memory_parameters_part_matches_the_model():
    """The parameters-and-masks part is exact: params, masks and masked kernels of a real model."""
    for changes in ({}, {"model": "ep"}, {"sizes": [16, 12, 8, 4], "lr": [0.1, 0.1, 0.1], "basal_branches": 3}):
        cfg = tiny(**changes)
        kw = {} if cfg.model == "ep" else {"basal_branches": cfg.basal_branches}
        params, buffers = ep_jax.build_model(cfg.model, sizes=tuple(cfg.sizes), **kw).init(jax.random.PRNGKey(0))
        p = sum(np.asarray(v).size for v in jax.tree.leaves(params))
        masks = sum(np.asarray(v).size for v in jax.tree.leaves(buffers.get("masks", {})))
        assert memory_breakdown(cfg)["parameters and masks"] == 4 * (p + 2 * masks), changes
        assert memory_breakdown(cfg)["optimiser state"] == 4 * p
    cfg = tiny()
    assert estimate_memory(cfg.replace(float64=True)) > estimate_memory(cfg)
    assert estimate_memory(cfg, members=4) > 3 * (estimate_memory(cfg) - memory_breakdown(cfg)["dataset"])


def test_check_memory_refuses_a_width_that_cannot_fit():
    huge = tiny(sizes=[4096, 2**24, 4])
    need = estimate_memory(huge)
    assert need > 2**40  # a TiB: more than any machine here
    with pytest.raises(ConfigError) as e:
        check_memory(huge)  # the physical memory of this machine
    msg = str(e.value)
    assert "the run needs about" in msg and "TiB" in msg and "physical memory" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"more than the 1\.0 GiB available \(given\)"):
        check_memory(huge, available=2**30)


def test_check_memory_passes_what_fits():
    cfg = tiny(sizes=[16, 512, 4])
    need = estimate_memory(cfg)
    assert check_memory(cfg) == need
    assert check_memory(cfg, available=need) == need
    with pytest.raises(ConfigError):
        check_memory(cfg, available=need - 1)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["symmetric", "bptt_full"])
def test_memory_estimate_within_2x_of_xla(estimator):
    """The training part of the estimate against XLA's own memory analysis of the compiled
    training step (arguments + outputs + temporaries)."""
    import jax.numpy as jnp

    from ep_jax import sweep as S

    cfg = tiny(
        sizes=[64, 1024, 10], synthetic_train=256, estimator=estimator, t_free=20, t_nudge=4, batch_size=64, chunk=1
    )
    g = engine.Group([engine.Member(cfg, "m", Path("m"))])
    state, rx = g.initial()
    n = cfg.n_train()
    x, y = jnp.zeros((n, cfg.sizes[0])), jnp.zeros((n,), jnp.int32)
    idx = jnp.zeros((1, 1, cfg.batch_size), jnp.int32)
    m = S.sweep_steps_jit.lower(g.model, g.est, g.opt, state, x, y, idx, rx, jnp.asarray(1e4)).compile()
    m = m.memory_analysis()
    xla = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    parts = memory_breakdown(cfg)
    ours = sum(v for k, v in parts.items() if k not in ("evaluation", "dataset")) + n * cfg.sizes[0] * 4
    assert xla / 2 <= ours <= 2 * xla, (ours, xla)


# --- hidden_states -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TINY run folder of each model holding its initial checkpoint (epoch 0: the time
    budget stops the run before its first epoch, so no training step is compiled)."""
    root = tmp_path_factory.mktemp("trained")
    for name, model in (("ep", "ep"), ("dep", "dendritic")):
        with pytest.raises(engine.Interrupted):
            engine.run(
                [engine.Member(tiny(model=model, epochs=1), name, root / name)],
                "new",
                deadline=time.time() - 1,
                **QUIET,
            )
    return root


@pytest.fixture
def runs(trained, tmp_path):
    for name in ("ep", "dep"):
        shutil.copytree(trained / name, tmp_path / name)
    return tmp_path / "ep", tmp_path / "dep"


def rewrite_checkpoint(run_dir: Path, meta_fn=None, nan=False):
    """Re-pack a run's checkpoint with its metadata changed by `meta_fn` and/or the first
    parameter array set to NaN (arrays as stored: masks stay packed)."""
    path = run_dir / "checkpoint.msgpack"
    meta, sd = ckpt.decode(path.read_bytes())
    if meta_fn:
        meta = meta_fn(meta)
    if nan:
        flat = jax.tree_util.tree_flatten_with_path(sd)[0]
        keypath = next(p for p, v in flat if "['params']" in jax.tree_util.keystr(p))
        node = sd
        for k in keypath[:-1]:
            node = node[k.key]
        node[keypath[-1].key] = np.full_like(node[keypath[-1].key], np.nan)
    path.write_bytes(ckpt.encode(sd, meta, packed=True))


def hs(ep, dep, out, *extra):
    return run_cli(hidden_states.main, ["--ep", ep, "--dep", dep, "--out", out, *extra])


@pytest.fixture
def config_runs(tmp_path):
    """Run folders without checkpoints: the refusals below come before any checkpoint is read."""
    return write_run(tmp_path / "ep", model="ep"), write_run(tmp_path / "dep")


@pytest.mark.parametrize(
    "n,needle", [("0", "--examples must be >= 1"), ("-3", "--examples must be >= 1"), ("65", "has only 64 test images")]
)
def test_hidden_states_refuses_example_counts(config_runs, tmp_path, n, needle):
    ep, dep = config_runs
    rc, out, err = hs(ep, dep, tmp_path / "o", "--examples", n)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "o").exists()


def test_hidden_states_refuses_swapped_runs(config_runs, tmp_path):
    ep, dep = config_runs
    rc, out, err = hs(dep, ep, tmp_path / "o", "--examples", "8")
    assert_one_line_error(rc, err, f"--ep {dep}", "model='dendritic'", "--ep needs a standard-model run")
    assert not (tmp_path / "o").exists()
    rc, out, err = hs(ep, ep, tmp_path / "o", "--examples", "8")
    assert_one_line_error(rc, err, f"--dep {ep}", "--dep needs a dendritic run")


@pytest.mark.slow  # trains nothing, but restores and relaxes real checkpoints
def test_hidden_states_refuses_a_nan_checkpoint(runs, tmp_path):
    ep, dep = runs
    rewrite_checkpoint(dep, nan=True)
    rc, out, err = hs(ep, dep, tmp_path / "o", "--examples", "8")
    assert_one_line_error(rc, err, f"{dep}/checkpoint.msgpack", "non-finite parameters")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # trains nothing, but restores and relaxes real checkpoints
def test_hidden_states_refuses_meta_without_epoch(runs, tmp_path):
    ep, dep = runs
    rewrite_checkpoint(ep, meta_fn=lambda m: {k: v for k, v in m.items() if k != "epoch"})
    rc, out, err = hs(ep, dep, tmp_path / "o", "--examples", "8")
    assert_one_line_error(rc, err, f"{ep}/checkpoint.msgpack", "epoch")


@pytest.mark.slow  # trains nothing, but restores and relaxes real checkpoints
def test_hidden_states_good_runs_finite_statistics(runs, tmp_path):
    ep, dep = runs
    rc, out, err = hs(ep, dep, tmp_path / "o", "--examples", "64")
    assert rc == 0, err
    res = json.loads((tmp_path / "o" / "hidden_states.json").read_text())
    assert res["EP"]["epoch"] == 0 and res["EP"]["model"] == "ep" and res["DEP"]["model"] == "dendritic"
    assert all(np.isfinite(v).all() for r in res.values() for st in r["layers"] for v in st.values())
    assert "nan" not in out.lower()
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        ".ep_jax-files.json",
        "hidden_states.json",
        "hidden_states.png",
    ]


def test_hidden_states_docstring_names_the_folders_train_creates():
    doc = hidden_states.__doc__
    for preset in ("mnist-ep", "mnist-dep"):
        assert f"train --preset {preset}" in doc and f"runs/{preset}-seed0" in doc


@pytest.mark.slow  # trains nothing, but restores real checkpoints
def test_hidden_states_refuses_a_config_edited_after_the_run(runs, tmp_path):
    """A setting that the checkpoint's arrays do not show (the evaluation batch) edited in
    config.json: the checkpoint's config digest still tells (issue 29)."""
    ep, dep = runs
    cfg = json.loads((dep / "config.json").read_text())
    cfg["eval_batch"] = cfg["eval_batch"] // 2
    (dep / "config.json").write_text(json.dumps(cfg))
    rc, out, err = hs(ep, dep, tmp_path / "o", "--examples", "8")
    assert_one_line_error(rc, err, f"{dep}/config.json", "does not match the run's checkpoint")
    assert not (tmp_path / "o").exists()
