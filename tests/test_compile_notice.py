"""What a run says while XLA compiles its training program (engine._CompileNotice,
loop.Ticker): the expected time when it is long, a line every few seconds while it runs
with progress output, nothing for a short compile without progress output."""

import io
import threading
import time

from exp_helpers import run_cli, tiny, tiny_args

from ep_jax.experiments.loop import Ticker
from experiments import engine, train


def test_expected_compile_time_follows_the_measured_points():
    est = {
        L: engine.expected_compile_s(tiny(sizes=[16] + [12] * L + [4], lr=[0.1] * (L + 1))) for L in (1, 5, 10, 20, 100)
    }
    assert est[1] < est[5] < est[10] < est[20] < est[100]
    assert est[1] < 10 and est[5] < engine.COMPILE_NOTICE_S  # small nets: no notice
    assert 40 < est[20] < 200  # measured 86-108 s
    assert 10 * 60 < est[100] < 60 * 60  # issue 29: 24 minutes


def test_a_long_compile_is_announced_and_ticks(tmp_path, monkeypatch):
    monkeypatch.setenv("EP_JAX_COMPILE_NOTICE", "0")  # every compile counts as long
    monkeypatch.setenv("EP_JAX_COMPILE_TICK", "0.05")
    args = [a for a in tiny_args(epochs=1) if a != "--no-progress"]
    rc, out, err = run_cli(train.main, args + ["--out", tmp_path / "run"])
    assert rc == 0, err
    assert "compiling the training program of 'run' (1 hidden layer): expected to take about" in err, err
    assert "still compiling the training program of 'run': " in err, err
    n = err.count("still compiling")
    time.sleep(0.3)  # the ticker has stopped with the compile
    assert not [t for t in threading.enumerate() if t.name == "ep_jax-ticker"]
    assert n >= 1


def test_a_short_compile_without_progress_says_nothing(tmp_path):
    rc, out, err = run_cli(train.main, tiny_args(epochs=1) + ["--out", tmp_path / "run"])
    assert rc == 0, err
    assert "compiling" not in err and "compiling" not in out


def test_ticker_lines_and_clean_stop():
    buf = io.StringIO()
    t = Ticker("waiting for x", every=0.05, stream=buf)
    time.sleep(0.3)
    t.stop()
    lines = buf.getvalue().splitlines()
    assert lines and all(l.startswith("waiting for x: ") and l.endswith(" s so far...") for l in lines)
    time.sleep(0.15)
    assert buf.getvalue().splitlines() == lines and not t._thread.is_alive()
    quiet = io.StringIO()
    Ticker("short", every=5, stream=quiet).stop()  # a short wait prints nothing
    assert quiet.getvalue() == ""
