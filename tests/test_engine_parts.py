"""The experiment engine's parts, each on its own: the loop (no files), the run folder
(lock, what --overwrite may remove), the loggers, the runtime passed in, the alignment
hook, the signal handling — and the import graph that keeps them in one direction."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from exp_helpers import (
    ROOT,
    assert_one_line_error,
    checkpoint_arrays,
    metrics,
    run_cli,
    snapshot,
    subprocess_env,
    tiny,
    tiny_args,
)

from ep_jax.experiments import build, engine, loggers, runfolder, runtime, train
from ep_jax.experiments.alignment_hook import AlignmentHook
from ep_jax.experiments.errors import RunError
from ep_jax.experiments.loop import Hook, Loop

QUIET = dict(progress=False, print_fn=lambda *a: None)


class Recorder(Hook):
    def __init__(self):
        self.events = []

    def start(self, loop, state, rx):
        self.events.append(("start",))

    def after_chunk(self, loop, state, rx, chunk):
        self.events.append(("chunk", chunk.epoch, chunk.index, chunk.steps, chunk.batch))

    def after_epoch(self, loop, state, rx, end):
        self.events.append(("epoch", end.epoch))
        for i, row in enumerate(end.rows):
            if row is not None:
                loop.done(i, row)

    def stop(self, loop, reason):
        self.events.append(("stop", reason))


def bare_loop(cfg, hooks):
    g = engine.Group([engine.Member(cfg, "m", Path("unused"))])
    with engine._x64(cfg):
        data = engine.group_data(g, None)
        state, rx = g.initial()
        loop = Loop(
            g,
            runtime.LOCAL.runner(g, int(data[1].shape[0])),
            data,
            lambda i, e, n: build.epoch_batches(cfg, e, n),
            [0],
            [[]],
            hooks,
        )
        state = loop.run(state, rx)
    return loop, state


def test_loop_trains_without_files_and_equals_the_engine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny()
    rec = Recorder()
    loop, state = bare_loop(cfg, [rec])
    assert list(tmp_path.iterdir()) == []  # the loop wrote nothing
    # TINY: 6 steps per epoch in chunks of 3 -> two chunks per epoch, then the epoch
    per_epoch = [("chunk", e, 0, 3, 32) for e in (1,)] + [("chunk", 1, 1, 3, 32)]
    assert rec.events[:4] == [("start",)] + per_epoch + [("epoch", 1)]
    assert rec.events[-1] == ("stop", "ok") and sum(e[0] == "epoch" for e in rec.events) == 2
    assert [r["epoch"] for r in loop.history[0]] == [1, 2] and loop.status == ["running"]
    # the same numbers as the engine's run folder
    engine.run([engine.Member(cfg, "r", tmp_path / "r")], "new", **QUIET)
    rows = metrics(tmp_path / "r")
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in rows] == [
        {k: v for k, v in r.items() if k != "time_s"} for r in loop.history[0]
    ]
    saved = engine.load_run(tmp_path / "r")[3]
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(state.train.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[0])


def test_loop_hook_failure_reports_failed_and_keeps_the_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Boom(Recorder):
        def after_epoch(self, loop, state, rx, end):
            raise OSError(28, "No space left on device")

        def stop(self, loop, reason):
            super().stop(loop, reason)
            raise RuntimeError("a failing stop must not hide the first error")

    b = Boom()
    with pytest.raises(OSError, match="No space"):
        bare_loop(tiny(), [b])
    assert b.events[-1] == ("stop", "failed")


# --- the run folder ------------------------------------------------------------------------


def test_folder_lock_refuses_a_second_holder_naming_it(tmp_path):
    d = tmp_path / "a" / "b"
    first = runfolder.FolderLock(d).acquire()
    assert d.is_dir() and first.created == [tmp_path / "a", d]
    first.write_holder()
    with pytest.raises(RunError, match=rf"{d} is in use: process {os.getpid()} on "):
        runfolder.FolderLock(d).acquire()
    first.release()
    assert list(d.iterdir()) == []  # the holder note goes with the lock
    again = runfolder.FolderLock(d).acquire()  # free again
    again.release()
    again.undo_created()
    assert d.is_dir()  # it did not create them: kept
    first.undo_created()
    assert not (tmp_path / "a").exists()  # empty folders it made: gone


def test_two_commands_into_one_folder_second_refused_first_untouched(tmp_path):
    """Two `train` commands into one --out: the second ends in one error line naming the
    folder and the holder, the first finishes with every epoch once."""
    d = tmp_path / "run"
    args = [sys.executable, "-m", "experiments.train"] + tiny_args(epochs=40, seed=0) + ["--out", str(d)]
    first = subprocess.Popen(
        args, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        t0 = time.time()
        while not (d / runfolder.HOLDER).exists():
            assert first.poll() is None and time.time() - t0 < 120, first.communicate()
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "experiments.train"]
            + tiny_args(epochs=40, seed=1)
            + ["--out", str(d), "--overwrite"],
            cwd=ROOT,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        line = assert_one_line_error(second.returncode, second.stderr, str(d), "is in use", f"process {first.pid}")
        assert "--seed" not in line or "seed 0" not in line
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    rows = metrics(d)
    assert [r["epoch"] for r in rows] == list(range(1, 41))
    assert json.loads((d / "config.json").read_text())["seed"] == 0
    assert checkpoint_arrays(d)[0]["history"] == rows
    assert not (d / runfolder.HOLDER).exists()


@pytest.fixture
def no_data(monkeypatch):
    """Loading data is not needed for any refusal below."""
    monkeypatch.setattr(engine, "load_data", lambda cfg: (_ for _ in ()).throw(AssertionError("data loaded")))


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, no_data):
    d = tmp_path / "thesis"
    d.mkdir()
    (d / "thesis.tex").write_text("\\documentclass{article}")
    (d / "config.json").write_text('{"not": "a run"}')
    before = snapshot(tmp_path)
    rc, _, err = run_cli(train.main, tiny_args() + ["--overwrite", "--out", d])
    assert_one_line_error(rc, err, str(d), "not a run folder", "thesis.tex")
    assert snapshot(tmp_path) == before


def test_overwrite_never_removes_the_working_directory(tmp_path, monkeypatch, no_data):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    for out in (".", str(tmp_path), ".."):
        rc, _, err = run_cli(train.main, tiny_args() + ["--overwrite", "--out", out])
        assert_one_line_error(rc, err, "working directory")
    assert snapshot(tmp_path) == before


def test_a_member_folder_above_the_sweep_is_not_replaced(tmp_path, no_data):
    (tmp_path / "other-run").mkdir()
    (tmp_path / "other-run" / "keep.txt").write_text("unrelated")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(RunError, match="not a run folder"):
        engine.run([engine.Member(tiny(), "up", sweep / "..")], "overwrite", **QUIET)
    assert snapshot(tmp_path) == before


def test_a_refused_new_run_leaves_no_empty_folder(tmp_path, monkeypatch):
    def missing(cfg):
        from ep_jax.data import DatasetError

        raise DatasetError("mnist: not found")

    monkeypatch.setattr(engine, "load_data", missing)
    with pytest.raises(Exception, match="not found"):
        engine.run([engine.Member(tiny(), "r", tmp_path / "runs" / "r")], "new", **QUIET)
    assert list(tmp_path.iterdir()) == []


# --- runtime, loggers, signals -------------------------------------------------------------


class NotMain(runtime.Local):
    is_main = False


def test_a_process_that_does_not_write_leaves_no_file(tmp_path):
    (s,) = engine.run([engine.Member(tiny(), "r", tmp_path / "r")], "new", runtime=NotMain(), **QUIET)
    assert s["status"] == "ok" and s["epochs_done"] == 2  # it trained...
    assert not (tmp_path / "r").exists()  # ...and wrote nothing


def test_epoch_lines_never_land_on_the_progress_bar(tmp_path, monkeypatch):
    """stdout and stderr into one stream (a pipe, a log file): every console line starts
    after the bar was cleared, never in the middle of the bar's line."""
    import contextlib
    import io
    import re

    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        engine.run([engine.Member(tiny(epochs=3), "r", tmp_path / "r")], "new")
    text = buf.getvalue()
    assert re.search(r"\d+/18 \[", text), "no progress bar was drawn"
    starts = re.findall(r"(.?)(epoch \d+:|summary:)", text)
    assert len(starts) == 4 and all(c in ("", "\r", "\n") for c, _ in starts), starts
    assert loggers.plural(1, "epoch") == "1 epoch" and loggers.plural(3, "member") == "3 members"


def test_console_lines_and_summary(tmp_path):
    out = []
    engine.run([engine.Member(tiny(epochs=1), "r", tmp_path / "r")], "new", progress=False, print_fn=out.append)
    assert out[0].startswith("epoch 1: train ") and ", 1 epoch, " in out[-1] and out[-1].startswith("summary: ")
    out = []
    engine.run(
        [engine.Member(tiny(epochs=1, seed=s), f"s{s}", tmp_path / "sw" / f"s{s}") for s in (0, 1)],
        "new",
        progress=False,
        print_fn=out.append,
    )
    assert out == [out[0]] and "over 2 members" in out[0]


def test_optional_logger_without_its_library_is_one_line(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tbx(name, *a, **k):
        if name.startswith("tensorboardX"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tbx)
    with pytest.raises(RunError, match=r"tensorboardX: pip install 'ep_jax\[tensorboard\]'"):
        loggers.optional_loggers(["tensorboard"], [], [], [])
    with pytest.raises(RunError, match="unknown logger 'csv'"):
        loggers.optional_loggers(["csv"], [], [], [])


def test_tensorboard_event_files_hold_the_rows(tmp_path):
    pytest.importorskip("tensorboardX")
    d = tmp_path / "r"
    engine.run([engine.Member(tiny(), "r", d)], "new", loggers=["tensorboard"], **QUIET)
    (events,) = (d / "tensorboard").glob("events.out.tfevents.*")
    assert events.stat().st_size > 0
    from tensorboardX.event_file_writer import event_pb2  # noqa: F401  (the writer's own format)

    assert b"test_acc" in events.read_bytes()


def test_a_signal_while_an_epoch_is_recorded_waits_for_the_record():
    with engine._Signals() as sig:
        done = []
        with pytest.raises(KeyboardInterrupt):
            with sig.recording():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                done.append("checkpoint")
                os.kill(os.getpid(), signal.SIGINT)  # a second one: still one stop
                done.append("metrics line")
        assert done == ["checkpoint", "metrics line"]
        os.kill(os.getpid(), signal.SIGTERM)  # after the stop: ignored
        time.sleep(0.05)


def test_alignment_hook_measures_without_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny(align_every=4, align_batch=16)
    g = engine.Group([engine.Member(cfg, "m", tmp_path / "unused")])
    data = engine.group_data(g, None)
    state, rx = g.initial()
    hook = AlignmentHook(g, data[0], data[1], state, runtime.LOCAL)
    rec = Recorder()
    loop = Loop(
        g,
        runtime.LOCAL.runner(g, int(data[1].shape[0])),
        data,
        lambda i, e, n: build.epoch_batches(cfg, e, n),
        [0],
        [[]],
        [hook, rec],
    )
    loop.run(state, rx)
    steps = [r["step"] for row in loop.history[0] for r in row["alignment"]]
    assert steps == [0, 6, 12] or steps[0] == 0 and all(s > 0 for s in steps[1:]), steps
    assert all(
        -1.0 - 1e-6 <= c <= 1.0 + 1e-6
        for row in loop.history[0]
        for r in row["alignment"]
        for c in r["cosine"].values()
    )
    assert list(tmp_path.iterdir()) == []


# --- the import graph --------------------------------------------------------------------------

PKG = ROOT / "ep_jax"
COMMANDS = {
    "train",
    "sweep",
    "reproduce",
    "aggregate",
    "stability",
    "hidden_states",
    "gdu",
    "plot_dt_hist",
    "alignment_report",
    "compare_custom_vjp",
    "example_ep_head",
    "cli",
    "distributed",
    "commands",
    "import_lease",
    "gradient_error",
    "__main__",
}


def imports_of(path: Path) -> set[str]:
    """Every `ep_jax...` module a file imports (module level and inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ep_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ep_jax"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_the_core_never_imports_the_experiment_layer():
    for f in PKG.rglob("*.py"):
        if "experiments" in f.relative_to(PKG).parts:
            continue
        bad = {m for m in imports_of(f) if m.startswith("ep_jax.experiments")}
        assert not bad, (f, bad)


def test_the_engine_never_imports_a_command_and_nothing_goes_round_in_a_circle():
    mods = {f.stem: f for f in (PKG / "experiments").glob("*.py")}
    graph = {}
    for name, f in mods.items():
        deps = set()
        for m in imports_of(f):
            parts = m.split(".")
            if len(parts) >= 3 and parts[:2] == ["ep_jax", "experiments"] and parts[2] in mods and parts[2] != name:
                deps.add(parts[2])
        graph[name] = deps
    engine_parts = {n for n in mods if n not in COMMANDS}
    for n in engine_parts:
        assert not graph[n] & COMMANDS, (n, graph[n] & COMMANDS)
    # no cycle (depth-first search)
    state = {}

    def visit(n, path):
        if state.get(n) == "done":
            return
        assert state.get(n) != "active", "import circle: " + " -> ".join(path + [n])
        state[n] = "active"
        for d in sorted(graph[n]):
            visit(d, path + [n])
        state[n] = "done"

    for n in sorted(graph):
        visit(n, [])


def test_resume_after_the_data_moved(tmp_path, monkeypatch):
    """Where the data lives is not part of a run: `--resume --data-dir NEW` (or
    EP_JAX_DATA_DIR in place of a saved folder) continues bit for bit."""
    d, ref = tmp_path / "r", tmp_path / "ref"
    rc, _, err = run_cli(train.main, tiny_args(epochs=1, data_dir=str(tmp_path / "old")) + ["--out", d])
    assert rc == 0, err
    rc, _, err = run_cli(
        train.main, ["--resume", "--out", d, "--epochs", "2", "--data-dir", str(tmp_path / "new"), "--no-progress"]
    )
    assert rc == 0, err
    assert json.loads((d / "config.json").read_text())["data_dir"] == str(tmp_path / "new")
    monkeypatch.setenv("EP_JAX_DATA_DIR", str(tmp_path / "env"))
    rc, _, err = run_cli(train.main, ["--resume", "--out", d, "--epochs", "3", "--no-progress"])
    assert rc == 0, err
    assert json.loads((d / "config.json").read_text())["data_dir"] is None
    rc, _, err = run_cli(train.main, tiny_args(epochs=3) + ["--out", ref])
    assert rc == 0, err
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]
    assert strip(metrics(d)) == strip(metrics(ref))
    a, b = checkpoint_arrays(d)[1], checkpoint_arrays(ref)[1]
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_huge_relaxations_warn_that_chunks_return_late():
    from ep_jax.experiments.config import RunConfig, validate, warnings_for

    (w,) = warnings_for(validate(RunConfig.from_dict({"t_free": 10**6})))
    assert "Ctrl-C/SIGTERM take effect" in w and "--set chunk=1" in w
    assert warnings_for(validate(RunConfig.from_dict({"t_free": 10**6, "chunk": 1}))) == []
    assert warnings_for(validate(RunConfig.from_dict({}))) == []
