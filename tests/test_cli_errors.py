"""Nonsense is refused with exit status 2 and one line `error: ...` (no traceback), before
any data is read or any folder is touched; `--debug` shows the traceback instead."""

import errno
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from exp_helpers import (
    TINY,
    assert_one_line_error,
    assert_same_arrays,
    checkpoint_arrays,
    metrics,
    run_cli,
    strip_time,
    subprocess_env,
    summary,
    tiny_args,
)

import ep_jax
from experiments import aggregate, cli, engine, reproduce, stability, sweep, train
from experiments import checkpoint as ckpt
from experiments.config import ConfigError

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def no_data(monkeypatch):
    """Any attempt to load data fails the test (the refusal must come first)."""

    def boom(*a, **k):
        raise AssertionError("data was loaded before the config was refused")

    monkeypatch.setattr(engine, "load_data", boom)
    monkeypatch.setattr(ep_jax.data, "load_dataset", boom)
    monkeypatch.setattr(ep_jax.synthetic, "make_synthetic", boom)


BAD = [
    # (name, extra arguments on top of TINY, expected in the one line)
    ("negative lr", ["--set", "lr=-0.1"], "lr: rates must be finite and >= 0"),
    ("one negative rate", ["--set", "lr=0.1,-0.2"], "lr: rates must be finite and >= 0"),
    ("epochs 0", ["--epochs", "0"], "epochs: must be >= 1, got 0"),
    ("epochs -3", ["--epochs", "-3"], "epochs: must be >= 1, got -3"),
    ("epochs 1.5", ["--set", "epochs=1.5"], "epochs: expected an integer, got 1.5"),
    ("subset 100000", ["--subset", "100000"], "subset: must lie in [1, 192]"),
    ("subset -5", ["--subset", "-5"], "subset: must lie in [1, 192]"),
    ("subset 0", ["--subset", "0"], "subset: must lie in [1, 192]"),
    ("test subset 0", ["--test-subset", "0"], "test_subset: must lie in [1, 64]"),
    ("lr=abc", ["--set", "lr=abc"], "lr: expected a number or a list of numbers"),
    ("lr count", ["--set", "lr=0.1,0.2,0.3"], "lr: give one rate or one per synapse (2 for sizes [16, 12, 4]), got 3"),
    ("lr NaN", ["--set", "lr=NaN"], "lr: must be finite"),
    ("max_state=nan", ["--set", "max_state=nan"], "max_state: expected a number, got 'nan'"),
    ("max_state=NaN", ["--set", "max_state=NaN"], "max_state: must be finite"),
    ("max_state=Infinity", ["--set", "max_state=Infinity"], "max_state: must be finite"),
    ("max_state=0", ["--set", "max_state=0"], "max_state: must be > 0.0"),
    ("dt=0", ["--set", "dt=0"], "dt: time steps must lie in (0, 1]"),
    ("dt=1.5", ["--set", "dt=1.5"], "dt: time steps must lie in (0, 1]"),
    ("dt=-0.5", ["--set", "dt=-0.5"], "dt: time steps must lie in (0, 1]"),
    ("dt per layer", ["--set", "dt=0.5,2"], "dt: time steps must lie in (0, 1]"),
    ("beta=0 symmetric", ["--set", "beta=0"], "beta: must be nonzero for the 'symmetric' EP estimator"),
    ("beta=0 one_sided", ["--set", "beta=0", "--set", "estimator=one_sided"], "beta: must be nonzero"),
    ("beta=0 chl", ["--set", "beta=0", "--set", "estimator=chl"], "beta: must be nonzero"),
    ("beta NaN", ["--set", "beta=NaN"], "beta: must be finite"),
    ("t_nudge > t_free", ["--set", "t_nudge=9"], "t_nudge: must be <= t_free, got t_nudge=9 > t_free=8"),
    ("unknown field", ["--set", "learning_rate=0.1"], "unknown config field 'learning_rate'"),
    ("--set without =", ["--set", "lr"], "--set expects key=value"),
    ("unknown preset", ["--preset", "nope"], "unknown preset 'nope'"),
    ("seed 2**32", ["--seed", str(2**32)], "seed: must be <= 4294967295"),
    ("seed 1e20", ["--set", "seed=1e20"], "seed: must be <= 4294967295"),
    ("seed -1", ["--seed", "-1"], "seed: must be >= 0"),
    ("batch > data", ["--set", "batch_size=1000"], "batch_size: must not exceed the 192 training examples"),
    ("batch 0", ["--set", "batch_size=0"], "batch_size: must be >= 1, got 0"),
    ("zero width", ["--set", "sizes=16,0,4"], "sizes: must list >= 2 positive widths"),
    ("unknown dataset", ["--set", "dataset=cifar"], "dataset: must be one of"),
    ("random sign with bptt", ["--set", "estimator=bptt", "--set", "nudge=random_sign"], "nudge: random_sign needs"),
    ("bool as 1", ["--set", "float64=1"], "float64: expected true or false"),
    (
        "alpha on ep",
        ["--set", "model=ep", "--set", "alpha=0.3"],
        "alpha: applies to the dendritic models only (model = 'ep')",
    ),
    ("momentum 1", ["--set", "momentum=1"], "momentum: must be < 1.0"),
    ("dt_mean alone", ["--set", "dt_mean=0.3"], "dt_mean: is used only with dt_dist"),
    ("chunk 0", ["--set", "chunk=0"], "chunk: must be >= 1"),
    ("mnist sizes", ["--set", "dataset=mnist"], "sizes: the first width must be 784"),
]


@pytest.mark.parametrize("name,extra,needle", BAD, ids=[b[0] for b in BAD])
def test_nonsense_refused_before_data_and_folders(tmp_path, no_data, name, extra, needle):
    out = tmp_path / "run"
    rc, _, err = run_cli(train.main, tiny_args() + extra + ["--out", out])
    assert_one_line_error(rc, err, needle)
    assert not out.exists()


def test_sensible_values_accepted(no_data):
    """The controls of the refusals above: one float lr, beta=0 for BPTT, dt=1, the whole set."""

    def cfg(*extra):
        return train.resolve(train.parser().parse_args(tiny_args() + list(extra)))

    assert cfg("--set", "lr=0.1").lr == 0.1
    assert cfg("--set", "lr=1").lr == 1.0
    assert cfg("--set", "lr=0.1,0.2").lr == (0.1, 0.2)
    assert cfg("--set", "beta=0", "--set", "estimator=bptt").beta == 0.0
    assert cfg("--set", "dt=1").dt == 1.0 and cfg("--set", "dt=0.5,1").dt == (0.5, 1.0)
    assert cfg("--subset", "192").subset == 192 and cfg("--seed", str(2**32 - 1)).seed == 2**32 - 1
    assert cfg("--set", "epochs=2.0").epochs == 2
    assert cfg("--set", "max_state=1e6").max_state == 1e6


def test_debug_shows_the_traceback(tmp_path, no_data):
    with pytest.raises(ConfigError, match="lr: rates must be finite"):
        cli.main_wrapper(train.main, tiny_args() + ["--set", "lr=-1", "--debug", "--out", str(tmp_path / "r")])


def test_command_line_exit_status_and_traceback_in_a_real_process(tmp_path):
    args = [sys.executable, "-m", "experiments.train"] + tiny_args() + ["--set", "lr=-1", "--out", str(tmp_path / "r")]
    res = subprocess.run(args, capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        "error: lr: rates must be finite and >= 0 (a negative rate trains uphill), got [-1.0]"
    ]
    res = subprocess.run(
        args + ["--debug"], capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=300
    )
    assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr
    assert "ConfigError: lr: rates must be finite" in res.stderr
    assert not (tmp_path / "r").exists()


# --- data --------------------------------------------------------------------------------------

FM_SMALL = [
    "--preset",
    "fmnist-dep-1h",
    "--subset",
    "64",
    "--test-subset",
    "64",
    "--set",
    "t_free=4",
    "--set",
    "t_nudge=2",
    "--set",
    "batch_size=32",
    "--no-progress",
]


def test_explicit_data_dir_is_the_only_place_looked(tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_cli(train.main, FM_SMALL + ["--data-dir", "/nonexistent", "--out", out])
    line = assert_one_line_error(rc, err, "dataset 'fashion_mnist' not found", "/nonexistent: does not exist")
    assert "/usr/share/datasets" not in line and "EP_JAX_DATA_DIR" in line  # no fallback, a way out
    assert not out.exists()


def idx_bytes(arr):
    return (
        bytes([0, 0, 0x08, arr.ndim])
        + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        + arr.astype(np.uint8).tobytes()
    )


def write_idx_set(folder, gz=False):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, shape in (
        ("train-images-idx3-ubyte", (64, 28, 28)),
        ("train-labels-idx1-ubyte", (64,)),
        ("t10k-images-idx3-ubyte", (32, 28, 28)),
        ("t10k-labels-idx1-ubyte", (32,)),
    ):
        b = idx_bytes(rng.integers(0, 10 if "labels" in name else 256, shape))
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(b) if gz else b)


@pytest.mark.parametrize("gz", [False, True], ids=["idx", "idx.gz"])
def test_damaged_data_file_one_line_naming_it(tmp_path, gz):
    data = tmp_path / "data"
    write_idx_set(data, gz=gz)
    f = data / ("train-images-idx3-ubyte" + (".gz" if gz else ""))  # the first file read
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated
    out = tmp_path / "run"
    rc, _, err = run_cli(train.main, ["--preset", "mnist-dep", "--data-dir", data, "--out", out, "--no-progress"])
    line = assert_one_line_error(rc, err, str(f))
    assert ("corrupt or truncated gzip" in line) if gz else ("md5" in line and "does not match" in line), line
    assert not out.exists()


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_truncated_copy_of_real_fashion_mnist(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(FMNIST, data)
    f = data / "t10k-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-30])
    rc, _, err = run_cli(train.main, FM_SMALL + ["--data-dir", data, "--out", tmp_path / "run"])
    assert_one_line_error(rc, err, str(f), "corrupt or truncated gzip")
    assert not (tmp_path / "run").exists()


# --- specs ---------------------------------------------------------------------------------------


def test_toml_syntax_error_names_file_and_line(tmp_path, no_data):
    spec = tmp_path / "broken.toml"
    spec.write_text('name = "x"\n[base]\nlr = [0.1, \nbeta = 0.2\n')
    rc, _, err = run_cli(sweep.main, [spec, "--out", tmp_path / "o"])
    assert_one_line_error(rc, err, str(spec), "TOML syntax error", "line 4")
    spec = tmp_path / "broken.json"
    spec.write_text('{"name": "x",\n "base": {"lr": }}')
    rc, _, err = run_cli(sweep.main, [spec, "--out", tmp_path / "o"])
    assert_one_line_error(rc, err, str(spec), "JSON syntax error at line 2")
    assert not (tmp_path / "o").exists()


SPEC_BAD = [
    ("missing", None, "does not exist"),
    ("unknown key", 'name = "x"\nlearning_rate = 0.1\n', "unknown setting(s) ['learning_rate']"),
    ("grid not a list", 'name = "x"\n[grid]\nseed = 3\n', "grid.seed must be a non-empty list"),
    ("grid unknown", 'name = "x"\n[grid]\nsed = [1]\n', "grid.sed is not a config field"),
    ("member bad value", 'name = "x"\n[[members]]\nname = "m"\nlr = -1\n', "member m: lr: rates must be finite"),
    ("member bad name", 'name = "x"\n[[members]]\nname = "a/b"\n', "member name 'a/b'"),
    ("duplicate members", 'name = "x"\n[[members]]\nname = "a"\n[[members]]\nname = "a"\n', "repeated: ['a']"),
    ("unknown preset", 'name = "x"\npreset = "nope"\n', "unknown preset 'nope'"),
    ("not a spec file", "", "must be a .toml or .json file"),
]


@pytest.mark.parametrize("name,text,needle", SPEC_BAD, ids=[s[0] for s in SPEC_BAD])
def test_bad_sweep_specs(tmp_path, no_data, name, text, needle):
    spec = tmp_path / ("spec.txt" if name == "not a spec file" else "spec.toml")
    if text is not None:
        base = "\n".join(f"{k} = {json.dumps(v)}" for k, v in TINY.items() if k not in ("sizes", "lr"))
        spec.write_text(text.replace('name = "x"\n', f'name = "x"\n{base}\nsizes = [16, 12, 4]\n', 1) or "x = 1")
    rc, _, err = run_cli(sweep.main, [spec, "--out", tmp_path / "o"])
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "o").exists()


def test_other_commands_one_line_errors(tmp_path, no_data):
    rc, _, err = run_cli(aggregate.main, [tmp_path / "nowhere"])
    assert_one_line_error(rc, err, "no such run folder", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(aggregate.main, [tmp_path / "empty"])
    assert_one_line_error(rc, err, "no run folders")
    rc, _, err = run_cli(stability.main, [tmp_path / "empty"])
    assert_one_line_error(rc, err, "no run folders")
    for extra, needle in (
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--budget", "-1"], "--budget must be > 0"),
        (["--cells", "fmnist-nope"], "unknown cell(s) ['fmnist-nope']"),
    ):
        rc, _, err = run_cli(reproduce.main, ["table2", "--out", tmp_path / "rep"] + extra)
        assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "rep").exists()


# --- the file system -----------------------------------------------------------------------------


def _chmod_effective(folder: Path) -> bool:
    try:
        (folder / "probe").write_text("x")
    except PermissionError:
        return True
    (folder / "probe").unlink()
    return False


def test_read_only_run_folder(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if not _chmod_effective(parent):
            pytest.skip("chmod does not stop this user (root): see the simulated EACCES test")
        rc, _, err = run_cli(train.main, tiny_args() + ["--out", parent / "run"])
        assert_one_line_error(rc, err, "no permission to write", str(parent / "run"))
        assert not (parent / "run").exists()
    finally:
        parent.chmod(0o700)


def test_permission_denied_simulated(tmp_path, monkeypatch):
    def denied(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(ckpt, "atomic_write", denied)
    rc, _, err = run_cli(train.main, tiny_args() + ["--out", tmp_path / "run"])
    assert_one_line_error(rc, err, "no permission to write", str(tmp_path / "run"), "Permission denied")


def test_disk_full_at_the_start(tmp_path, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "atomic_write", full)
    rc, _, err = run_cli(train.main, tiny_args() + ["--out", tmp_path / "run"])
    assert_one_line_error(rc, err, "no space left on the device", "--resume")


def test_disk_full_mid_run_keeps_last_checkpoint_and_resumes(tmp_path, monkeypatch):
    real = ckpt.atomic_write
    d = tmp_path / "run"

    def full_at_epoch_2(path, data):
        if Path(path).name == "checkpoint.msgpack" and ckpt.decode(data)[0]["epoch"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write", full_at_epoch_2)
    rc, _, err = run_cli(train.main, tiny_args(epochs=3) + ["--out", d])
    assert_one_line_error(rc, err, "no space left on the device", str(d / "checkpoint.msgpack"), "--resume")
    meta, _ = checkpoint_arrays(d)
    assert meta["epoch"] == 1 and metrics(d) == meta["history"]
    s = summary(d)
    assert s["status"] == "failed" and "No space left" in s["message"] and s["epochs_done"] == 1
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(ckpt, "atomic_write", real)
    rc, _, err = run_cli(train.main, ["--resume", "--out", d, "--no-progress"])
    assert rc == 0, err
    rc, _, err = run_cli(train.main, tiny_args(epochs=3) + ["--out", tmp_path / "straight"])
    assert rc == 0, err
    assert strip_time(metrics(d)) == strip_time(metrics(tmp_path / "straight"))
    assert_same_arrays(checkpoint_arrays(d)[1], checkpoint_arrays(tmp_path / "straight")[1])
