"""Helpers shared by the experiment-layer tests (engine, checkpoints, command lines).

TINY is a synthetic config that trains in milliseconds per epoch once compiled: 192
examples in batches of 32, scanned in chunks of 3 steps: one compiled shape. (The engine
rebuilds its optimiser per run, so every run retraces and recompiles its step: one
shape keeps that to one compilation per run.) TINY_REM (200 examples, chunks of 4) has
the partial last batch and a short chunk, for the tests of the epoch's structure.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import checkpoint as ckpt
from experiments import cli
from experiments.config import RunConfig, validate

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(
    dataset="synthetic",
    synthetic_train=192,
    synthetic_test=64,
    subset_seed=1,
    sizes=[16, 12, 4],
    t_free=8,
    t_nudge=3,
    batch_size=32,
    chunk=3,
    eval_batch=64,
    lr=[0.2, 0.1],
    beta=0.2,
    epochs=2,
)
SPE = 6  # TINY's steps per epoch
TINY_REM = dict(TINY, synthetic_train=200, chunk=4)  # 6 full batches (chunks 4 + 2) + 8 examples


def tiny(**changes) -> RunConfig:
    return validate(RunConfig.from_dict({**TINY, **changes}))


def set_args(values: dict) -> list[str]:
    """`--set key=value` arguments for every entry (lists as comma-separated numbers)."""
    out = []
    for k, v in values.items():
        if isinstance(v, (list, tuple)):
            text = ",".join(str(u) for u in v)
        elif isinstance(v, bool):
            text = "true" if v else "false"
        elif v is None:
            text = "none"
        else:
            text = str(v)
        out += ["--set", f"{k}={text}"]
    return out


def tiny_args(**changes) -> list[str]:
    return set_args({**TINY, **changes}) + ["--no-progress"]


def run_cli(main, argv) -> tuple[int, str, str]:
    """`(exit status, stdout, stderr)` of a command's `main` behind `cli.main_wrapper`, the
    way `python -m ...` runs it (argparse errors become their exit status)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main_wrapper(main, [str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc, err, *needles):
    """Exit status 2, stderr exactly one line `error: ...` holding every needle, no traceback."""
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every entry under `folder`: kind, bytes (files), link target (symlinks), mode, mtime."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    out = {}
    for p in sorted(folder.rglob("*")):
        st = os.lstat(p)
        rel = str(p.relative_to(folder))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", st.st_mode)
        else:
            out[rel] = ("file", p.read_bytes(), st.st_mode, st.st_mtime_ns)
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def strip_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def checkpoint_arrays(run_dir: Path) -> tuple[dict, dict]:
    """`(meta, {path: array})` of a run folder's checkpoint, read with the decoder only."""
    meta, sd = ckpt.decode((Path(run_dir) / "checkpoint.msgpack").read_bytes())
    flat = jax.tree_util.tree_flatten_with_path(sd)[0]
    return meta, {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def assert_same_arrays(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def max_abs_diff(tree_a, tree_b) -> float:
    la, lb = jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)
    assert len(la) == len(lb)
    return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)))) for u, v in zip(la, lb))


def subprocess_env(**extra) -> dict:
    """The environment of a child `python -m experiments....`: this checkout first on the path."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished TINY run folder (2 epochs), made once per test module."""
    d = tmp_path_factory.mktemp("finished") / "run"
    rc, _, err = run_cli(train_main(), tiny_args() + ["--out", d])
    assert rc == 0, err
    return d


@pytest.fixture
def run_copy(finished, tmp_path):
    """A copy of `finished` for one test to change."""
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    return d


def train_main():
    from experiments import train

    return train.main
