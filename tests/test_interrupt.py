"""Stopping a real `python -m experiments.train` process: Ctrl-C / SIGTERM leave an
`interrupted` summary and a resumable checkpoint; `kill -9` in the middle of an epoch
leaves the last epoch's checkpoint. Either way `--resume` finishes the run with exactly
the numbers of an uninterrupted one. A signal while XLA compiles (no Python runs then)
ends the process within seconds with the one line `interrupted` and exit status 130,
never a death by signal."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from exp_helpers import (
    TINY,
    assert_same_arrays,
    checkpoint_arrays,
    metrics,
    run_cli,
    strip_time,
    subprocess_env,
    summary,
    tiny_args,
)

from experiments import engine, train


def start(args, out_dir, tmp_path, progress=False, **env):
    cmd = [sys.executable, "-m", "experiments.train"] + args + ["--out", str(out_dir)]
    if not progress:
        cmd.append("--no-progress")
    return subprocess.Popen(
        cmd, cwd=tmp_path, env=subprocess_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(cond, proc, timeout=300.0, what=""):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}:\n{out}\n{err[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def n_rows(d: Path) -> int:
    p = d / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


@pytest.mark.parametrize(
    "sig",
    [
        pytest.param(signal.SIGTERM, id="SIGTERM"),
        # the same engine path as SIGTERM (KeyboardInterrupt): slow run only
        pytest.param(signal.SIGINT, id="SIGINT", marks=pytest.mark.slow),
    ],
)
def test_signal_leaves_interrupted_summary_and_resume_equals_uninterrupted(tmp_path, sig):
    args = tiny_args(epochs=30)
    d = tmp_path / "run"
    proc = start(args, d, tmp_path)
    wait_for(lambda: n_rows(d) >= 1, proc, what="the first epoch's checkpoint")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert "stopped (interrupted); continue with --resume" in out
    s = summary(d)
    meta, _ = checkpoint_arrays(d)
    assert s["status"] == "interrupted" and "continue with --resume" in s["message"]
    assert 1 <= meta["epoch"] < 30 and s["epochs_done"] == meta["epoch"]
    assert f"checkpoint of epoch {meta['epoch']} kept" in s["message"]
    assert metrics(d) == meta["history"]

    rc, _, err = run_cli(train.main, ["--resume", "--out", d, "--no-progress"])
    assert rc == 0, err
    assert summary(d)["status"] == "ok" and summary(d)["epochs_done"] == 30
    rc, _, err = run_cli(train.main, args + ["--out", tmp_path / "straight"])
    assert rc == 0, err
    assert strip_time(metrics(d)) == strip_time(metrics(tmp_path / "straight"))
    assert_same_arrays(checkpoint_arrays(d)[1], checkpoint_arrays(tmp_path / "straight")[1])


# 2048 examples in batches of 32, chunks of 4: 64 steps per epoch in 16 device calls, each
# long enough that a kill sent when the progress bar passes a chunk lands inside the epoch.
KILL = dict(TINY, synthetic_train=2048, sizes=[16, 64, 4], t_free=20, t_nudge=5, chunk=4, epochs=3)
KILL_SPE = 64


def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    args = [a for a in tiny_args(**KILL) if a != "--no-progress"]
    d = tmp_path / "run"
    # the progress bar on stderr reports every chunk (tqdm reads its defaults from TQDM_*)
    proc = start(args, d, tmp_path, progress=True, TQDM_MININTERVAL="0", TQDM_MINITERS="1")
    seen = []

    def read_bar():
        buf = ""
        while True:
            ch = proc.stderr.read(1)
            if not ch:
                return
            buf = buf[-200:] + ch
            m = re.search(r"(\d+)/(\d+) \[[^\r\n]*$", buf)
            if m:
                seen.append(int(m.group(1)))

    reader = threading.Thread(target=read_bar, daemon=True)
    reader.start()
    # inside epoch 2, in its first half: the epoch's end is many device calls away
    wait_for(lambda: any(KILL_SPE < c < KILL_SPE * 3 // 2 for c in seen), proc, what="epoch 2 under way")
    proc.kill()
    proc.wait(timeout=60)
    killed_at = max(seen)
    assert proc.returncode == -signal.SIGKILL
    assert KILL_SPE < killed_at < 2 * KILL_SPE
    # what kill -9 leaves: epoch 1's checkpoint and metrics; the summary still says running
    meta, _ = checkpoint_arrays(d)
    assert meta["epoch"] == 1 and [r["epoch"] for r in metrics(d)] == [1], "the kill did not land in epoch 2"
    assert summary(d)["status"] == "running"

    rc, _, err = run_cli(train.main, ["--resume", "--out", d, "--no-progress"])
    assert rc == 0, err
    assert summary(d)["status"] == "ok" and summary(d)["epochs_done"] == 3
    rc, _, err = run_cli(train.main, tiny_args(**KILL) + ["--out", tmp_path / "straight"])
    assert rc == 0, err
    assert strip_time(metrics(d)) == strip_time(metrics(tmp_path / "straight"))
    assert_same_arrays(checkpoint_arrays(d)[1], checkpoint_arrays(tmp_path / "straight")[1])


# --- signals while the process is in native code -------------------------------------------


def test_the_handler_only_records_and_the_engine_stops_at_a_safe_point():
    """A KeyboardInterrupt raised by the handler itself may land in JAX's gc callback,
    where Python swallows it (the run then went on to the end with exit status 0)."""
    with engine._Signals(watch=False) as sig:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler has run: nothing raised
        assert sig.pending and not sig.stopped
        with pytest.raises(KeyboardInterrupt):
            sig.check()
        sig.check()  # one stop only


WATCHED = """
import sys, time
from ep_jax.experiments import cli, engine

def main(argv):
    out = sys.argv[1]
    with engine._Signals() as sig:
        sig.on_abort.append(lambda: open(out + ".summaries", "w").write("written"))
        if sys.argv[2] == "record":
            with sig.recording():
                print("ready", flush=True)
                time.sleep(2)                 # an epoch's record: the signal waits for it
                open(out + ".record", "w").write("whole")
        else:
            print("ready", flush=True)
        time.sleep(60)                        # stands for XLA compiling: no safe point for long
    print("not reached", flush=True)

sys.exit(cli.main_wrapper(main))
"""


@pytest.mark.parametrize("where", ["native", "record"])
def test_a_process_stuck_in_native_code_stops_within_seconds(tmp_path, where):
    out = tmp_path / "o"
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHED, str(out), where],
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready", proc.communicate()
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    rest, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 130, (proc.returncode, err)
    assert err.strip().splitlines() == ["interrupted"], err
    assert "not reached" not in rest
    assert took < 30, took  # not the 60 s of the "native" call
    if where == "record":
        assert (tmp_path / "o.record").read_text() == "whole"
    else:
        assert (tmp_path / "o.summaries").read_text() == "written"


# 6 hidden layers: the first chunk's program takes seconds to compile (7-11 s on 2 cores)
DEEP = dict(TINY, sizes=[16, 12, 12, 12, 12, 12, 12, 4], lr=[0.1] * 7, epochs=3)


@pytest.mark.slow
def test_signal_during_compilation_is_one_line_and_resumable(tmp_path):
    """SIGINT / SIGTERM sent while the run compiles its first chunk, three times: exit
    status 130 (never a death by signal, a segfault or an abort), stderr the one line
    `interrupted`, the summary `interrupted`, the folder resumable from epoch 0."""
    from experiments.config import RunConfig, validate

    cfg = validate(RunConfig.from_dict(DEEP))
    for k, (sig, delay) in enumerate([(signal.SIGINT, 0.0), (signal.SIGTERM, 0.5), (signal.SIGINT, 2.0)]):
        d = tmp_path / f"run{k}"
        proc = start(tiny_args(**DEEP), d, tmp_path)
        wait_for(lambda: (d / "summary.json").exists(), proc, what="the folder to be prepared")
        time.sleep(delay)
        proc.send_signal(sig)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
        assert proc.returncode == 130, (k, sig, proc.returncode, err[-3000:])
        assert err.strip().splitlines() == ["interrupted"], (k, err[-3000:])
        assert "stopped (interrupted); continue with --resume" in out
        s = summary(d)
        assert s["status"] == "interrupted" and "continue with --resume" in s["message"], s
        metas = engine.check_folders([engine.Member(cfg, d.name, d)], "resume")
        assert metas[d.name]["epoch"] == s["epochs_done"]
        assert not (d / ".ep_jax-holder.json").exists()
        print(
            f"try {k}: {signal.Signals(sig).name} {delay} s after the folder was prepared: exit 130 {took:.1f} s "
            f"after the signal, epochs done {s['epochs_done']}"
        )


NATIVE = """
import signal, sys, time
from ep_jax.experiments import cli

def main(argv):
    # the main thread stops seeing the signals, as while XLA compiles: no Python handler runs
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    print("ready", flush=True)
    time.sleep(60)
    print("not reached", flush=True)

sys.exit(cli.main_wrapper(main))
"""


def test_a_command_in_native_code_outside_a_run_stops_within_seconds(tmp_path):
    """Any command (reproduce's estimate, gdu, ... compile outside the engine): the
    command line's own watcher ends it when the KeyboardInterrupt cannot come."""
    proc = subprocess.Popen(
        [sys.executable, "-c", NATIVE],
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready", proc.communicate()
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines() == ["interrupted"], (proc.returncode, err)
    assert "not reached" not in rest and time.monotonic() - t0 < 30
