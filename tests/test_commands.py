"""The sweep, reproduce and train commands: nothing written before every input is checked
(spec, names, data), a resume only of the same sweep, names that stay inside their
folder, sizes refused before they hang, readable listings, atomic results files.

Nothing here trains: where a command would, `engine.run` is replaced by a recorder (the
engine's own behaviour is tested in test_experiments.py)."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from exp_helpers import TINY, assert_one_line_error, run_cli, snapshot, tiny

import ep_jax
from experiments import checkpoint as ckpt
from experiments import engine, reproduce, train
from experiments import sweep as cmd
from experiments.config import RunConfig

HUGE = str(10**400)
MNIST_SMALL = dict(
    dataset="mnist", sizes=[784, 8, 10], subset=64, test_subset=64, batch_size=32, epochs=1, lr=0.1, t_free=4, t_nudge=2
)


def json_spec(path: Path, **spec) -> Path:
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture
def no_training(monkeypatch):
    """`engine.run` records its calls instead of training: `[(member dirs, mode)]`."""
    calls = []

    def fake_run(members, mode="new", **kw):
        calls.append(([m.dir for m in members], mode))
        for m in members:
            m.dir.mkdir(parents=True, exist_ok=True)
        return [{"status": "ok"} for _ in members]

    monkeypatch.setattr(engine, "run", fake_run)
    return calls


# --- 1. sweep: data and resume checked before any write ------------------------------------------


def test_sweep_with_missing_dataset_writes_nothing_and_fails_the_same_again(tmp_path, no_training):
    empty = tmp_path / "no-data"
    empty.mkdir()
    spec = json_spec(tmp_path / "s.json", name="s", base=dict(MNIST_SMALL, data_dir=str(empty)), grid={"seed": [0, 1]})
    out = tmp_path / "o"
    for extra in ([], [], ["--dry-run"], ["--overwrite"]):
        rc, _, err = run_cli(cmd.main, [spec, "--out", out, "--no-progress"] + extra)
        assert_one_line_error(rc, err, "member seed=0", "dataset 'mnist' not found", str(empty))
        assert not out.exists()
    assert no_training == []


def test_sweep_loads_real_data_before_writing(tmp_path, monkeypatch, no_training):
    """A dataset found offline but unreadable is refused before sweep.json is written."""
    bad = tmp_path / "bad"
    bad.mkdir()
    monkeypatch.setattr(ep_jax.data, "available_offline", lambda name, data_dir=None: True)
    spec = json_spec(tmp_path / "s.json", name="s", base=dict(MNIST_SMALL, data_dir=str(bad)))
    rc, _, err = run_cli(cmd.main, [spec, "--out", tmp_path / "o", "--no-progress"])
    assert_one_line_error(rc, err, "member s", "not found")
    assert not (tmp_path / "o").exists() and no_training == []
    rc, out, err = run_cli(cmd.main, [spec, "--out", tmp_path / "o", "--dry-run"])  # found offline: listed
    assert rc == 0, err


def _leftover(tmp_path, **base) -> tuple[Path, Path]:
    """A sweep folder holding only sweep.json (what a failed start used to leave)."""
    spec = json_spec(tmp_path / "s.json", name="s", base=dict(TINY, **base), grid={"seed": [0, 1]})
    out = tmp_path / "o"
    members = cmd.members_of(cmd.load_spec(spec), out)
    cmd.write_sweep_json(out, cmd.load_spec(spec), members)
    return spec, out


@pytest.mark.parametrize(
    "change,field",
    [
        ({"synthetic_train": 160}, "synthetic_train"),
        ({"subset": 96}, "subset"),
        ({"dataset": "mnist", "sizes": [784, 12, 10], "lr": 0.1}, "dataset"),
    ],
)
def test_sweep_resume_refuses_another_config_naming_field_and_member(tmp_path, no_training, change, field):
    _, out = _leftover(tmp_path)
    before = snapshot(out)
    other = json_spec(tmp_path / "other.json", name="s", base=dict(TINY, **change), grid={"seed": [0, 1]})
    rc, _, err = run_cli(cmd.main, [other, "--out", out, "--resume", "--no-progress"])
    assert_one_line_error(rc, err, "member seed=0", field, "only epochs may change")
    assert snapshot(out) == before and no_training == []


def test_sweep_resume_may_change_epochs_and_data_dir(tmp_path):
    spec, out = _leftover(tmp_path)
    for epochs, data_dir in ((5, None), (None, str(tmp_path)), (7, str(tmp_path))):
        s = cmd.load_spec(
            json_spec(
                tmp_path / "again.json",
                name="s",
                base=dict(TINY, **({"data_dir": data_dir} if data_dir else {})),
                grid={"seed": [0, 1]},
            )
        )
        cmd.check_sweep_folder(out, cmd.members_of(s, out, epochs), "resume")  # no error


def test_sweep_resume_names_missing_members(tmp_path, no_training):
    _, out = _leftover(tmp_path)
    other = json_spec(tmp_path / "o.json", name="s", base=TINY, grid={"seed": [0, 2]})
    rc, _, err = run_cli(cmd.main, [other, "--out", out, "--resume", "--no-progress"])
    assert_one_line_error(rc, err, "the spec's members differ", "seed=1", "seed=2")


def test_sweep_resume_of_a_damaged_sweep_json_is_one_line(tmp_path, no_training):
    _, out = _leftover(tmp_path)
    (out / "sweep.json").write_text(json.dumps({"name": "s", "members": "nope"}))
    spec = json_spec(tmp_path / "s2.json", name="s", base=TINY, grid={"seed": [0, 1]})
    rc, _, err = run_cli(cmd.main, [spec, "--out", out, "--resume", "--no-progress"])
    assert_one_line_error(rc, err, "sweep.json", "not a sweep's record")


# --- 3. names that become paths ------------------------------------------------------------------

BAD_NAMES = ["../../escaped", "..", ".", "", "a/b", "/abs", "a\\b", "x\x01y", "-rf", " pad", "n" * 300]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n[:12]) for n in BAD_NAMES])
def test_sweep_name_must_be_one_safe_component(tmp_path, monkeypatch, no_training, name):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    spec = json_spec(tmp_path / "spec.json", name=name, base=TINY)
    before = snapshot(tmp_path)
    for extra in ([], ["--dry-run"]):
        rc, _, err = run_cli(cmd.main, [spec, "--no-progress"] + extra)
        assert_one_line_error(rc, err, "the sweep's name")
    assert snapshot(tmp_path) == before and no_training == []


@pytest.mark.parametrize("name", ["..", ".", "-m", "../x", 3.5, ""])
def test_member_names_must_be_safe(tmp_path, no_training, name):
    spec = json_spec(tmp_path / "spec.json", name="s", base=TINY, members=[{"name": name}])
    rc, _, err = run_cli(cmd.main, [spec, "--out", tmp_path / "o", "--no-progress"])
    assert_one_line_error(rc, err, "member")
    assert not (tmp_path / "o").exists()


def test_grid_derived_name_too_long_is_one_line(tmp_path, no_training):
    spec = json_spec(
        tmp_path / "spec.json", name="s", base=dict(TINY, lr=0.1), grid={"sizes": [[16] + [12] * 120 + [4]]}
    )
    rc, _, err = run_cli(cmd.main, [spec, "--out", tmp_path / "o", "--dry-run"])
    assert_one_line_error(rc, err, "member name", "255 bytes")


@pytest.mark.parametrize("out", ["../elsewhere", "/tmp/abs", "runs/../../x", 3])
def test_spec_out_must_stay_relative_and_inside(tmp_path, monkeypatch, no_training, out):
    monkeypatch.chdir(tmp_path)
    spec = json_spec(tmp_path / "spec.json", name="s", out=out, base=TINY)
    rc, _, err = run_cli(cmd.main, [spec, "--no-progress"])
    assert_one_line_error(rc, err, "out")
    assert no_training == []


@pytest.mark.parametrize("key,value", [("name", 3), ("preset", ["a"]), ("description", {"x": 1})])
def test_spec_values_of_the_wrong_type_are_one_line(tmp_path, no_training, key, value):
    spec = json_spec(tmp_path / "spec.json", **{"name": "s", "base": TINY, key: value})
    rc, _, err = run_cli(cmd.main, [spec, "--out", tmp_path / "o", "--dry-run"])
    assert_one_line_error(rc, err, key)


def test_train_preset_derived_folder_name_is_checked(tmp_path, monkeypatch, no_training):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setitem(train.PRESETS, "../../evil", dict(TINY))
    before = snapshot(tmp_path)
    rc, _, err = run_cli(train.main, ["--preset", "../../evil", "--no-progress"])
    assert_one_line_error(rc, err, "run folder name")
    assert snapshot(tmp_path) == before and no_training == []
    rc, _, err = run_cli(train.main, ["--preset", "mnist-dep", "--no-progress"])  # the control: a plain name
    assert rc == 0 and no_training == [([Path("runs") / "mnist-dep-seed0"], "new")], err


# --- 4. sizes ------------------------------------------------------------------------------------


def test_a_million_members_refused_before_expanding(tmp_path, no_training):
    spec = json_spec(
        tmp_path / "big.json",
        name="big",
        base=TINY,
        grid={"seed": list(range(1000)), "beta": [0.1 + i * 1e-4 for i in range(1000)]},
    )
    t0 = time.perf_counter()
    rc, _, err = run_cli(cmd.main, [spec, "--out", tmp_path / "o", "--dry-run"])
    assert_one_line_error(rc, err, "1000000 members", f"{cmd.MAX_MEMBERS}")
    assert time.perf_counter() - t0 < 10
    assert cmd.size(cmd.load_spec(spec)) == 10**6


def test_a_grid_of_10_to_the_12_is_refused_at_once(tmp_path, no_training):
    grid = {
        "seed": list(range(10**4)),
        "beta": [0.1 + i * 1e-5 for i in range(10**4)],
        "gamma": [1.0 + i * 1e-5 for i in range(10**4)],
    }
    spec = json_spec(tmp_path / "huge.json", name="h", base=TINY, grid=grid)
    t0 = time.perf_counter()
    rc, _, err = run_cli(cmd.main, [spec, "--out", tmp_path / "o", "--dry-run"])
    assert_one_line_error(rc, err, f"{10**12} members", "10000 seed x 10000 beta x 10000 gamma")
    assert time.perf_counter() - t0 < 20


def test_the_largest_sweep_expands_and_one_more_is_refused(tmp_path):
    spec = cmd.load_spec(
        json_spec(
            tmp_path / "many.json",
            name="m",
            base=TINY,
            grid={"seed": list(range(cmd.MAX_MEMBERS - 1))},
            members=[{"name": "x"}],
        )
    )
    assert cmd.size(spec) == cmd.MAX_MEMBERS
    assert len(cmd.expand(spec)) == cmd.MAX_MEMBERS
    spec["members"].append({"name": "y"})
    with pytest.raises(cmd.SpecError, match=f"{cmd.MAX_MEMBERS + 1} members"):
        cmd.expand(spec)


def test_duplicate_check_is_linear():
    """A million names are checked in well under a second or two (`names.count` per name
    took hours)."""
    names = [f"m{i}" for i in range(10**6)] + ["m17", "m5", "m17"]
    t0 = time.perf_counter()
    assert cmd.duplicates(names) == ["m17", "m5"]
    assert time.perf_counter() - t0 < 10
    assert cmd.duplicates(["a", "b"]) == []


# --- 5. train's listings and integer flags -------------------------------------------------------


def test_train_list_is_a_table():
    rc, out, err = run_cli(train.main, ["--list"])
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["preset", "paper/table", "model", "estimator", "dataset", "sizes", "epochs"]
    assert "{" not in out and '"' not in out
    (row,) = [l for l in lines if l.startswith("mnist-dep ")]
    assert "dEP Table 2 (mnist, dep)" in row and row.split()[-4:] == ["symmetric", "mnist", "784-256-10", "20"]
    (row,) = [l for l in lines if l.startswith("fmnist-hts-gamma ")]
    assert "HTS Table 1" in row and "chl" in row and "784-1024-10" in row
    assert sum(l.split()[0] in train.PRESETS for l in lines if l.strip()) == len(train.PRESETS)


def test_train_list_fields_explains_every_estimator_and_flags_have_help():
    rc, out, err = run_cli(train.main, ["--list-fields"])
    assert rc == 0, err
    for kind in ep_jax.estimators.KINDS:
        (line,) = [l for l in out.splitlines() if l.split()[:1] == [kind]]
        assert len(line.split()) > 5, line
    assert "through all t_free" in out and "+beta and -beta" in out
    helps = {a.dest: a.help for a in train.parser()._actions}
    assert helps["epochs"] and helps["seed"]


@pytest.mark.parametrize(
    "main,argv",
    [
        (train.main, ["--epochs", HUGE]),
        (train.main, ["--seed", HUGE]),
        (train.main, ["--seed", "-" + HUGE]),
        (train.main, ["--subset", HUGE]),
        (train.main, ["--set", f"epochs={HUGE}"]),
        (train.main, ["--set", f"sizes=16,{HUGE},4"]),
        (reproduce.main, ["table2", "--epochs", HUGE]),
        (reproduce.main, ["table2", "--seeds", HUGE]),
        (reproduce.main, ["table2", "--chunk", HUGE]),
    ],
    ids=lambda v: " ".join(v)[:30] if isinstance(v, list) else "",
)
def test_huge_integers_are_one_line(tmp_path, no_training, main, argv):
    base = [] if main is reproduce.main else ["--set", "dataset=synthetic", "--set", "sizes=16,12,4"]
    rc, _, err = run_cli(main, base + argv + ["--out", tmp_path / "o", "--no-progress"])
    assert_one_line_error(rc, err, "2**63")
    assert not (tmp_path / "o").exists() and no_training == []


def test_huge_integers_in_sweeps_are_one_line(tmp_path, no_training):
    spec = tmp_path / "s.json"
    spec.write_text('{"name": "s", "base": %s, "members": [{"name": "big", "seed": %s}]}' % (json.dumps(TINY), HUGE))
    rc, _, err = run_cli(cmd.main, [spec, "--out", tmp_path / "o", "--dry-run"])
    assert_one_line_error(rc, err, "member big: seed", "2**63")
    spec = json_spec(tmp_path / "t.json", name="s", base=TINY)
    rc, _, err = run_cli(cmd.main, [spec, "--out", tmp_path / "o", "--epochs", HUGE, "--dry-run"])
    assert_one_line_error(rc, err, "--epochs", "2**63")


# --- 6. results.md atomically --------------------------------------------------------------------


def test_sweep_results_written_atomically(tmp_path, monkeypatch):
    written = []
    real = ckpt.atomic_write_text
    monkeypatch.setattr(ckpt, "atomic_write_text", lambda p, t: (written.append(Path(p).name), real(p, t)))
    tmp_path.joinpath("o").mkdir()
    text = cmd.write_results(tmp_path / "o", "t", [])
    assert written == ["results.md"] and (tmp_path / "o" / "results.md").read_text() == text


# --- 2. reproduce: --resume, --overwrite, the smoke folder, the estimate ---------------------------


@pytest.fixture
def fake_cells(monkeypatch):
    """Every dataset counts as available; the report is a fixed text."""
    from experiments import aggregate

    monkeypatch.setattr(reproduce, "available", lambda name, data_dir=None: True)
    monkeypatch.setattr(aggregate, "report", lambda folders: "| the table |\n")


def rep(*extra):
    return ["table2", "--cells", "mnist-ep", "--seeds", "2", "--no-estimate", "--no-progress"] + list(extra)


def test_reproduce_smoke_has_its_own_default_folder(tmp_path, monkeypatch, fake_cells, no_training):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(reproduce.main, rep("--smoke"))
    assert rc == 0, err
    assert no_training == [
        (
            [Path("runs/reproduce-table2-smoke/mnist-ep/seed0"), Path("runs/reproduce-table2-smoke/mnist-ep/seed1")],
            "new",
        )
    ]
    assert "-> runs/reproduce-table2-smoke" in out
    assert (tmp_path / "runs/reproduce-table2-smoke/results.md").read_text().startswith("# table2 (smoke)")
    rc, out, err = run_cli(reproduce.main, rep())
    assert rc == 0, err
    assert no_training[-1][0][0] == Path("runs/reproduce-table2/mnist-ep/seed0")


def test_reproduce_smoke_epochs_flag_is_used(tmp_path, monkeypatch, fake_cells, no_training):
    seen = []
    monkeypatch.setattr(engine, "group_members", lambda ms: seen.extend(m.cfg.epochs for m in ms) or [])
    rc, _, err = run_cli(reproduce.main, rep("--smoke", "--epochs", "3", "--out", tmp_path / "o"))
    assert rc == 0, err
    assert seen == [3, 3]


def _checkpoint(run_dir: Path, cfg: RunConfig, epoch: int):
    """A run folder as the engine leaves it after `epoch` epochs (checkpoint, config.json)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    history = [
        dict(epoch=e, steps=10 * e, train_acc=50.0, loss=0.1, test_acc=50.0, test_loss=0.1, time_s=1.0)
        for e in range(1, epoch + 1)
    ]
    ckpt.save(
        run_dir / engine.CHECKPOINT,
        {"w": np.zeros(2, np.float32)},
        {"epoch": epoch, "digest": cfg.digest(), "name": run_dir.name, "history": history},
    )
    (run_dir / "config.json").write_text(json.dumps(cfg.to_json()))


def test_reproduce_resume_is_accepted_and_refuses_nothing_to_resume(tmp_path, fake_cells, no_training):
    out = tmp_path / "o"
    rc, _, err = run_cli(reproduce.main, rep("--resume", "--out", out))
    assert_one_line_error(rc, err, "no run to resume", "without --resume")
    assert not out.exists() and no_training == []
    # one seed has a checkpoint (epoch 1 of 50): --resume continues the group, as a re-run does
    ms, _ = reproduce.members(reproduce.parser().parse_args(rep("--out", str(out))))
    _checkpoint(ms[0].dir, ms[0].cfg, 1)
    rc, text, err = run_cli(reproduce.main, rep("--resume", "--out", out))
    assert rc == 0, err
    rc, text2, err = run_cli(reproduce.main, rep("--out", out))
    assert rc == 0, err
    assert no_training == [([m.dir for m in ms], "resume")] * 2
    assert "2 to train" in text and "2 to train" in text2


def test_reproduce_overwrite(tmp_path, fake_cells, no_training):
    out = tmp_path / "o"
    ms, _ = reproduce.members(reproduce.parser().parse_args(rep("--out", str(out))))
    other = ms[0].cfg.replace(beta=0.3)
    _checkpoint(ms[0].dir, other, 1)
    rc, _, err = run_cli(reproduce.main, rep("--out", out))
    assert_one_line_error(rc, err, "holds a run of another config", "--overwrite")
    assert no_training == []
    rc, _, err = run_cli(reproduce.main, rep("--out", out, "--overwrite"))
    assert rc == 0, err
    assert no_training == [([m.dir for m in ms], "overwrite")]
    # a finished run is retrained with --overwrite, skipped without
    _checkpoint(ms[0].dir, ms[0].cfg, 50)
    _checkpoint(ms[1].dir, ms[1].cfg, 50)
    rc, text, err = run_cli(reproduce.main, rep("--out", out))
    assert rc == 0 and "0 to train" in text, err
    rc, text, err = run_cli(reproduce.main, rep("--out", out, "--overwrite"))
    assert rc == 0 and "2 to train" in text and no_training[-1][1] == "overwrite", err


@pytest.mark.parametrize("stray", ["notes.txt", "mnist-ep/keep.txt", "other-folder/x"])
def test_reproduce_overwrite_refuses_a_folder_it_did_not_create(tmp_path, fake_cells, no_training, stray):
    out = tmp_path / "o"
    (out / stray).parent.mkdir(parents=True, exist_ok=True)
    (out / stray).write_text("mine")
    before = snapshot(out)
    rc, _, err = run_cli(reproduce.main, rep("--out", out, "--overwrite"))
    assert_one_line_error(rc, err, "--overwrite replaces only the runs of a reproduce output folder")
    assert snapshot(out) == before and no_training == []


def test_reproduce_results_written_atomically(tmp_path, monkeypatch, fake_cells, no_training):
    written = []
    real = ckpt.atomic_write_text
    monkeypatch.setattr(ckpt, "atomic_write_text", lambda p, t: (written.append(Path(p).name), real(p, t)))
    rc, _, err = run_cli(reproduce.main, rep("--out", tmp_path / "o"))
    assert rc == 0, err
    assert written == [".ep_jax-files.json", "results.md"]  # the manifest (what ep_jax writes), then the table
    assert (tmp_path / "o" / "results.md").read_text() == "# table2\n\n| the table |\n"


def test_reproduce_budget_must_be_finite(tmp_path, fake_cells, no_training):
    for v in ("inf", "nan"):
        rc, _, err = run_cli(reproduce.main, rep("--out", tmp_path / "o", "--budget", v))
        assert_one_line_error(rc, err, "--budget must be > 0")


def test_estimate_times_a_short_chunk_and_reports_each_group(monkeypatch):
    from ep_jax import sweep as S

    lengths = []
    real = S.sweep_steps_jit

    def spy(model, est, opt, state, x, y, idx, *rest):
        lengths.append(idx.shape[0])
        return real(model, est, opt, state, x, y, idx, *rest)

    monkeypatch.setattr(S, "sweep_steps_jit", spy)
    groups = engine.group_members([engine.Member(tiny(chunk=100, model="ep"), "a", Path("a"))])
    reported = []
    secs = reproduce.estimate(groups, engine.load_data, lambda g, s: reported.append((g.members[0].name, s)))
    assert lengths == [reproduce.ESTIMATE_STEPS] * 2  # a first call (compiles), the timed one
    assert reported == [("a", secs[0])] and secs[0] > 0


def test_reproduce_prints_a_line_per_estimated_group(tmp_path, monkeypatch, fake_cells, no_training):
    def fake_estimate(groups, data_for, report=None, steps=3):
        for g in groups:
            report(g, 2.0)
        return [2.0] * len(groups)

    monkeypatch.setattr(reproduce, "estimate", fake_estimate)
    argv = [a for a in rep("--out", str(tmp_path / "o")) if a != "--no-estimate"]
    argv[argv.index("mnist-ep")] = "mnist-ep,mnist-dep"
    rc, text, err = run_cli(reproduce.main, argv)
    assert rc == 0, err
    assert "estimating the time of 2 group(s)" in text
    assert "  mnist-ep: 2 seeds, ~2.0 s per epoch x 50 epochs" in text
    assert "  mnist-dep: 2 seeds, ~2.0 s per epoch x 50 epochs" in text


def test_reproduce_rerun_may_move_the_data(tmp_path, fake_cells, no_training):
    """--data-dir is not part of a run: a re-run with the data elsewhere continues."""
    out = tmp_path / "o"
    ms, _ = reproduce.members(reproduce.parser().parse_args(rep("--out", str(out), "--data-dir", "/old/place")))
    for m in ms:
        _checkpoint(m.dir, m.cfg, 1)
        (m.dir / "config.json").write_text(json.dumps(m.cfg.to_json()))
    rc, text, err = run_cli(reproduce.main, rep("--out", out, "--data-dir", tmp_path))
    assert rc == 0, err
    assert no_training == [([m.dir for m in ms], "resume")]
    rc, _, err = run_cli(
        reproduce.main, rep("--out", out, "--data-dir", tmp_path, "--seeds", "1", "--cells", "mnist-ep", "--chunk", "7")
    )
    assert_one_line_error(rc, err, "holds a run of another config")


def test_reproduce_checks_every_groups_folders_before_training_any(tmp_path, fake_cells, no_training):
    out = tmp_path / "o"
    argv = rep("--out", out, "--cells", "mnist-ep,mnist-dep")
    ms, _ = reproduce.members(reproduce.parser().parse_args([str(a) for a in argv]))
    late = [m for m in ms if m.name.startswith("mnist-dep")][0]
    late.dir.mkdir(parents=True)
    (late.dir / "not-a-run.txt").write_text("mine")  # the second group's folder is not replaceable
    before = snapshot(out)
    rc, _, err = run_cli(reproduce.main, argv)
    assert_one_line_error(rc, err, str(late.dir), "not-a-run.txt")
    assert snapshot(out) == before and no_training == []
