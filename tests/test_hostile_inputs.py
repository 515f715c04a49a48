"""Files a hostile (or unlucky) user hands the commands: each ends in one `error:` line
naming the file, exit status 2, quickly — never a hang, a traceback, an allocation of what
a header declares, or a silent partial result (issue 29, "Reliability round 3").

Every bomb here is small: headers and streams that DECLARE huge sizes, never gigabytes on
disk or in memory."""

import io
import json
import os
import shutil
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exp_helpers import TINY, run_cli, tiny_args  # noqa: E402
from test_lease import fake_run, run_import  # noqa: E402

import ep_jax.data as D  # noqa: E402
from benchmarks import lease  # noqa: E402
from ep_jax import _safe_read as safe_read  # noqa: E402
from ep_jax.experiments import aggregate, engine, import_lease, stability, sweep, train  # noqa: E402
from ep_jax.experiments import checkpoint as ckpt  # noqa: E402
from ep_jax.experiments.config import RunConfig  # noqa: E402
from ep_jax.experiments.errors import RunError  # noqa: E402
from ep_jax.experiments.presets import PRESETS  # noqa: E402


def one_line(rc, err, *needles):
    assert rc == 2, (rc, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def within(seconds, fn, *args):
    """`fn(*args)` in a daemon thread; fails (instead of hanging the suite) when it has not
    returned after `seconds`. Returns what it returned, re-raises what it raised."""
    box = {}

    def go():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 — handed to the caller
            box["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {seconds} s (waiting on a pipe?)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def free_fifo(path):
    """Unblock anything still waiting to open the FIFO `path` (a failing test's thread)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    except OSError:
        pass


# --- the one reader --------------------------------------------------------------------------


def test_read_regular_refuses_pipes_devices_folders_and_oversize(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    try:
        for path, needle in [(fifo, "named pipe"), (Path("/dev/zero"), "character device"), (tmp_path, "is a folder")]:
            with pytest.raises(RunError, match=needle) as e:
                within(10, safe_read.read_regular, path, 100, RunError, "checkpoint")
            assert str(path) in str(e.value) and "\n" not in str(e.value)
    finally:
        free_fifo(fifo)
    big = tmp_path / "big"
    with open(big, "wb") as f:  # sparse: declares 1 GiB, occupies nothing
        f.truncate(1 << 30)
    with pytest.raises(RunError, match=r"1\.0 GiB, more than a checkpoint can be"):
        safe_read.read_regular(big, 1 << 20, RunError, "checkpoint")
    ok = tmp_path / "ok"
    ok.write_bytes(b"x" * 100)
    assert safe_read.read_regular(ok, 100, RunError) == b"x" * 100
    with pytest.raises(FileNotFoundError):
        safe_read.read_regular(tmp_path / "missing", 100, RunError)


def zeros_gzip(n_bytes: int, head: bytes = b"") -> bytes:
    """A gzip stream of `head` then `n_bytes` zeros, built in 1 MiB steps (about 1 KB per
    MiB of zeros: a small file that would inflate beyond any bound)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out, chunk = [c.compress(head)], b"\0" * (1 << 20)
    for _ in range(n_bytes >> 20):
        out.append(c.compress(chunk))
    return b"".join(out) + c.flush()


def test_decompress_stops_at_its_bound():
    bomb = zeros_gzip(256 << 20)  # 256 MiB of zeros in ~250 KB
    assert len(bomb) < 1 << 20
    t = time.time()
    with pytest.raises(RunError, match="decompresses to more than 1.0 MiB"):
        safe_read.decompress(bomb, 1 << 20, "b.gz", RunError)
    assert time.time() - t < 5  # stopped early, not after inflating it all
    import gzip

    assert safe_read.decompress(gzip.compress(b"abc"), 3, "s") == b"abc"


# --- datasets ----------------------------------------------------------------------------------


def idx_header(dims) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)


def write_mnist(folder: Path, n=20, images=None):
    folder.mkdir(parents=True, exist_ok=True)
    import gzip

    for split in ("train", "t10k"):
        x = np.zeros((n, 28, 28), np.uint8)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_header(x.shape) + x.tobytes()))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_header((n,)) + bytes(n)))
    if images is not None:
        (folder / "train-images-idx3-ubyte.gz").write_bytes(images)
    return folder


def test_gzip_bomb_in_a_data_folder_stops_early_naming_the_file(tmp_path):
    # declares 60 001 images, and inflates to 256 MiB: more than any IDX file of a known dataset
    bomb = zeros_gzip(256 << 20, idx_header((60001, 28, 28)))
    d = write_mnist(tmp_path / "d", images=bomb)
    t = time.time()
    with pytest.raises(D.DatasetError, match="decompresses to more than") as e:
        D.load_dataset("mnist", data_dir=d)  # verify=True: the checksum comes after the bound
    assert time.time() - t < 10
    assert str(d / "train-images-idx3-ubyte.gz") in str(e.value) and "\n" not in str(e.value)


def test_idx_header_that_overflows_int64_names_the_file(tmp_path):
    d = write_mnist(tmp_path / "d")
    (d / "train-labels-idx1-ubyte.gz").unlink()
    (d / "train-labels-idx1-ubyte").write_bytes(idx_header((65536,) * 4) + bytes(16))
    with pytest.raises(D.DatasetError, match="needs 18446744073709551636") as e:
        D.load_dataset("mnist", data_dir=d, verify=False)
    assert str(d / "train-labels-idx1-ubyte") in str(e.value)


def test_idx_file_larger_than_the_dataset_allows(tmp_path):
    d = write_mnist(tmp_path / "d")
    big = d / "t10k-labels-idx1-ubyte"
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with open(big, "wb") as f:
        f.write(idx_header((1 << 30,)))
        f.truncate(8 + (1 << 30))  # sparse
    with pytest.raises(D.DatasetError, match="more than an IDX file can be") as e:
        D.load_dataset("mnist", data_dir=d, verify=False)
    assert str(big) in str(e.value)


def test_a_pipe_in_a_data_folder_is_not_waited_on(tmp_path):
    d = write_mnist(tmp_path / "d")
    (d / "t10k-images-idx3-ubyte.gz").unlink()
    fifo = d / "t10k-images-idx3-ubyte"
    os.mkfifo(fifo)
    try:
        with pytest.raises(D.DatasetError):  # not a complete set (a pipe is no file) or refused
            within(20, D.load_dataset, "mnist", d, True, "files", False)
        with pytest.raises(D.DatasetError, match="named pipe"):
            within(20, D.read_idx, fifo)
    finally:
        free_fifo(fifo)


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in arrays.items():
            z.writestr(name, data)
    return buf.getvalue()


def npy(a=None, descr="|u1", shape=(2, 28, 28), body=None) -> bytes:
    h = io.BytesIO()
    np.lib.format.write_array_header_1_0(h, {"descr": descr, "fortran_order": False, "shape": shape})
    return h.getvalue() + (body if body is not None else bytes(int(np.prod(shape))))


@pytest.mark.parametrize(
    "content,needle",
    [
        (npz_bytes({"arr_0.npy": npy(shape=(10**9, 28, 28), body=b"")}), "declares shape (1000000000, 28, 28)"),
        (npz_bytes({"arr_0.npy": npy(descr="|O", shape=(2,), body=b"")}), "Python objects"),
        (npz_bytes({"arr_0.npy": npy(), "evil.npy": npy()}), "expected the one array arr_0.npy"),
        ("big", "more than a kmnist-train-imgs.npz can hold"),  # 70 000 images, streamed
        (b"PK\x03\x04 not a zip", "cannot read the .npz file"),
    ],
    ids=["huge-shape", "object-dtype", "two-members", "inflates-past-bound", "not-a-zip"],
)
def test_npz_members_checked_before_allocation(tmp_path, content, needle):
    p = tmp_path / "kmnist-train-imgs.npz"
    if content == "big":  # 55 MB of zeros written in 1 MiB steps: ~55 KB on disk, never in memory
        with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z, z.open("arr_0.npy", "w", force_zip64=True) as f:
            f.write(npy(shape=(70000, 28, 28), body=b""))
            for _ in range(70000 * 784 >> 20):
                f.write(bytes(1 << 20))
    else:
        p.write_bytes(content)
    with pytest.raises(D.DatasetError, match=None) as e:
        D._read_npz(p, "images")
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_npz_round_trip(tmp_path):
    p = tmp_path / "a.npz"
    x = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    np.savez_compressed(p, arr_0=x)
    assert np.array_equal(D._read_npz(p, "images"), x)


def test_cifar_member_declaring_more_than_a_batch_is_refused(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        m = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
        m.size = 50 << 30  # declared only
        tf.addfile(m)
    (d / "cifar-10-binary.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(D.DatasetError, match="declares 53687091200 bytes") as e:
        D.load_dataset("cifar10", data_dir=d, verify=False)
    assert "cifar-10-binary.tar.gz" in str(e.value) and "\n" not in str(e.value)


def test_cifar_archive_bomb_stops_early(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "cifar-10-binary.tar.gz").write_bytes(zeros_gzip(256 << 20))
    t = time.time()
    with pytest.raises(D.DatasetError, match="decompresses to more than"):
        D.load_dataset("cifar10", data_dir=d, verify=False)
    assert time.time() - t < 10


# --- sweep specs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,text",
    [
        ("deep.json", "[" * 100_000 + "]" * 100_000),
        ("deep.toml", "a = " + "[" * 100_000 + "]" * 100_000),
        ("deept.toml", "a = " + "{b=" * 100_000 + "1" + "}" * 100_000),
    ],
    ids=["json", "toml-arrays", "toml-tables"],
)
def test_deeply_nested_spec_is_one_line(tmp_path, name, text):
    spec = tmp_path / name
    spec.write_text(text)
    rc, _, err = run_cli(sweep.main, [spec, "--out", tmp_path / "o"])
    one_line(rc, err, str(spec), "nested too deep")
    assert not (tmp_path / "o").exists()


def test_spec_that_is_a_pipe_is_not_waited_on(tmp_path):
    spec = tmp_path / "spec.toml"
    os.mkfifo(spec)
    try:
        rc, _, err = within(20, run_cli, sweep.main, [spec, "--out", tmp_path / "o"])
    finally:
        free_fifo(spec)
    one_line(rc, err, str(spec), "named pipe")


# --- run folders: pipes and devices ----------------------------------------------------------------


def tiny_run(d: Path, accs=(50.0, 60.0), status="ok", with_checkpoint=True, **changes) -> RunConfig:
    """A run folder as the engine leaves it: config, metrics, summary and (optionally) a
    checkpoint whose metadata is the run's (its config digest, its history)."""
    cfg = RunConfig.from_dict({**TINY, **changes})
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg.to_json()))
    rows = [
        {
            "epoch": i + 1,
            "train_acc": a - 1,
            "loss": 0.5,
            "test_acc": a,
            "test_loss": 0.6,
            "time_s": 1.0,
            "steps": 6 * (i + 1),
        }
        for i, a in enumerate(accs)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps(engine.summarize(rows, status)))
    if with_checkpoint:
        meta = {"epoch": len(rows), "digest": cfg.digest(), "name": d.name, "history": rows}
        ckpt.atomic_write(d / "checkpoint.msgpack", ckpt.encode({"w": np.zeros(3, np.float32)}, meta))
    return cfg


def test_read_meta_and_load_refuse_a_pipe_and_dev_zero(tmp_path):
    fifo = tmp_path / "checkpoint.msgpack"
    os.mkfifo(fifo)
    try:
        with pytest.raises(ckpt.CheckpointError, match="named pipe"):
            within(10, ckpt.read_meta, fifo)
        with pytest.raises(ckpt.CheckpointError, match="named pipe"):
            within(10, ckpt.load, fifo, {"w": np.zeros(3, np.float32)})
    finally:
        free_fifo(fifo)
    zero = tmp_path / "z" / "checkpoint.msgpack"
    zero.parent.mkdir()
    zero.symlink_to("/dev/zero")
    with pytest.raises(ckpt.CheckpointError, match="character device"):
        within(10, ckpt.read_meta, zero)


def test_checkpoint_larger_than_its_template_allows_is_not_read(tmp_path):
    p = tmp_path / "checkpoint.msgpack"
    with open(p, "wb") as f:
        f.truncate(200 << 20)  # sparse
    with pytest.raises(ckpt.CheckpointError, match="more than a checkpoint can be"):
        ckpt.load(p, {"w": np.zeros(3, np.float32)})


def test_train_resume_with_a_pipe_as_checkpoint_is_one_line(tmp_path):
    d = tmp_path / "r"
    tiny_run(d, status="interrupted", with_checkpoint=False, epochs=4)
    os.mkfifo(d / "checkpoint.msgpack")
    try:
        rc, _, err = within(60, run_cli, train.main, ["--out", d, "--resume", "--no-progress"])
    finally:
        free_fifo(d / "checkpoint.msgpack")
    one_line(rc, err, "checkpoint.msgpack", "named pipe")


@pytest.mark.parametrize("name", ["summary.json", "metrics.jsonl", "config.json"])
def test_aggregate_with_a_pipe_in_a_run_folder_is_one_line(tmp_path, name):
    d = tmp_path / "runs" / "a"
    tiny_run(d, with_checkpoint=False)
    (d / name).unlink()
    os.mkfifo(d / name)
    try:
        rc, _, err = within(30, run_cli, aggregate.main, [tmp_path / "runs"])
    finally:
        free_fifo(d / name)
    one_line(rc, err, str(d / name), "named pipe")


def test_aggregate_with_dev_zero_as_checkpoint_is_one_line(tmp_path):
    d = tmp_path / "runs" / "a"
    tiny_run(d, with_checkpoint=False)
    (d / "checkpoint.msgpack").symlink_to("/dev/zero")
    rc, _, err = within(30, run_cli, aggregate.main, [tmp_path / "runs"])
    one_line(rc, err, "checkpoint.msgpack", "character device")


# --- run folders: what is trusted -------------------------------------------------------------------


def test_aggregate_counts_a_consistent_run(tmp_path):
    tiny_run(tmp_path / "runs" / "a")
    rc, out, err = run_cli(aggregate.main, [tmp_path / "runs"])
    assert rc == 0, err
    assert "60.00" in out


@pytest.mark.parametrize("checkpointed", [True, False])
def test_aggregate_refuses_an_edited_summary(tmp_path, checkpointed):
    d = tmp_path / "runs" / "a"
    tiny_run(d, with_checkpoint=checkpointed)
    s = json.loads((d / "summary.json").read_text())
    s["final_test_acc"] = s["best_test_acc"] = 99.0
    (d / "summary.json").write_text(json.dumps(s))
    rc, out, err = run_cli(aggregate.main, [tmp_path / "runs"])
    one_line(rc, err, str(d / "summary.json"), "final_test_acc is 99.0, its metrics.jsonl says 60.0")
    assert "99" not in out


def test_aggregate_refuses_a_summary_copied_from_another_run(tmp_path):
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    tiny_run(a, accs=(50.0, 60.0))
    tiny_run(b, accs=(70.0, 90.0, 95.0), seed=1)
    shutil.copy(b / "summary.json", a / "summary.json")
    rc, _, err = run_cli(aggregate.main, [tmp_path / "runs"])
    one_line(rc, err, str(a / "summary.json"), "epochs_done is 3, its metrics.jsonl says 2")


def test_aggregate_refuses_metrics_that_are_not_the_checkpoints(tmp_path):
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    tiny_run(a, accs=(50.0, 60.0))
    tiny_run(b, accs=(70.0, 90.0), seed=1)
    for f in ("metrics.jsonl", "summary.json"):  # a consistent pair, of another run
        shutil.copy(b / f, a / f)
    rc, _, err = run_cli(aggregate.main, [tmp_path / "runs"])
    one_line(rc, err, str(a / "metrics.jsonl"), "epoch 1: train_acc is 69.0, the run's checkpoint says 49.0")


def hts_run(d: Path, lr, seed=0):
    values = {**PRESETS["mnist-hts-lognormal"], "dt_out": 0.25, "seed": seed}
    cfg = RunConfig.from_dict(values)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg.to_json()))
    rows = [
        {
            "epoch": i + 1,
            "train_acc": 90.0 + i,
            "loss": 0.1,
            "test_acc": 91.0 + i,
            "test_loss": 0.1,
            "time_s": 1.0,
            "steps": 100 * (i + 1),
        }
        for i in range(3)
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps(engine.summarize(rows, "ok")))
    meta = {"epoch": 3, "digest": cfg.digest(), "name": d.name, "history": rows}
    ckpt.atomic_write(d / "checkpoint.msgpack", ckpt.encode({"w": np.zeros(3, np.float32)}, meta))
    if lr is not None:  # edited after the run: another cell
        edited = {**cfg.to_json(), "lr": lr}
        (d / "config.json").write_text(json.dumps(edited))
    return cfg


def test_stability_refuses_a_config_edited_after_the_run(tmp_path):
    cfg = hts_run(tmp_path / "runs" / "s0", None)
    rc, out, err = run_cli(stability.main, [tmp_path / "runs"])
    assert rc == 0, err
    hts_run(tmp_path / "runs" / "s1", [x * 2 for x in cfg.lr], seed=1)
    rc, out, err = run_cli(stability.main, [tmp_path / "runs"])
    one_line(rc, err, str(tmp_path / "runs" / "s1" / "config.json"), "does not match the run's checkpoint")


# --- lease archives ---------------------------------------------------------------------------------


def packed(tmp_path, n_cells=6, part_bytes=3000):
    runs = tmp_path / "runs"
    for i in range(n_cells):
        fake_run(runs / "table1" / f"cell{i}" / "seed0", "interrupted", 1, ckpt=os.urandom(2500))
    out = tmp_path / "out"
    L = lease.Lease(lease.parser().parse_args(["--out", str(out), "--runs", str(runs)]))
    info = lease.pack(L, resume_bytes=1 << 20, part_bytes=part_bytes, max_parts=16)
    assert info["parts"] >= 5, info
    return out, info


def nothing_written(tmp_path):
    return not (tmp_path / "dest").exists() and not (tmp_path / "resume").exists() and not list(tmp_path.glob("dest*"))


def imp(tmp_path, src):
    return run_import(src, "--dest", tmp_path / "dest", "--resume-dir", tmp_path / "resume")


def test_lease_manifest_lists_every_part_and_file(tmp_path):
    out, info = packed(tmp_path)
    m = json.loads((out / "lease.json").read_text())["steps"]["pack"]["archive"]
    assert [p["name"] for p in m["parts"]] == sorted(p.name for p in out.glob("lease.tgz.*"))
    assert len(m["files"]) == info["files"] + info["checkpoints"] + 1  # + lease.json itself
    r = imp(tmp_path, out)
    assert r.returncode == 0 and "checked against the lease's manifest" in r.stdout, r.stderr
    assert len(list((tmp_path / "resume").rglob("checkpoint.msgpack"))) == info["checkpoints"]


@pytest.mark.parametrize("manifest", [True, False])
def test_lease_part_missing_in_the_middle_writes_nothing(tmp_path, manifest):
    out, _ = packed(tmp_path)
    (out / "lease.tgz.02").unlink()
    if not manifest:
        (out / "lease.json").unlink()
    r = imp(tmp_path, out)
    one_line(r.returncode, r.stderr, "lease.tgz.02 missing", "nothing was written")
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("manifest", [True, False])
def test_lease_parts_swapped_write_nothing(tmp_path, manifest):
    out, _ = packed(tmp_path)
    a, b = (out / "lease.tgz.01").read_bytes(), (out / "lease.tgz.03").read_bytes()
    (out / "lease.tgz.01").write_bytes(b)
    (out / "lease.tgz.03").write_bytes(a)
    if not manifest:
        (out / "lease.json").unlink()
    r = imp(tmp_path, out)
    one_line(r.returncode, r.stderr, "nothing was written")
    assert ("lease.tgz.01" in r.stderr) if manifest else ("not a complete lease archive" in r.stderr)
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("manifest", [True, False])
def test_lease_parts_renamed_without_leading_zero_write_nothing(tmp_path, manifest):
    """`.0 .. .11` sorted as strings put `.10` before `.2`: refused, never joined so."""
    out, info = packed(tmp_path, n_cells=12)
    assert info["parts"] >= 11
    for p in out.glob("lease.tgz.*"):
        p.rename(p.with_name(f"lease.tgz.{int(p.name.rsplit('.', 1)[1])}"))
    if not manifest:
        (out / "lease.json").unlink()
    r = imp(tmp_path, out)
    one_line(r.returncode, r.stderr, "nothing was written")
    assert nothing_written(tmp_path)


def test_lease_last_part_missing_without_manifest_writes_nothing(tmp_path):
    out, info = packed(tmp_path)
    (out / "lease.json").unlink()
    (out / f"lease.tgz.{info['parts'] - 1:02d}").unlink()
    r = imp(tmp_path, out)
    one_line(r.returncode, r.stderr, "not a complete lease archive", "nothing was written")
    assert nothing_written(tmp_path)


def test_lease_of_the_earlier_format_imports_when_whole(tmp_path):
    out, info = packed(tmp_path)
    (out / "lease.json").unlink()
    r = imp(tmp_path, out)
    assert r.returncode == 0 and "no manifest" in r.stdout, r.stderr
    assert len(list((tmp_path / "resume").rglob("checkpoint.msgpack"))) == info["checkpoints"]


def test_lease_extra_part_and_forged_file_are_refused(tmp_path):
    out, _ = packed(tmp_path)
    (out / "lease.tgz.99").write_bytes(b"x")
    r = imp(tmp_path, out)
    one_line(r.returncode, r.stderr, "lease.tgz.99", "not one of the lease's")
    (out / "lease.tgz.99").unlink()
    # a file changed inside a re-packed archive whose part digests were updated: the
    # per-file digests still catch it
    doc = json.loads((out / "lease.json").read_text())
    m = doc["steps"]["pack"]["archive"]
    blob = b"".join((out / p["name"]).read_bytes() for p in m["parts"])
    tar = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(zlib.decompress(blob, 47)), mode="r:") as src,
        tarfile.open(fileobj=tar, mode="w:gz") as dst,
    ):
        for mem in src.getmembers():
            data = src.extractfile(mem).read()
            if mem.name.endswith("summary.json"):
                data = data.replace(b"interrupted", b"ok")
                mem.size = len(data)
            dst.addfile(mem, io.BytesIO(data))
    new = tar.getvalue()
    for p in out.glob("lease.tgz.*"):
        p.unlink()
    (out / "lease.tgz.00").write_bytes(new)
    m["parts"] = [{"name": "lease.tgz.00", "bytes": len(new), "sha256": import_lease.sha256(new)}]
    m["bytes"], m["sha256"] = len(new), import_lease.sha256(new)
    (out / "lease.json").write_text(json.dumps(doc))
    r = imp(tmp_path, out)
    one_line(r.returncode, r.stderr, "summary.json: SHA-256 does not match the manifest's", "nothing was written")
    assert nothing_written(tmp_path)


def archive(tmp_path, members) -> Path:
    """A whole .tgz of `(TarInfo, bytes or None)` (the earlier format: no manifest)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data) if data is not None else None)
    p = tmp_path / "lease.tgz"
    p.write_bytes(buf.getvalue())
    return p


def member(name, data=b"{}", kind=tarfile.REGTYPE):
    m = tarfile.TarInfo(name)
    m.type = kind
    m.size = len(data) if kind == tarfile.REGTYPE else 0
    return m, (data if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize(
    "name,kind",
    [
        (".", tarfile.REGTYPE),
        ("./", tarfile.REGTYPE),
        (".", tarfile.DIRTYPE),
        ("a/./b.json", tarfile.REGTYPE),
        ("a//b.json", tarfile.REGTYPE),
        ("", tarfile.REGTYPE),
        ("a\\b.json", tarfile.REGTYPE),
    ],
)
def test_lease_member_dot_or_odd_names_never_write_beside_dest(tmp_path, name, kind):
    arc = archive(tmp_path, [member("table1/c/seed0/summary.json"), member(name, b"evil", kind)])
    r = imp(tmp_path, arc)
    one_line(r.returncode, r.stderr, "refusing archive member")
    assert nothing_written(tmp_path)
    assert not list(tmp_path.glob("*.importing"))


def test_lease_member_twice_or_inside_a_file_is_refused(tmp_path):
    arc = archive(tmp_path, [member("t/a.json", b"1"), member("t/a.json", b"2")])
    r = imp(tmp_path, arc)
    one_line(r.returncode, r.stderr, "in the archive twice")
    arc = archive(tmp_path, [member("t/a.json", b"1"), member("t/a.json/b.json", b"2")])
    r = imp(tmp_path, arc)
    one_line(r.returncode, r.stderr, "which is a file")
    assert nothing_written(tmp_path)


def test_lease_archive_declaring_a_huge_member_is_refused_quickly(tmp_path):
    m = tarfile.TarInfo("table1/c/seed0/checkpoint.msgpack")
    m.size = 50 << 30
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.addfile(m)  # header only: the 50 GiB are declared, not there
    p = tmp_path / "lease.tgz"
    p.write_bytes(buf.getvalue())
    assert len(p.read_bytes()) < 400
    t = time.time()
    r = imp(tmp_path, p)
    one_line(r.returncode, r.stderr, "nothing was written")
    assert time.time() - t < 10 and nothing_written(tmp_path)


def test_lease_damaged_tar_header_in_the_middle_is_not_taken_for_the_end(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tf:
        for i in range(3):
            m, data = member(f"t/run{i}/summary.json", b'{"status": "ok"}')
            tf.addfile(m, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    raw[1024 + 148] ^= 0x55  # the second member's header checksum
    import gzip

    p = tmp_path / "lease.tgz"
    p.write_bytes(gzip.compress(bytes(raw)))
    r = imp(tmp_path, p)
    one_line(r.returncode, r.stderr, "damaged tar header", "nothing was written")
    assert nothing_written(tmp_path)


def test_lease_part_that_is_a_pipe_is_not_waited_on(tmp_path):
    out, _ = packed(tmp_path)
    (out / "lease.tgz.01").unlink()
    os.mkfifo(out / "lease.tgz.01")
    try:
        r = within(30, imp, tmp_path, out)
    finally:
        free_fifo(out / "lease.tgz.01")
    one_line(r.returncode, r.stderr, "lease.tgz.01", "named pipe")
    assert nothing_written(tmp_path)


# --- siblings across the run-folder and lease code ------------------------------------------------


def test_run_folder_notes_that_are_pipes_are_not_waited_on(tmp_path):
    """The lock holder's note, a run folder's config and its manifest read as regular
    files only: a pipe in their place is refused (or counted as no note), never waited on."""
    from ep_jax.experiments import runfolder

    d = tmp_path / "r"
    d.mkdir()
    for name in (runfolder.HOLDER, runfolder.CONFIG, runfolder.MANIFEST):
        os.mkfifo(d / name)
    try:
        (d / runfolder.SUMMARY).write_text("{}")
        assert within(10, runfolder.holder_text, d) == "another process"
        assert within(10, runfolder.is_run_folder, d) is False
        with pytest.raises(RunError, match="not a regular file"):
            within(10, runfolder.read_manifest, d)
    finally:
        for name in (runfolder.HOLDER, runfolder.CONFIG, runfolder.MANIFEST):
            free_fifo(d / name)


def test_lease_import_never_writes_over_a_users_file(tmp_path):
    """A file under --dest that ep_jax did not write, in the place of one the archive
    holds, refuses the import before anything is written; the same import into a fresh
    folder, then again over its own files, works (the files are recorded as ep_jax's)."""
    out, info = packed(tmp_path)
    for mine in (tmp_path / "dest" / "table1" / "cell3" / "seed0" / "config.json", tmp_path / "dest" / "lease.json"):
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.write_text("my notes")
        r = imp(tmp_path, out)
        one_line(r.returncode, r.stderr, str(mine), "ep_jax did not write it")
        assert mine.read_text() == "my notes"
        assert [p for p in (tmp_path / "dest").rglob("*") if p.is_file()] == [mine]
        assert not (tmp_path / "resume").exists()
        mine.unlink()
    for _ in range(2):  # the second import writes over the first's files
        r = imp(tmp_path, out)
        assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "dest" / "table1" / "cell3" / "seed0" / "config.json").read_text())["epochs"] >= 1


def test_lease_import_removes_only_checkpoints_an_import_wrote(tmp_path):
    """A finished run's stale checkpoint is removed from --resume-dir only when an import
    wrote it (the folder's manifest lists it); one put there by hand is kept."""
    from ep_jax.experiments import runfolder

    runs = tmp_path / "runs"
    fake_run(runs / "cellA" / "seed0", "ok", 3)
    fake_run(runs / "cellB" / "seed0", "ok", 3)
    out = tmp_path / "out"
    L = lease.Lease(lease.parser().parse_args(["--out", str(out), "--runs", str(runs)]))
    lease.pack(L, resume_bytes=1 << 20, part_bytes=1 << 20, max_parts=4)
    ours = tmp_path / "resume" / "cellA" / "seed0"
    ours.mkdir(parents=True)
    runfolder.claim_outputs(ours, ["checkpoint.msgpack"])
    (ours / "checkpoint.msgpack").write_bytes(b"old")
    by_hand = tmp_path / "resume" / "cellB" / "seed0"
    by_hand.mkdir(parents=True)
    (by_hand / "checkpoint.msgpack").write_bytes(b"mine")
    r = imp(tmp_path, out)
    assert r.returncode == 0 and "1 stale removed" in r.stdout, (r.stdout, r.stderr)
    assert not (ours / "checkpoint.msgpack").exists() and (by_hand / "checkpoint.msgpack").read_bytes() == b"mine"


def test_load_run_refuses_a_config_edited_after_the_run(tmp_path):
    """Every command that loads a trained network (gdu, hidden-states, gradient-error)
    goes through engine.load_run, which checks config.json against the checkpoint."""
    rc, out, err = run_cli(train.main, tiny_args(epochs=1) + ["--out", tmp_path / "r"])
    assert rc == 0, err
    cfg = engine.load_run(tmp_path / "r")[0]  # the control
    d = json.loads((tmp_path / "r" / "config.json").read_text())
    d["subset_seed"] = d["subset_seed"] + 1  # no value in the checkpoint shows it: only the digest can tell
    (tmp_path / "r" / "config.json").write_text(json.dumps(d))
    with pytest.raises(RunError, match="does not match the run's checkpoint"):
        engine.load_run(tmp_path / "r")
    assert cfg.subset_seed != d["subset_seed"]
