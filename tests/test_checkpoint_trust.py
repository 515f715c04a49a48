"""Checkpoints are not trusted (issue 21): a damaged or hand-edited checkpoint is refused
on --resume with one `error:` line naming the file, before anything in the run folder
changes. Covered: the content digest (format version 2; version-1 files still load),
the values the config and seed fix, finite parameters, a live member's flags, the step
counter against the history, and the metadata's fields."""

import copy
import hashlib
import json
import shutil

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
    strip_time,
    summary,
    tiny,
    tiny_args,
)
from flax import serialization

from experiments import checkpoint as ckpt
from experiments import engine, train

CK = "checkpoint.msgpack"


@pytest.fixture(scope="module")
def template(finished):
    """The member tree the engine restores a TINY checkpoint into (fresh state of the config)."""
    g = engine.Group([engine.Member(tiny(), "run", finished)])
    state, rx = g.initial()
    return engine._member_tree(state, rx, 0)


def rewrite(run, edit_state=None, edit_meta=None):
    """Decode the run's checkpoint, edit the raw state dict (masks as stored: packed bits)
    and/or the metadata in place, and write it back with a valid content digest."""
    path = run / CK
    meta, sd = ckpt.decode(path.read_bytes())
    if edit_state:
        edit_state(sd)
    if edit_meta:
        edit_meta(meta)
    path.write_bytes(ckpt.encode(sd, meta, packed=True))


def resume_refused(run, *needles):
    """--resume --epochs 3 ends in one error line naming the checkpoint (and `needles`),
    exit status 2, the run folder byte for byte as it was."""
    before = snapshot(run)
    rc, _, err = run_cli(train.main, ["--resume", "--out", run, "--epochs", "3", "--no-progress"])
    line = assert_one_line_error(rc, err, str(run / CK), *needles)
    assert snapshot(run) == before
    return line


def _train(sd):
    return sd["sweep"]["train"]


def _params(sd):
    return _train(sd)["params"]


def _hp(sd):
    return _train(sd)["opt_state"]["hyperparams"]


class At:
    """A leaf of the raw state dict by its keys (`At("sweep", "train", "step")`)."""

    def __init__(self, *keys):
        self.keys = keys

    def parent(self, sd):
        for k in self.keys[:-1]:
            sd = sd[k]
        return sd

    def get(self, sd):
        return self.parent(sd)[self.keys[-1]]

    def set(self, value):
        """An edit replacing the leaf by `value`."""

        def edit(sd):
            self.parent(sd)[self.keys[-1]] = value

        return edit

    def set_entry(self, index, value):
        """An edit changing one entry of the leaf's array."""

        def edit(sd):
            a = np.array(self.get(sd))
            assert a[index] != value
            a[index] = value
            self.parent(sd)[self.keys[-1]] = a

        return edit

    def flip_bit(self, index):
        """An edit flipping the lowest bit of one byte (a packed mask: one mask entry)."""

        def edit(sd):
            a = np.array(self.get(sd))
            a[index] ^= 1
            self.parent(sd)[self.keys[-1]] = a

        return edit


def both(*edits):
    def edit(sd):
        for e in edits:
            e(sd)

    return edit


W0 = At("sweep", "train", "params", "basal", "0", "w")
MOMENT = At("sweep", "train", "opt_state", "inner_state", "0", "trace", "basal", "1", "c")
STEP = At("sweep", "train", "step")
COUNT = At("sweep", "train", "opt_state", "count")
MASK0 = At("sweep", "train", "buffers", "masks", "basal", "0")  # packed bits as stored

STATE_CASES = {
    "nan weight": (
        W0.set_entry((3, 4), np.nan),
        ["non-finite parameters", "sweep.train.params.basal.0.w", "1 of 1536", "nan"],
    ),
    "inf weight": (W0.set_entry((0, 0), -np.inf), ["non-finite parameters", "sweep.train.params.basal.0.w", "-inf"]),
    "inf momentum": (
        MOMENT.set_entry(5, np.inf),
        ["non-finite optimiser state", "sweep.train.opt_state.inner_state.0.trace.basal.1.c"],
    ),
    "not alive": (At("sweep", "alive").set(np.bool_(False)), ["sweep.alive is False", "live member"]),
    "negative step": (STEP.set(np.int32(-1000)), ["sweep.train.step is -1000, must be >= 0"]),
    "diverged step": (
        At("sweep", "diverged_step").set(np.int32(5)),
        ["sweep.diverged_step is 5, a live member's is -1"],
    ),
    "beta": (At("relaxation", "beta").set(np.float32(1e6)), ["relaxation.beta is 1e+06, the config says 0.2"]),
    "beta one ulp off": (
        At("relaxation", "beta").set(np.nextafter(np.float32(0.2), np.float32(1))),
        ["relaxation.beta is 0.20000002, the config says 0.2"],
    ),
    "dt": (At("relaxation", "dt", "0").set(np.float32(0.5)), ["relaxation.dt.0 is 0.5, the config says 1"]),
    "learning rates": (
        At("sweep", "train", "opt_state", "hyperparams", "lr").set(np.array([-5, 1e9], np.float32)),
        ["sweep.train.opt_state.hyperparams.lr is [-5, 1e+09], the config says [0.2, 0.1]"],
    ),
    "momentum": (
        At("sweep", "train", "opt_state", "hyperparams", "momentum").set(np.float32(0.99)),
        ["sweep.train.opt_state.hyperparams.momentum is 0.99, the config says 0.9"],
    ),
    "alpha": (
        At("sweep", "train", "buffers", "alpha").set(np.float32(0.5)),
        ["sweep.train.buffers.alpha is 0.5, the config says 0.2"],
    ),
    "mask": (MASK0.flip_bit(7), ["sweep.train.buffers.masks.basal.0 differs from the config's in 1 of 1536 entries"]),
    "step key": (At("sweep", "key").set_entry(0, 12345), ["sweep.key is [12345, "]),
    "optimiser count": (
        COUNT.set(np.int32(11)),
        ["sweep.train.opt_state.count is 11, the step counter sweep.train.step is 12"],
    ),
    "step not the history's": (
        both(STEP.set(np.int32(11)), COUNT.set(np.int32(11))),
        ["sweep.train.step is 11", "the history's last row (epoch 2) says steps=12"],
    ),
}


# the findings of issue 21, through the command (each resume builds its template: ~5-10 s)
RESUMED = ["nan weight", "not alive", "negative step", "beta", "learning rates"]


@pytest.mark.parametrize("case", RESUMED)
def test_damaged_state_refused_by_resume_untouched(run_copy, case):
    edit, needles = STATE_CASES[case]
    rewrite(run_copy, edit_state=edit)
    resume_refused(run_copy, *needles)


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_damaged_state_refused_by_load(run_copy, template, case):
    """Every case through `checkpoint.load` itself (what --resume and load_run call)."""
    edit, needles = STATE_CASES[case]
    rewrite(run_copy, edit_state=edit)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load(run_copy / CK, template)
    line = str(e.value)
    assert line.startswith(f"{run_copy / CK}: ") and "\n" not in line, line
    for n in needles:
        assert n in line, (n, line)


def _drop(key):
    return lambda m: m.pop(key)


def _put(key, value):
    return lambda m: m.__setitem__(key, value)


def _row(i, key, value):
    def edit(m):
        if value is _MISSING:
            m["history"][i].pop(key)
        else:
            m["history"][i][key] = value

    return edit


_MISSING = object()

META_CASES = {
    "epoch negative": (_put("epoch", -5), ["epoch is -5, must be an integer >= 0"]),
    "epoch a string": (_put("epoch", "abc"), ["epoch is 'abc'"]),
    "epoch a bool": (_put("epoch", True), ["epoch is True"]),
    "epoch a float": (_put("epoch", 2.0), ["epoch is 2.0"]),
    "epoch missing": (_drop("epoch"), ["epoch is missing"]),
    "epoch beyond the history": (_put("epoch", 3), ["history has 2 rows, epoch is 3"]),
    "history not a list": (_put("history", {"a": 1}), ["history is {'a': 1}, must be a list"]),
    "history missing": (_drop("history"), ["history is missing"]),
    "history short": (lambda m: m["history"].pop(), ["history has 1 rows, epoch is 2"]),
    "row not a table": (lambda m: m["history"].__setitem__(1, [1, 2]), ["history[1] is [1, 2], must be a table"]),
    "row epoch wrong": (_row(1, "epoch", 7), ["history[1].epoch is 7, must be 2"]),
    "row steps missing": (_row(0, "steps", _MISSING), ["history[0].steps is missing"]),
    "row steps decrease": (_row(1, "steps", 3), ["history[1].steps is 3, must be an integer >= 6"]),
    "row accuracy a string": (_row(0, "test_acc", "high"), ["history[0].test_acc is 'high', must be a number"]),
    "row loss missing": (_row(1, "loss", _MISSING), ["history[1].loss is missing"]),
    "digest not a string": (_put("digest", 5), ["digest is 5, must be a string"]),
    "name missing": (_drop("name"), ["name is missing"]),
    "name not a string": (_put("name", ["x"]), ["name is ['x'], must be a string"]),
    "long value cut short": (_put("name", 10**200), ["name is 1000000000", "..., must be a string"]),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_damaged_metadata_refused_untouched(run_copy, case):
    edit, needles = META_CASES[case]
    rewrite(run_copy, edit_meta=edit)
    resume_refused(run_copy, "damaged checkpoint metadata", *needles)
    with pytest.raises(ckpt.CheckpointError, match="damaged checkpoint metadata"):
        ckpt.read_meta(run_copy / CK)
    assert ckpt.read_meta(run_copy / CK, check=False) is not None  # raw access still reads it


def test_history_steps_not_the_state_refused(run_copy):
    """A history whose last row claims another step count than the stored counter."""
    rewrite(run_copy, edit_meta=_row(1, "steps", 13))
    resume_refused(run_copy, "sweep.train.step is 12, the history's last row (epoch 2) says steps=13")


# --- the content digest -----------------------------------------------------------------------


def _w0_offset(data: bytes, sd) -> int:
    """Where the first weight matrix's bytes lie in the file (exactly once)."""
    raw = np.ascontiguousarray(W0.get(sd)).tobytes()
    at = data.find(raw)
    assert at > 0 and data.find(raw, at + 1) == -1
    return at


def test_written_digests_are_the_sha256_of_meta_and_state(finished):
    o = msgpack.unpackb((finished / CK).read_bytes(), raw=False)
    assert o["version"] == ckpt.VERSION == 2
    assert o["sha256"] == {
        "meta": hashlib.sha256(o["meta"].encode()).hexdigest(),
        "state": hashlib.sha256(o["state"]).hexdigest(),
    }


def test_flipped_bit_in_a_weight_refused_untouched(run_copy):
    """The lowest mantissa bit of one weight: still finite, same layout; only the digest sees it."""
    path = run_copy / CK
    data = bytearray(path.read_bytes())
    at = _w0_offset(bytes(data), ckpt.decode(bytes(data))[1])
    data[at + 4 * 17] ^= 1
    path.write_bytes(bytes(data))
    assert np.isfinite(W0.get(ckpt.decode(bytes(data), verify=False)[1])).all()
    resume_refused(run_copy, "damaged checkpoint", "content digest mismatch")


def test_edited_meta_text_without_its_digest_refused(run_copy):
    path = run_copy / CK
    o = msgpack.unpackb(path.read_bytes(), raw=False)
    o["meta"] = o["meta"].replace('"epoch": 2', '"epoch": 1', 1)
    assert '"epoch": 1' in o["meta"]
    path.write_bytes(msgpack.packb(o, use_bin_type=True))
    resume_refused(run_copy, "content digest mismatch", "metadata")


@pytest.mark.parametrize("sums", [None, {"meta": "0" * 64}, {"meta": "xyz", "state": "0" * 64}, "abc"])
def test_missing_or_malformed_digest_refused(run_copy, sums):
    path = run_copy / CK
    o = msgpack.unpackb(path.read_bytes(), raw=False)
    if sums is None:
        del o["sha256"]
    else:
        o["sha256"] = sums
    path.write_bytes(msgpack.packb(o, use_bin_type=True))
    resume_refused(run_copy, "damaged checkpoint")


def test_every_flipped_bit_is_refused(finished, template, tmp_path):
    """Bit 0 of every byte of the framing, the metadata and the digests, and of every 61st
    byte of the arrays: each file is refused by `read_meta` or `load` with CheckpointError
    (never accepted, never another exception)."""
    data = (finished / CK).read_bytes()
    o = msgpack.unpackb(data, raw=False)
    meta_end = data.find(o["meta"].encode()) + len(o["meta"])
    state_end = data.find(o["state"]) + len(o["state"])
    positions = (
        list(range(meta_end + 16)) + list(range(meta_end + 16, state_end, 61)) + list(range(state_end, len(data)))
    )
    path = tmp_path / CK
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 1
        path.write_bytes(bytes(bad))
        with pytest.raises(ckpt.CheckpointError, match=str(path)):
            ckpt.read_meta(path)
            ckpt.load(path, template)
    path.write_bytes(data)
    ckpt.load(path, template)  # the unflipped file is fine


# --- what still works -------------------------------------------------------------------------


def test_rewrite_helper_is_faithful(run_copy):
    """An unedited rewrite gives the same bytes (so the refusals above are the edits')."""
    before = (run_copy / CK).read_bytes()
    rewrite(run_copy)
    assert (run_copy / CK).read_bytes() == before


@pytest.mark.slow
def test_undamaged_checkpoint_resumes_bit_for_bit(run_copy, tmp_path):
    """Version 2 after an unedited rewrite, and the same checkpoint as version 1: both
    continue exactly as an uninterrupted 3-epoch run."""
    rewrite(run_copy)
    v1 = tmp_path / "v1"
    shutil.copytree(run_copy, v1)
    write_version_1(v1)
    for d in (run_copy, v1):
        rc, _, err = run_cli(train.main, ["--resume", "--out", d, "--epochs", "3", "--no-progress"])
        assert rc == 0, err
    rc, _, err = run_cli(train.main, tiny_args(epochs=3) + ["--out", tmp_path / "straight"])
    assert rc == 0, err
    for d in (run_copy, v1):
        assert strip_time(metrics(d)) == strip_time(metrics(tmp_path / "straight"))
        assert_same_arrays(checkpoint_arrays(d)[1], checkpoint_arrays(tmp_path / "straight")[1])
        assert summary(d)["status"] == "ok"
        assert ckpt.read_meta(d / CK)["history"][-1]["steps"] == 18


def write_version_1(run):
    """The run's checkpoint in the version-1 layout (ep_jax 0.2.0 before the digest)."""
    path = run / CK
    o = msgpack.unpackb(path.read_bytes(), raw=False)
    path.write_bytes(
        msgpack.packb({"format": ckpt.FORMAT, "version": 1, "meta": o["meta"], "state": o["state"]}, use_bin_type=True)
    )


def test_version_1_checkpoint_still_loads(run_copy, finished, template):
    _, want = checkpoint_arrays(finished)
    write_version_1(run_copy)
    assert msgpack.unpackb((run_copy / CK).read_bytes(), raw=False)["version"] == 1
    meta, tree = ckpt.load(run_copy / CK, template)
    assert meta == ckpt.read_meta(run_copy / CK) == ckpt.read_meta(finished / CK)
    _, stored = ckpt.load(finished / CK, template)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(stored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_same_arrays(checkpoint_arrays(run_copy)[1], want)


def test_version_1_checkpoint_resumes_and_is_rewritten_as_version_2(run_copy):
    write_version_1(run_copy)
    rc, _, err = run_cli(train.main, ["--resume", "--out", run_copy, "--epochs", "3", "--no-progress"])
    assert rc == 0, err
    assert [r["epoch"] for r in metrics(run_copy)] == [1, 2, 3]
    assert msgpack.unpackb((run_copy / CK).read_bytes(), raw=False)["version"] == 2
    assert ckpt.read_meta(run_copy / CK)["history"] == metrics(run_copy)


def test_version_1_gets_every_check_but_the_digest(run_copy, template):
    """No digest to verify: a 1-ulp change of a weight is read as written; a value the
    config refuses is still refused; a version-1 file never had a sha256 entry."""
    path = run_copy / CK
    meta, sd = ckpt.decode(path.read_bytes())
    ulp = copy.deepcopy(sd)
    W0.set_entry((0, 0), np.nextafter(W0.get(sd)[0, 0], np.float32(9)))(ulp)
    beta = copy.deepcopy(sd)
    At("relaxation", "beta").set(np.float32(1e6))(beta)

    def v1(state, **extra):
        return msgpack.packb(
            {
                "format": ckpt.FORMAT,
                "version": 1,
                "meta": json.dumps(meta),
                "state": serialization.msgpack_serialize(state),
                **extra,
            },
            use_bin_type=True,
        )

    path.write_bytes(v1(ulp))
    _, tree = ckpt.load(path, template)
    assert np.asarray(tree["sweep"].train.params["basal"][0]["w"])[0, 0] == W0.get(ulp)[0, 0]
    path.write_bytes(v1(beta))
    with pytest.raises(ckpt.CheckpointError, match="relaxation.beta is 1e"):
        ckpt.load(path, template)
    path.write_bytes(v1(sd, sha256={"meta": "0" * 64, "state": "0" * 64}))
    with pytest.raises(ckpt.CheckpointError, match="damaged checkpoint"):
        ckpt.read_meta(path)


@pytest.mark.parametrize("version", [3, 0, "2", True])
def test_other_versions_refused_untouched(run_copy, version):
    path = run_copy / CK
    o = msgpack.unpackb(path.read_bytes(), raw=False)
    o["version"] = version
    path.write_bytes(msgpack.packb(o, use_bin_type=True))
    resume_refused(run_copy, f"checkpoint version {version!r}", "this ep_jax reads versions 1, 2")


def test_check_false_gives_raw_access(run_copy, template):
    """`check=False` restores a checkpoint the checks refuse (digest and layout still checked)."""
    rewrite(run_copy, edit_state=At("relaxation", "beta").set(np.float32(1e6)))
    with pytest.raises(ckpt.CheckpointError, match="relaxation.beta"):
        ckpt.load(run_copy / CK, template)
    _, tree = ckpt.load(run_copy / CK, template, check=False)
    assert float(tree["relaxation"].beta) == 1e6


def test_epoch_0_checkpoint_must_be_at_step_0(run_copy, template):
    def epoch_0(m):
        m["epoch"], m["history"] = 0, []

    rewrite(run_copy, edit_meta=epoch_0)
    assert ckpt.read_meta(run_copy / CK)["epoch"] == 0  # fine as metadata
    with pytest.raises(ckpt.CheckpointError, match=r"sweep\.train\.step is 12, a checkpoint of epoch 0 is at step 0"):
        ckpt.load(run_copy / CK, template)


def test_check_state_on_any_tree():
    """The rules go by leaf names, so they apply to other layouts too (an Adam state here)."""
    template = {
        "train": {
            "params": {"w": np.zeros(3, np.float32)},
            "step": np.int32(0),
            "opt_state": {
                "count": np.int32(0),
                "hyperparams": {"lr": np.float32(0.1)},
                "mu": np.zeros(3, np.float32),
                "nu": np.zeros(3, np.float32),
            },
        }
    }
    good = copy.deepcopy(template)
    good["train"]["step"] = good["train"]["opt_state"]["count"] = np.int32(4)
    good["train"]["opt_state"]["nu"] = np.ones(3, np.float32)
    ckpt.check_state(good, template)
    cases = [
        (("opt_state", "nu"), np.array([1, -1, 1], np.float32), "train.opt_state.nu (second moments)"),
        (("opt_state", "mu"), np.array([0, np.nan, 0], np.float32), "non-finite optimiser state"),
        (("opt_state", "hyperparams", "lr"), np.float32(0.2), "lr is 0.2, the config says 0.1"),
        (("opt_state", "count"), np.int32(3), "train.opt_state.count is 3, the step counter train.step is 4"),
        (("params", "w"), np.array([0, 0, np.inf], np.float32), "non-finite parameters (train.params.w"),
    ]
    for keys, value, needle in cases:
        bad = copy.deepcopy(good)
        node = bad["train"]
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        with pytest.raises(ckpt.CheckpointError) as e:
            ckpt.check_state(bad, template, source="c")
        assert str(e.value).startswith("c: ") and needle in str(e.value), (needle, str(e.value))


def test_drawn_time_steps_allow_a_few_ulps_and_no_more():
    """Vector dt entries (drawn from a distribution) may be rounded differently by another
    backend: within `ULPS` units in the last place they pass, beyond that they are refused."""
    dt = np.linspace(0.1, 0.9, 5).astype(np.float32)
    template = {"relaxation": {"beta": np.float32(0.2), "dt": {"0": dt, "1": np.float32(1.0)}}}
    near = copy.deepcopy(template)
    near["relaxation"]["dt"]["0"] = dt + ckpt.ULPS * np.spacing(dt)
    ckpt.check_state(near, template)
    far = copy.deepcopy(template)
    far["relaxation"]["dt"]["0"] = dt + (ckpt.ULPS + 2) * np.spacing(dt)
    with pytest.raises(ckpt.CheckpointError, match="relaxation.dt.0 is"):
        ckpt.check_state(far, template)
    scalar = copy.deepcopy(template)
    scalar["relaxation"]["dt"]["1"] = np.nextafter(np.float32(1.0), np.float32(2))
    with pytest.raises(ckpt.CheckpointError, match=r"relaxation\.dt\.1 is 1\.0000001, the config says 1$"):
        ckpt.check_state(scalar, template)
