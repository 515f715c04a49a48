"""Stopping a real `python -m experiments.train` process: Ctrl-C / SIGTERM leave an
`interrupted` summary and a resumable checkpoint; `kill -9` in the middle of an epoch
leaves the last epoch's checkpoint. Either way `--resume` finishes the run with exactly
the numbers of an uninterrupted one."""
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from experiments import train
from exp_helpers import (TINY, assert_same_arrays, checkpoint_arrays, metrics, run_cli, strip_time, subprocess_env,
                         summary, tiny_args)


def start(args, out_dir, tmp_path, progress=False, **env):
    cmd = [sys.executable, "-m", "experiments.train"] + args + ["--out", str(out_dir)]
    if not progress:
        cmd.append("--no-progress")
    return subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


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


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, id="SIGTERM"),
                                 # the same engine path as SIGTERM (KeyboardInterrupt): slow run only
                                 pytest.param(signal.SIGINT, id="SIGINT", marks=pytest.mark.slow)])
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
