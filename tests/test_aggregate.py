"""aggregate and stability: single runs and sweep members alike; a cell is the full config
minus the seed; repeated seeds and other settings are reported, never pooled; runs that
did not finish are listed; every cell shows n, mean ± std, the paper and the distance."""

import json
from pathlib import Path

import numpy as np
import pytest
from exp_helpers import run_cli

from experiments import aggregate, engine, stability
from experiments.config import RunConfig
from experiments.presets import PRESETS, PUBLISHED_TABLE1, PUBLISHED_TABLE2


def write_run(d: Path, values: dict, seed: int, test_accs, status="ok", message=""):
    """A run folder as the engine writes it: config.json from a RunConfig, metrics, summary."""
    cfg = RunConfig.from_dict({**values, "seed": seed})
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg.to_json(), indent=1))
    rows = [
        {
            "epoch": i + 1,
            "train_acc": a - 1,
            "loss": 0.1,
            "test_acc": a,
            "test_loss": 0.1,
            "time_s": 1.0,
            "steps": 100 * (i + 1),
        }
        for i, a in enumerate(test_accs)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status is not None:
        (d / "summary.json").write_text(json.dumps(engine.summarize(rows, status, message)))
    return d


DEP = PRESETS["fmnist-dep"]
FINALS = {0: 88.1, 1: 88.5, 2: 87.9, 3: 88.3, 4: 88.6}  # the ok runs of the Table-2 cell


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for s in (0, 1, 2):  # single runs
        write_run(root / f"fmnist-dep-seed{s}", DEP, s, [80.0, 85.0, FINALS[s]])
    sw = root / "sweep"  # a sweep: sweep.json beside member folders
    sw.mkdir(parents=True)
    (sw / "sweep.json").write_text(json.dumps({"name": "sweep", "members": []}))
    for s in (3, 4):
        write_run(sw / f"seed={s}", DEP, s, [81.0, 86.0, FINALS[s]])
    # seed 0 again, shorter (2 epochs): the longer run is the one counted
    write_run(root / "again" / "fmnist-dep-seed0", DEP, 0, [70.0, 99.0])
    # the same config but another data folder: the same cell
    write_run(root / "elsewhere-seed1", {**DEP, "data_dir": "/some/where"}, 1, [80.0, 85.0, 88.5])
    write_run(root / "div", DEP, 5, [50.0], status="diverged", message="diverged at epoch 2")
    write_run(root / "stopped", DEP, 6, [82.0, 84.0], status="interrupted")
    write_run(root / "killed", DEP, 7, [83.0], status="running")  # kill -9 leaves 'running'
    write_run(root / "crashed", DEP, 8, [], status=None)  # died before any summary
    # other settings: other cells, never pooled with the preset's
    write_run(root / "lr-seed0", {**DEP, "lr": [0.4, 0.2, 0.02]}, 0, [84.0, 86.0, 87.0])
    write_run(root / "lr-seed1", {**DEP, "lr": [0.4, 0.2, 0.02]}, 1, [84.0, 86.5, 87.4])
    write_run(root / "epochs-seed0", {**DEP, "epochs": 50}, 0, [85.0, 89.0])
    return root


def rows_of(text):
    return [[c.strip() for c in l.strip().strip("|").split("|")] for l in text.splitlines() if l.startswith("| ")]


def test_cells_group_by_config_minus_seed(runs):
    cs = aggregate.cells([aggregate.load_run(p) for p in aggregate.find_runs([runs])])
    assert len(cs) == 3
    by_lr = {json.dumps(list(c["config"].lr)) + str(c["config"].epochs): c for c in cs}
    main = by_lr[json.dumps(DEP["lr"]) + "20"]
    assert sorted(main["final"]) == sorted(FINALS.values())  # n = 5, each seed once
    assert main["seeds"] == [0, 1, 2, 3, 4, 5, 6, 7, 8] and main["repeated_seeds"] == [0, 1]
    assert [Path(d).name for d in main["diverged"]] == ["div"]
    assert sorted((Path(d).name, s) for d, s in main["unfinished"]) == [
        ("crashed", "no summary"),
        ("killed", "running"),
        ("stopped", "interrupted"),
    ]
    assert main["paper"] == PUBLISHED_TABLE2[("fmnist", "dep")]
    lr = by_lr["[0.4, 0.2, 0.02]20"]
    assert sorted(lr["final"]) == [87.0, 87.4] and lr["repeated_seeds"] == []


def test_table_reports_n_mean_std_paper_distance_and_notes(runs):
    text = aggregate.report([runs])
    head, *body = rows_of(text)
    assert head[:3] == ["cell", "lr", "epochs"] and head[3:] == [
        "n",
        "seeds",
        "final test %",
        "best test %",
        "epochs done",
        "paper",
        "Δ (paper σ)",
        "notes",
    ]
    rows = {(r[1], r[2]): r for r in body}
    assert len(rows) == 3
    main = rows[(json.dumps(DEP["lr"]), "20")]
    v = np.array(list(FINALS.values()))
    pm, ps = PUBLISHED_TABLE2[("fmnist", "dep")]
    assert main[0] == "Table 2 FMNIST DEP" and main[3] == "5" and main[4] == "0,1,2,3,4,5,6,7,8"
    assert main[5] == f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"
    assert main[7] == "3" and main[8] == f"{pm:.2f} ± {ps:.2f}" and main[9] == f"{(v.mean() - pm) / ps:+.1f}"
    notes = main[10]
    assert "seed(s) [0, 1] repeated, counted once" in notes
    assert "1 diverged (not in the mean)" in notes
    assert "3 not finished (interrupted, no summary, running)" in notes and "so far" in notes
    lr = rows[("[0.4, 0.2, 0.02]", "20")]
    w = np.array([87.0, 87.4])
    assert lr[3] == "2" and lr[5] == f"{w.mean():.2f} ± {w.std(ddof=1):.2f}" and lr[10] == ""
    one = rows[(json.dumps(DEP["lr"]), "50")]
    assert one[3] == "1" and one[5] == "89.00" and one[9] == f"{(89.0 - pm) / ps:+.1f}"  # one run: no std


def test_repeated_seed_counts_once_even_alone(tmp_path):
    for name in ("a", "b"):
        write_run(tmp_path / name, DEP, 0, [85.0, 86.0] if name == "a" else [85.0])
    (c,) = aggregate.cells([aggregate.load_run(p) for p in aggregate.find_runs([tmp_path])])
    assert c["final"] == [86.0] and c["repeated_seeds"] == [0]
    (row,) = rows_of(aggregate.table([c]))[1:]
    assert row[1] == "1" and "seed(s) [0] repeated, counted once" in row[-1]


def test_command_writes_table_and_plot(runs, tmp_path):
    rc, out, err = run_cli(
        aggregate.main,
        [runs / "fmnist-dep-seed0", runs / "sweep", "--out", tmp_path / "t.md", "--plot", tmp_path / "t.png"],
    )
    assert rc == 0, err
    text = (tmp_path / "t.md").read_text()
    assert text.strip() in out and "Table 2 FMNIST DEP" in text
    (row,) = rows_of(text)[1:]
    assert row[1] == "3" and row[2] == "0,3,4"  # a single run and two sweep members: one cell
    assert (tmp_path / "t.png").stat().st_size > 1000


HTS = {**PRESETS["mnist-hts-lognormal"], "dt_out": 0.25}


def test_stability_reads_single_runs_and_sweeps(tmp_path):
    rng = np.random.default_rng(0)
    curves = {s: list(97 + np.cumsum(rng.uniform(-0.2, 0.3, 12))) for s in range(4)}
    write_run(tmp_path / "single" / "hts-seed0", HTS, 0, curves[0])
    write_run(tmp_path / "single" / "hts-seed1", HTS, 1, curves[1])
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "sweep.json").write_text("{}")
    write_run(tmp_path / "sw" / "seed=2", HTS, 2, curves[2])
    write_run(tmp_path / "sw" / "seed=3", HTS, 3, curves[3][:5], status="interrupted")
    write_run(tmp_path / "sw" / "other", {**HTS, "dt_out": 0.3, "lr": [0.2, 0.1]}, 0, [90.0, 91.0, 92.0])
    write_run(tmp_path / "dep", DEP, 0, [85.0, 88.0])
    rc, out, err = run_cli(
        stability.main,
        [tmp_path / "single", tmp_path / "sw", tmp_path / "dep", "--last", "10", "--out", tmp_path / "s.md"],
    )
    assert rc == 0, err
    text = (tmp_path / "s.md").read_text()
    finals = np.array([curves[s][-1] for s in (0, 1, 2)])
    fl = np.mean([np.std(np.diff(curves[s][-10:]), ddof=1) for s in (0, 1, 2)])
    pm, ps = PUBLISHED_TABLE1[("mnist", "lognormal", 0.25)]
    cell = (
        f"**{finals.mean():.2f} ± {finals.std(ddof=1):.2f}** (n=3, fluct {fl:.2f}, 1 unfinished); "
        f"paper {pm:.2f} ± {ps:.2f}"
    )
    assert cell in text
    # the dt_out=0.30 run with other rates sits at another Table 1 position, alone
    assert "**92.00 ± –** (n=1, fluct 0.00, other settings than the paper's)" in text
    assert "Other cells:" in text and "Table 2 FMNIST DEP" in text
    assert np.isnan(stability.fluctuation([1.0, 2.0]))  # undefined below 3 epochs
