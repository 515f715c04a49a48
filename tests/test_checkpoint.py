"""Checkpoints without pickle (experiments.checkpoint): nothing in a checkpoint file can
execute, a checkpoint that does not fit the run is refused before anything changes,
writes cannot be redirected, and dendritic masks are stored as packed bits."""

import errno
import json
import os
import pickle
import tempfile
from pathlib import Path

import jax
import msgpack
import numpy as np
import pytest
from exp_helpers import (  # noqa: F401  (fixtures)
    assert_one_line_error,
    assert_same_arrays,
    checkpoint_arrays,
    finished,
    metrics,
    run_cli,
    run_copy,
    snapshot,
    summary,
    tiny,
    tiny_args,
)
from flax import serialization

import ep_jax
from experiments import checkpoint as ckpt
from experiments import engine, train


class Touch:
    """Unpickling this creates `path` (what a malicious pickle could do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_touch_payload_really_executes_under_pickle(tmp_path):
    """The payload used below is live: plain pickle.loads creates the file."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Touch(marker)))
    assert marker.exists()


def outer(meta="{}", state=b"", **kw):
    return msgpack.packb(
        {"format": ckpt.FORMAT, "version": ckpt.VERSION, "meta": meta, "state": state, **kw}, use_bin_type=True
    )


def payloads(marker, meta):
    """Crafted files; `meta` is the run's real metadata, so the config check passes and the
    state itself is decoded."""
    evil = pickle.dumps(Touch(marker))
    obj_array = msgpack.packb(((3,), b"O", b"\0" * 24), use_bin_type=False)  # an object-dtype array
    return {
        "raw pickle": evil,
        "pickle as the state": outer(meta, evil),
        "pickle as the meta": outer(evil, b""),
        "pickle in an ext type": outer(meta, msgpack.packb({"sweep": msgpack.ExtType(99, evil)}, use_bin_type=True)),
        "object-dtype array": outer(meta, msgpack.packb({"sweep": msgpack.ExtType(1, obj_array)}, use_bin_type=True)),
    }


@pytest.mark.parametrize(
    "kind", ["raw pickle", "pickle as the state", "pickle as the meta", "pickle in an ext type", "object-dtype array"]
)
def test_pickle_payload_refused_nothing_executes(run_copy, tmp_path, kind):
    marker = tmp_path / "pwned"
    meta = json.dumps(ckpt.read_meta(run_copy / "checkpoint.msgpack"))
    (run_copy / "checkpoint.msgpack").write_bytes(payloads(marker, meta)[kind])
    before = snapshot(run_copy)
    rc, _, err = run_cli(train.main, ["--resume", "--out", run_copy, "--epochs", "3"])
    line = assert_one_line_error(rc, err, "checkpoint.msgpack")
    assert "not an ep_jax checkpoint" in line or "damaged checkpoint" in line or "does not fit" in line, line
    assert not marker.exists()
    assert snapshot(run_copy) == before
    # the library readers refuse it the same way
    with pytest.raises(ckpt.CheckpointError):
        engine.load_run(run_copy)
    assert not marker.exists()


def test_pickle_checkpoint_pkl_is_never_opened(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    (run_copy / "checkpoint.pkl").write_bytes(pickle.dumps(Touch(marker)))
    rc, _, err = run_cli(train.main, ["--resume", "--out", run_copy, "--epochs", "3", "--no-progress"])
    assert rc == 0, err  # resumed from checkpoint.msgpack; the .pkl is ignored
    assert not marker.exists()
    (run_copy / "checkpoint.msgpack").unlink()
    before = snapshot(run_copy)
    rc, _, err = run_cli(train.main, ["--resume", "--out", run_copy, "--epochs", "4"])
    assert_one_line_error(rc, err, "no checkpoint to resume from")
    assert not marker.exists() and snapshot(run_copy) == before


def test_resume_never_calls_pickle(run_copy, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    rc, _, err = run_cli(train.main, ["--resume", "--out", run_copy, "--epochs", "3", "--no-progress"])
    assert rc == 0, err
    assert engine.load_run(run_copy)[-1]["epoch"] == 3


# --- checkpoints that do not fit the run ------------------------------------------------------


def rewrite(path, edit_state=None, edit_outer=None):
    """Decode a real checkpoint, edit its raw state dict and/or outer map, write it back."""
    o = msgpack.unpackb(path.read_bytes(), raw=False)
    sd = serialization.msgpack_restore(o["state"])
    if edit_state:
        edit_state(sd)
    o["state"] = serialization.msgpack_serialize(sd)
    if edit_outer:
        edit_outer(o)
    path.write_bytes(msgpack.packb(o, use_bin_type=True))


def _params(sd):
    return sd["sweep"]["train"]["params"]


def _set(d, key, value):
    d[key] = value


BAD = {
    "extra key": (lambda sd: _set(_params(sd), "evil", np.zeros(3, np.float32)), None, "unexpected"),
    "missing key": (lambda sd: _params(sd)["basal"]["1"].pop("c"), None, "missing"),
    "wrong shape": (
        lambda sd: _set(_params(sd)["basal"]["0"], "w", np.zeros((16, 97), np.float32)),
        None,
        "float32[16, 97], this run needs float32[16, 96]",
    ),
    "wrong dtype": (
        lambda sd: _set(_params(sd)["basal"]["0"], "w", np.zeros((16, 96), np.float64)),
        None,
        "float64[16, 96], this run needs float32[16, 96]",
    ),
    "int step as float": (lambda sd: _set(sd["sweep"]["train"], "step", np.float32(12)), None, "this run needs int32"),
    "unpacked mask": (
        lambda sd: _set(sd["sweep"]["train"]["buffers"]["masks"]["basal"], "0", np.ones((16, 96), np.float32)),
        None,
        "mask of shape",
    ),
    "short mask": (
        lambda sd: _set(sd["sweep"]["train"]["buffers"]["masks"]["basal"], "0", np.zeros(100, np.uint8)),
        None,
        "mask of shape",
    ),
    "newer version": (None, lambda o: _set(o, "version", ckpt.VERSION + 1), f"checkpoint version {ckpt.VERSION + 1}"),
    "other format": (None, lambda o: _set(o, "format", "something-else"), "not an ep_jax checkpoint"),
    "meta not JSON": (None, lambda o: _set(o, "meta", "{not json"), "damaged checkpoint"),
    "truncated": (None, None, "unreadable"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_checkpoint_that_does_not_fit_refused_untouched(run_copy, case):
    edit_state, edit_outer, needle = BAD[case]
    path = run_copy / "checkpoint.msgpack"
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:-500])
    else:
        rewrite(path, edit_state, edit_outer)
    before = snapshot(run_copy)
    rc, _, err = run_cli(train.main, ["--resume", "--out", run_copy, "--epochs", "3"])
    assert_one_line_error(rc, err, str(path), needle)
    assert snapshot(run_copy) == before


def test_unedited_rewrite_still_loads(run_copy):
    """The rewriting helper itself changes nothing (so the refusals above are the edits')."""
    _, before = checkpoint_arrays(run_copy)
    rewrite(run_copy / "checkpoint.msgpack")
    assert_same_arrays(checkpoint_arrays(run_copy)[1], before)
    rc, _, err = run_cli(train.main, ["--resume", "--out", run_copy, "--epochs", "3", "--no-progress"])
    assert rc == 0, err


# --- writes -------------------------------------------------------------------------------

PREDICTABLE = ["{f}.tmp", ".{f}.tmp", "{f}.new", "{f}~", ".{f}", "{stem}.tmp", "{f}.part", "tmp", ".tmp"]


def test_symlinks_at_predictable_temp_names_do_not_redirect_writes(run_copy, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    files = ["checkpoint.msgpack", "metrics.jsonl", "summary.json", "config.json", "learning_curve.png"]
    planted = set()
    for f in files:
        for pattern in PREDICTABLE:
            name = pattern.format(f=f, stem=f.split(".")[0])
            if not (run_copy / name).exists() and name not in planted:
                (run_copy / name).symlink_to(victim)
                planted.add(name)
    rc, _, err = run_cli(train.main, ["--resume", "--out", run_copy, "--epochs", "3", "--no-progress"])
    assert rc == 0, err
    assert victim.read_text() == "precious"
    for name in planted:
        assert (run_copy / name).is_symlink() and os.readlink(run_copy / name) == str(victim)
    for f in files:
        assert not (run_copy / f).is_symlink()
    assert [r["epoch"] for r in metrics(run_copy)] == [1, 2, 3]
    assert not [p for p in run_copy.iterdir() if p.name.endswith(".tmp") and not p.is_symlink()]


def test_even_a_guessed_mkstemp_name_is_not_followed(tmp_path, monkeypatch):
    """mkstemp opens with O_EXCL: a symlink at the very name it tries first is skipped."""
    if not hasattr(tempfile, "_get_candidate_names"):
        pytest.skip("this Python's tempfile has no _get_candidate_names to steer")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    d = tmp_path / "run"
    d.mkdir()
    (d / ".checkpoint.msgpack.GUESSED.tmp").symlink_to(victim)
    names = iter(["GUESSED", "other"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    ckpt.atomic_write(d / "checkpoint.msgpack", b"new content")
    assert victim.read_text() == "precious"
    assert (d / "checkpoint.msgpack").read_bytes() == b"new content"
    assert (d / ".checkpoint.msgpack.GUESSED.tmp").is_symlink()


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.msgpack"
    path.write_bytes(b"old")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        ckpt.atomic_write(path, b"new" * 1000)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.msgpack"]


# --- masks as packed bits -----------------------------------------------------------------


def test_masks_stored_as_packed_bits(finished):
    cfg = tiny()
    model = engine.build_model(cfg)
    est = engine.build_estimator(cfg)
    init = ep_jax.init_state(
        model, est, engine.build_optimizer(cfg, model), engine.keys(cfg)["init"], **engine.model_settings(cfg)
    )
    _, sd = ckpt.decode((finished / "checkpoint.msgpack").read_bytes())
    stored = sd["sweep"]["train"]["buffers"]["masks"]
    want = serialization.to_state_dict(init.buffers["masks"])
    n_masks = 0
    for (path, bits), (_, ref) in zip(
        jax.tree_util.tree_flatten_with_path(stored)[0], jax.tree_util.tree_flatten_with_path(want)[0], strict=True
    ):
        ref = np.asarray(ref)
        assert bits.dtype == np.uint8 and bits.ndim == 1 and bits.size == -(-ref.size // 8), path
        np.testing.assert_array_equal(np.unpackbits(bits, count=ref.size).reshape(ref.shape), ref != 0)
        assert set(np.unique(ref).tolist()) <= {0.0, 1.0} and 0 < ref.mean() < 1
        n_masks += ref.size
    assert n_masks > 0
    # restored through the engine: the masks the run trained with (every mask, as 0/1 floats)
    buffers = engine.load_run(finished)[4]
    for a, b in zip(jax.tree.leaves(buffers["masks"]), jax.tree.leaves(init.buffers["masks"]), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_checkpoint_meta_and_history(finished):
    meta = ckpt.read_meta(finished / "checkpoint.msgpack")
    assert meta["epoch"] == 2 and meta["digest"] == tiny().digest() and meta["history"] == metrics(finished)
    assert summary(finished)["status"] == "ok"
