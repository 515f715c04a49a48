"""A hostile user's round on the output side (issue 29): `--overwrite` removes only what
ep_jax wrote (its manifest, `.ep_jax-files.json`), output files never replace a user's,
a refused optional logger leaves no run folder behind, and the refusals say what is wrong.

Every refusal here comes before any data is loaded or any step trained, so nothing trains
except `test_overwrite_of_a_real_run_removes_exactly_what_it_wrote`."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from exp_helpers import TINY, assert_one_line_error, run_cli, snapshot, tiny, tiny_args

from ep_jax.experiments import aggregate, engine, plot_dt_hist, reproduce, runfolder, stability, train
from ep_jax.experiments import checkpoint as ckpt
from ep_jax.experiments import sweep as sweep_cmd
from ep_jax.experiments.config import RunConfig, warnings_for
from ep_jax.experiments.errors import RunError, SpecError

QUIET = dict(progress=False, print_fn=lambda *a: None)


@pytest.fixture
def no_data(monkeypatch):
    """Loading data is not needed for any refusal below."""
    monkeypatch.setattr(engine, "load_data", lambda cfg: (_ for _ in ()).throw(AssertionError("data loaded")))


def fake_run(d: Path, cfg=None, manifest: bool = False) -> Path:
    """A finished run folder as far as `--overwrite` can tell: config.json and summary.json
    (with `manifest`, as a run since manifests writes it)."""
    cfg = cfg or tiny()
    d.mkdir(parents=True, exist_ok=True)
    if manifest:
        runfolder.record(d, runfolder.RUN_FILES)
    (d / "config.json").write_text(json.dumps(cfg.to_json()))
    (d / "summary.json").write_text(json.dumps({"status": "ok"}))
    return d


# --- 1. --overwrite removes only what ep_jax wrote -------------------------------------------------


@pytest.mark.parametrize("manifest", [False, True], ids=["old-folder", "manifest"])
@pytest.mark.parametrize("stray", ["notes.txt", "analysis/plot.py", "link"])
def test_overwrite_refuses_a_run_folder_holding_a_users_file(tmp_path, no_data, stray, manifest):
    d = fake_run(tmp_path / "run", manifest=manifest)
    (tmp_path / "outside.txt").write_text("the link's target")
    if stray == "link":
        os.symlink(tmp_path / "outside.txt", d / "link")
    else:
        (d / stray).parent.mkdir(parents=True, exist_ok=True)
        (d / stray).write_text("mine")
    before = snapshot(tmp_path)
    rc, _, err = run_cli(train.main, tiny_args() + ["--overwrite", "--out", d])
    assert_one_line_error(rc, err, str(d), repr(stray.split("/")[0]), "did not write")
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_home_folder_with_a_copied_runs_files(tmp_path, no_data):
    home = fake_run(tmp_path / "home")
    (home / "Documents").mkdir()
    (home / "Documents" / "thesis.tex").write_text("\\documentclass{article}")
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_ed25519").write_text("secret")
    before = snapshot(tmp_path)
    rc, _, err = run_cli(train.main, tiny_args() + ["--overwrite", "--out", home])
    assert_one_line_error(rc, err, str(home), "'.ssh'", "did not write")
    assert snapshot(tmp_path) == before


def test_a_link_named_like_a_run_file_is_not_removed(tmp_path, no_data):
    d = fake_run(tmp_path / "run")
    (tmp_path / "precious.png").write_bytes(b"not ours")
    os.symlink(tmp_path / "precious.png", d / "learning_curve.png")
    before = snapshot(tmp_path)
    with pytest.raises(RunError, match="'learning_curve.png', which ep_jax did not write"):
        engine.run([engine.Member(tiny(), "run", d)], "overwrite", **QUIET)
    assert snapshot(tmp_path) == before


def test_a_tensorboard_folder_holding_more_than_event_files_is_refused(tmp_path, no_data):
    d = fake_run(tmp_path / "run")
    (d / "tensorboard").mkdir()
    (d / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"x")
    (d / "tensorboard" / "my_notes.md").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(RunError, match="tensorboard/my_notes.md"):
        runfolder.RunFolder(d).check_replaceable()
    with pytest.raises(RunError, match="tensorboard/my_notes.md"):
        runfolder.RunFolder(d).clear()
    assert snapshot(tmp_path) == before


def test_clear_removes_exactly_the_manifests_entries(tmp_path):
    d = fake_run(tmp_path / "run", manifest=True)
    runfolder.record(d, folders=["tensorboard"])
    (d / "tensorboard").mkdir()
    (d / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"x")
    (d / ".checkpoint.msgpack.abc123.tmp").write_bytes(b"left by a killed write")
    runfolder.RunFolder(d).clear()
    assert sorted(p.name for p in d.iterdir()) == []
    # an old run folder (no manifest): its known names only
    d2 = fake_run(tmp_path / "old")
    (d2 / "metrics.jsonl").write_text("")
    runfolder.RunFolder(d2).clear()
    assert list(d2.iterdir()) == []


def test_a_sweeps_overwrite_refuses_a_member_folder_holding_a_users_file(tmp_path, no_data):
    out = tmp_path / "sw"
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"name": "s", "base": TINY, "grid": {"seed": [0, 1]}}))
    fake_run(out / "seed=1", tiny(seed=1))
    (out / "seed=1" / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    rc, _, err = run_cli(sweep_cmd.main, [spec, "--out", out, "--overwrite", "--no-progress"])
    assert_one_line_error(rc, err, str(out / "seed=1"), "'notes.txt'", "did not write")
    assert snapshot(tmp_path) == before


def test_overwrite_of_a_real_run_removes_exactly_what_it_wrote(tmp_path):
    d = tmp_path / "run"
    engine.run([engine.Member(tiny(epochs=1), "run", d)], "new", **QUIET)
    listed = json.loads((d / runfolder.MANIFEST).read_text())
    assert listed["ep_jax"] == "manifest" and "checkpoint.msgpack" in listed["files"]
    assert {p.name for p in d.iterdir()} <= set(listed["files"]) | {runfolder.MANIFEST}
    (d / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="'notes.txt'"):
        engine.run([engine.Member(tiny(epochs=1, seed=3), "run", d)], "overwrite", **QUIET)
    assert json.loads((d / "config.json").read_text())["seed"] == 0
    (d / "notes.txt").unlink()
    engine.run([engine.Member(tiny(epochs=1, seed=3), "run", d)], "overwrite", **QUIET)
    assert json.loads((d / "config.json").read_text())["seed"] == 3
    # a run folder from before manifests (none in it) still resumes, a user's file kept
    (d / runfolder.MANIFEST).unlink()
    (d / "notes.txt").write_text("mine")
    (s,) = engine.run([engine.Member(tiny(epochs=2, seed=3), "run", d)], "resume", **QUIET)
    assert s["status"] == "ok" and s["epochs_done"] == 2 and (d / "notes.txt").read_text() == "mine"
    assert "config.json" in json.loads((d / runfolder.MANIFEST).read_text())["files"]


# --- 2. output files never replace a user's --------------------------------------------------------


def test_sweep_overwrite_in_the_working_directory_keeps_its_files(tmp_path, monkeypatch, no_data):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"name": "s", "base": TINY}))
    (tmp_path / "results.md").write_text("my results")
    (tmp_path / "sweep.json").write_text('{"mine": true}')
    before = snapshot(tmp_path)
    for out in (".", str(tmp_path)):
        rc, _, err = run_cli(sweep_cmd.main, [spec, "--out", out, "--overwrite", "--no-progress"])
        assert_one_line_error(rc, err, "did not write")
    assert snapshot(tmp_path) == before


def test_sweep_overwrite_of_a_plain_folder_keeps_its_results_md(tmp_path, no_data):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.md").write_text("my results")
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"name": "s", "base": TINY}))
    before = snapshot(tmp_path)
    rc, _, err = run_cli(sweep_cmd.main, [spec, "--out", out, "--overwrite", "--no-progress"])
    assert_one_line_error(rc, err, str(out / "results.md"), "did not write")
    assert snapshot(tmp_path) == before


@pytest.fixture
def reproducing(monkeypatch):
    """Every dataset counts as available; `engine.run` records its calls instead of training."""
    calls = []
    monkeypatch.setattr(reproduce, "available", lambda name, data_dir=None: True)
    monkeypatch.setattr(aggregate, "report", lambda folders: "| the table |\n")

    def fake_run(members, mode="new", **kw):
        calls.append(mode)
        for m in members:
            m.dir.mkdir(parents=True, exist_ok=True)
        return [{"status": "ok"} for _ in members]

    monkeypatch.setattr(engine, "run", fake_run)
    return calls


def rep(*extra):
    return ["table2", "--cells", "mnist-ep", "--seeds", "1", "--no-estimate", "--no-progress", "--smoke"] + [
        str(e) for e in extra
    ]


def test_reproduce_keeps_a_users_results_md(tmp_path, reproducing):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.md").write_text("my results")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        rc, _, err = run_cli(reproduce.main, rep("--out", out, *extra))
        assert_one_line_error(rc, err, str(out / "results.md"), "did not write")
    assert snapshot(tmp_path) == before and reproducing == []
    # its own results.md it writes again
    out2 = tmp_path / "o"
    for _ in range(2):
        rc, _, err = run_cli(reproduce.main, rep("--out", out2))
        assert rc == 0, err
    assert (out2 / "results.md").read_text().startswith("# table2 (smoke)")


def test_reproduce_does_not_wipe_a_run_folder_whose_checkpoint_is_gone(tmp_path, reproducing):
    out = tmp_path / "o"
    ms, _ = reproduce.members(reproduce.parser().parse_args(rep("--out", out)))
    d = fake_run(ms[0].dir, ms[0].cfg)
    (d / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    rc, _, err = run_cli(reproduce.main, rep("--out", out))
    assert_one_line_error(rc, err, str(d), "no checkpoint", "--overwrite")
    assert snapshot(tmp_path) == before and reproducing == []
    rc, _, err = run_cli(reproduce.main, rep("--out", out, "--overwrite"))  # asked: still not the user's file
    assert_one_line_error(rc, err, str(d), "'notes.txt'", "did not write")
    assert snapshot(tmp_path) == before and reproducing == []


def test_reproduce_starts_fresh_cells_as_new_runs(tmp_path, reproducing):
    rc, _, err = run_cli(reproduce.main, rep("--out", tmp_path / "o"))
    assert rc == 0, err
    assert reproducing == ["new"]


@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_aggregate_outputs_keep_a_users_file(tmp_path, monkeypatch, flag):
    monkeypatch.setattr(aggregate, "load_runs", lambda paths: [])
    monkeypatch.setattr(aggregate, "report", lambda paths, runs=None: "| t |\n")
    monkeypatch.setattr(aggregate, "plot_figure", lambda cs: __import__("matplotlib.figure").figure.Figure())
    target = tmp_path / ("t.md" if flag == "--out" else "t.png")
    target.write_text("mine")
    before = snapshot(tmp_path)
    rc, _, err = run_cli(aggregate.main, [tmp_path, flag, target])
    assert_one_line_error(rc, err, str(target), "did not write")
    assert snapshot(tmp_path) == before
    fresh = tmp_path / "sub" / target.name
    for _ in range(2):  # its own output it replaces
        rc, _, err = run_cli(aggregate.main, [tmp_path, flag, fresh])
        assert rc == 0, err
    assert fresh.stat().st_size > 0


def test_stability_out_keeps_a_users_file(tmp_path, monkeypatch):
    monkeypatch.setattr(stability, "report", lambda paths, last=10: "| t |\n")
    target = tmp_path / "t.md"
    target.write_text("mine")
    rc, _, err = run_cli(stability.main, [tmp_path, "--out", target])
    assert_one_line_error(rc, err, str(target), "did not write")
    assert target.read_text() == "mine"


def test_an_analysis_command_keeps_a_users_file_in_its_out_folder(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "dt_hist.png").write_text("mine")
    rc, _, err = run_cli(plot_dt_hist.main, ["--n", "64", "--out", out])
    assert_one_line_error(rc, err, str(out / "dt_hist.png"), "did not write")
    assert (out / "dt_hist.png").read_text() == "mine" and not (out / "dt_hist.json").exists()
    out2 = tmp_path / "o2"
    for _ in range(2):
        rc, _, err = run_cli(plot_dt_hist.main, ["--n", "64", "--out", out2])
        assert rc == 0, err


def test_a_damaged_manifest_is_one_line_and_not_trusted(tmp_path):
    d = tmp_path / "o"
    d.mkdir()
    (d / runfolder.MANIFEST).write_text('{"ep_jax": "manifest", "files": ["../../x"]}')
    with pytest.raises(RunError, match="not an ep_jax manifest"):
        runfolder.claim_outputs(d, ["a.md"])
    before = snapshot(tmp_path)
    for mode in ("new", "overwrite", "resume"):  # refused before any data is read or file written
        with pytest.raises(RunError, match="not an ep_jax manifest"):
            engine.check_folders([engine.Member(tiny(), "o", d)], mode)
    assert snapshot(tmp_path) == before


# --- 3. an optional logger without its library: refused before any folder -----------------------------


def test_log_wandb_without_wandb_leaves_no_run_folder(tmp_path, monkeypatch, no_data):
    import builtins

    real = builtins.__import__

    def without(name, *a, **k):
        if name.split(".")[0] in ("wandb", "tensorboardX"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", without)
    for kind, needle in (
        ("wandb", "pip install 'ep_jax[wandb]'"),
        ("tensorboard", "pip install 'ep_jax[tensorboard]'"),
    ):
        d = tmp_path / kind
        rc, _, err = run_cli(train.main, tiny_args() + ["--out", d, "--log", kind])
        assert_one_line_error(rc, err, f"--log {kind}", needle)
        assert not d.exists()
        rc, _, err = run_cli(train.main, tiny_args() + ["--out", d, "--log", kind])  # and again: the same
        assert_one_line_error(rc, err, f"--log {kind}")


# --- 4. the refusals say what is wrong ----------------------------------------------------------------


def test_a_folder_holding_only_gitkeep_is_not_called_a_run(tmp_path, no_data):
    d = tmp_path / "out"
    d.mkdir()
    (d / ".gitkeep").write_text("")
    rc, _, err = run_cli(train.main, tiny_args() + ["--out", d])
    line = assert_one_line_error(rc, err, str(d), "'.gitkeep'", "not empty")
    assert "already holds a run" not in line


def test_a_data_dir_that_is_a_file_is_called_a_file(tmp_path, no_data):
    f = tmp_path / "passwd"
    f.write_text("root:x:0:0")
    rc, _, err = run_cli(train.main, tiny_args() + ["--data-dir", f, "--out", tmp_path / "r"])
    line = assert_one_line_error(rc, err, str(f), "is a file, not a folder")
    assert "does not exist" not in line and not (tmp_path / "r").exists()


def _checkpoint(d: Path, cfg: RunConfig, run_digest: bool):
    d.mkdir(parents=True, exist_ok=True)
    meta = {"epoch": 0, "digest": cfg.digest(), "name": d.name, "history": []}
    if run_digest:
        meta["run_digest"] = cfg.digest(exclude=engine.NOT_IDENTITY)
    ckpt.save(d / engine.CHECKPOINT, {"w": np.zeros(2, np.float32)}, meta)
    (d / "config.json").write_text(json.dumps(cfg.to_json()))


def test_data_dir_edited_in_config_json(tmp_path):
    cfg = tiny(data_dir=str(tmp_path / "old"))
    moved = cfg.replace(data_dir=str(tmp_path / "new"))
    # a checkpoint that records the run's digest without data_dir: the edit is accepted
    _checkpoint(tmp_path / "a", cfg, run_digest=True)
    assert engine.same_run(ckpt.read_meta(tmp_path / "a" / engine.CHECKPOINT), moved, moved.to_json())
    # an older checkpoint cannot tell: the refusal says what happened, not "only data_dir may change"
    _checkpoint(tmp_path / "b", cfg, run_digest=False)
    (tmp_path / "b" / "config.json").write_text(json.dumps(moved.to_json()))
    with pytest.raises(RunError) as e:
        engine.check_folders([engine.Member(moved, "b", tmp_path / "b")], "resume")
    assert "config.json edited after the run" in str(e.value) and "counts data_dir too" in str(e.value)
    assert "--data-dir" in str(e.value) and "(and data_dir) may change" not in str(e.value)


@pytest.mark.parametrize("chunk, t", [(100, 5001), (1000, 1000), (7, 200_000)])
def test_the_chunk_warning_suggests_a_clearly_smaller_round_chunk(chunk, t):
    (w,) = [w for w in warnings_for(RunConfig(chunk=chunk, t_free=t, t_nudge=t)) if "a chunk of" in w]
    suggested = int(w.split("--set chunk=")[1].rstrip(")"))
    per_step = 4 * t
    assert suggested * per_step <= 200_000 or suggested == 1
    assert suggested <= chunk // 2 and str(suggested).strip("0") in ("1", "2", "5")


def test_grid_values_that_round_alike_give_distinct_members(tmp_path):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"name": "s", "base": TINY, "grid": {"beta": [0.1, 0.1000001]}}))
    names = [n for n, _ in sweep_cmd.expand(sweep_cmd.load_spec(spec))]
    assert names == ["beta=0.1", "beta=0.1000001"]
    spec.write_text(json.dumps({"name": "s", "base": TINY, "grid": {"beta": [0.2, 0.2]}}))
    with pytest.raises(SpecError, match=r"grid.beta lists the same value twice"):
        sweep_cmd.expand(sweep_cmd.load_spec(spec))
