"""CIFAR-10 / CIFAR-100 from the official binary version, on small archives the tests write.

Oracle: the records are written from their definition (label byte(s), then the R, G and B
planes of a row-major 32x32 image), independently of the reader; the expected arrays are
the images the test drew, in HWC order."""

import io
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ep_jax import data as D

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


@pytest.fixture
def no_defaults(monkeypatch, tmp_path):
    """No env var, no ./.data (an empty working directory), no tfds."""
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)


def records(images: np.ndarray, labels) -> bytes:
    """Binary records: label bytes (a tuple per image for CIFAR-100), then R, G, B planes."""
    out = bytearray()
    for img, lab in zip(images, labels):
        out += bytes(lab if isinstance(lab, tuple) else (lab,))
        for c in range(3):
            for r in range(32):
                out += bytes(int(v) for v in img[r, :, c])
    return bytes(out)


def draw(n, seed, n_classes=10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, n_classes, n)


def cifar10_blobs(n_per_batch=2, seed=0):
    """{file: bytes} of a small CIFAR-10 binary set, and the train / test arrays."""
    blobs, xs, ys = {}, [], []
    for i in range(1, 6):
        x, y = draw(n_per_batch, seed + i)
        blobs[f"data_batch_{i}.bin"] = records(x, y)
        xs.append(x), ys.append(y)
    xt, yt = draw(3, seed + 10)
    blobs["test_batch.bin"] = records(xt, yt)
    return blobs, (np.concatenate(xs), np.concatenate(ys), xt, yt)


def write_tar(path: Path, blobs: dict, top="cifar-10-batches-bin"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, b in blobs.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))


def normalised(x, stats):
    mean, std = (np.asarray(v, np.float64) for v in stats)
    return ((x.astype(np.float64) / 255.0 - mean) / std).reshape(len(x), -1)


def test_cifar10_archive_hwc_and_normalisation(tmp_path, no_defaults):
    blobs, (x, y, xt, yt) = cifar10_blobs()
    write_tar(tmp_path / "d" / "cifar-10-binary.tar.gz", blobs)
    ds = D.load_dataset("cifar10", data_dir=tmp_path / "d", verify=False)
    assert ds.x_train.shape == (10, 3072) and ds.x_test.shape == (3, 3072) and ds.x_train.dtype == np.float32
    np.testing.assert_array_equal(ds.y_train, y)
    np.testing.assert_array_equal(ds.y_test, yt)
    np.testing.assert_allclose(ds.x_train, normalised(x, CIFAR10_STATS), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.x_test, normalised(xt, CIFAR10_STATS), rtol=1e-5, atol=1e-5)
    raw = D.load_dataset("cifar-10", data_dir=tmp_path / "d", verify=False, normalize=False)
    # row-major HWC: pixel (r, c) channel k at (r * 32 + c) * 3 + k
    assert raw.x_train[1, (5 * 32 + 7) * 3 + 2] == pytest.approx(x[1, 5, 7, 2] / 255.0)
    np.testing.assert_allclose(raw.x_train.reshape(-1, 32, 32, 3), x / 255.0, rtol=1e-6)
    assert D.IMAGE_SHAPES["cifar10"] == (32, 32, 3)


def test_cifar10_extracted_folder_and_archive_path(tmp_path, no_defaults):
    blobs, (x, y, _, yt) = cifar10_blobs(seed=3)
    folder = tmp_path / "d" / "cifar-10-batches-bin"  # the extracted archive, a subfolder looked in
    folder.mkdir(parents=True)
    for name, b in blobs.items():
        (folder / name).write_bytes(b)
    ds = D.load_dataset("cifar10", data_dir=tmp_path / "d", verify=False, normalize=False)
    np.testing.assert_allclose(ds.x_train.reshape(-1, 32, 32, 3), x / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, yt)
    write_tar(tmp_path / "a" / "cifar-10-binary.tar.gz", blobs)  # the archive itself as --data-dir
    ds2 = D.load_dataset("cifar10", data_dir=tmp_path / "a" / "cifar-10-binary.tar.gz", verify=False)
    np.testing.assert_array_equal(ds2.y_train, y)
    assert D.available_offline("cifar10", tmp_path / "d") and not D.available_offline("cifar100", tmp_path / "d")


def test_cifar100_fine_labels(tmp_path, no_defaults):
    x, fine = draw(4, 1, 100)
    coarse = fine // 5
    xt, fine_t = draw(2, 2, 100)
    blobs = {"train.bin": records(x, list(zip(coarse, fine))), "test.bin": records(xt, list(zip(fine_t // 5, fine_t)))}
    write_tar(tmp_path / "d" / "cifar-100-binary.tar.gz", blobs, top="cifar-100-binary")
    ds = D.load_dataset("cifar100", data_dir=tmp_path / "d", verify=False)
    np.testing.assert_array_equal(ds.y_train, fine)
    np.testing.assert_array_equal(ds.y_test, fine_t)
    stats = D.NORMALISATION["cifar100"]
    np.testing.assert_allclose(ds.x_train, normalised(x, stats), rtol=1e-5, atol=1e-5)


def _pickled_batch() -> bytes:
    return pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}, protocol=2)


@pytest.mark.parametrize(
    "layout", ["python-archive", "batches-py-folder", "pickled-batch", "pickle-in-bin", "python-archive-renamed"]
)
def test_python_version_is_refused_with_the_archive_to_use(tmp_path, no_defaults, layout):
    d = tmp_path / "d"
    d.mkdir()
    if layout == "python-archive":
        write_tar(d / "cifar-10-python.tar.gz", {"data_batch_1": _pickled_batch()}, top="cifar-10-batches-py")
    elif layout == "batches-py-folder":
        (d / "cifar-10-batches-py").mkdir()
        (d / "cifar-10-batches-py" / "data_batch_1").write_bytes(_pickled_batch())
    elif layout == "pickled-batch":
        (d / "data_batch_1").write_bytes(_pickled_batch())
    elif layout == "pickle-in-bin":
        blobs, _ = cifar10_blobs()
        blobs["data_batch_3.bin"] = _pickled_batch()
        for name, b in blobs.items():
            (d / name).write_bytes(b)
    else:  # the python version under the binary archive's name
        write_tar(d / "cifar-10-binary.tar.gz", {"data_batch_1": _pickled_batch()}, top="cifar-10-batches-py")
    with pytest.raises(D.DatasetError) as e:
        D.load_dataset("cifar10", data_dir=d, verify=False)
    msg = str(e.value)
    assert "\n" not in msg and "cifar-10-binary.tar.gz" in msg and "python version" in msg, msg


def test_python_version_of_cifar100_names_its_binary_archive(tmp_path, no_defaults):
    d = tmp_path / "d"
    write_tar(d / "cifar-100-python.tar.gz", {"train": _pickled_batch()}, top="cifar-100-python")
    with pytest.raises(D.DatasetError, match="cifar-100-binary.tar.gz") as e:
        D.load_dataset("cifar100", data_dir=d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "damage, match",
    [
        ("truncate-bin", "not a whole number of 3073-byte"),
        ("empty-bin", "not a whole number"),
        ("bad-label", r"label byte 0 = 10, outside 0..9"),
        ("truncate-archive", "corrupt or truncated archive"),
        ("missing-member", "lacks data_batch_4.bin"),
        ("not-gzip", "corrupt or truncated archive"),
    ],
)
def test_damaged_files_one_line_naming_the_file(tmp_path, no_defaults, damage, match):
    blobs, _ = cifar10_blobs()
    d = tmp_path / "d"
    arch = d / "cifar-10-binary.tar.gz"
    if damage == "truncate-bin":
        blobs["data_batch_2.bin"] = blobs["data_batch_2.bin"][:-5]
    elif damage == "empty-bin":
        blobs["test_batch.bin"] = b""
    elif damage == "bad-label":
        b = bytearray(blobs["data_batch_5.bin"])
        b[3073] = 10  # the second record's label
        blobs["data_batch_5.bin"] = bytes(b)
    elif damage == "missing-member":
        del blobs["data_batch_4.bin"]
    write_tar(arch, blobs)
    if damage == "truncate-archive":
        arch.write_bytes(arch.read_bytes()[: len(arch.read_bytes()) // 2])
    elif damage == "not-gzip":
        arch.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(D.DatasetError, match=match) as e:
        D.load_dataset("cifar10", data_dir=d, verify=False)
    assert "\n" not in str(e.value) and str(arch) in str(e.value)


def test_checksums_and_sizes_with_verify(tmp_path, no_defaults):
    blobs, _ = cifar10_blobs()
    write_tar(tmp_path / "d" / "cifar-10-binary.tar.gz", blobs)
    with pytest.raises(D.DatasetError, match="does not match the official cifar-10-binary.tar.gz") as e:
        D.load_dataset("cifar10", data_dir=tmp_path / "d")  # verify=True by default
    assert "\n" not in str(e.value) and "verify=False" in str(e.value)
    folder = tmp_path / "e"
    folder.mkdir()
    for name, b in blobs.items():
        (folder / name).write_bytes(b)
    with pytest.raises(D.DatasetError, match="data_batch_1.bin: md5 .* official data_batch_1.bin"):
        D.load_dataset("cifar10", data_dir=folder)
    with pytest.raises(D.DatasetError, match="10 train examples, expected 50000"):
        D.load_cifar_files(folder, "cifar10", verify=False, expect_sizes=True)
    # the official sums are the published ones (tfds url_checksums; the CIFAR page's md5)
    assert D.CIFAR_SHA256["cifar-10-binary.tar.gz"].startswith("c4a38c50a1bc5f3a")
    assert D.CIFAR_MD5["cifar-10-binary.tar.gz"] == "c32a1d4ab5d03f1284b67883e8d87530"


def test_a_matching_checksum_passes(tmp_path, no_defaults, monkeypatch):
    """The check accepts a file whose md5 is the listed one (here the test's own archive)."""
    import hashlib

    blobs, (x, y, _, _) = cifar10_blobs()
    write_tar(tmp_path / "d" / "cifar-10-binary.tar.gz", blobs)
    raw = (tmp_path / "d" / "cifar-10-binary.tar.gz").read_bytes()
    monkeypatch.setitem(D.CIFAR_MD5, "cifar-10-binary.tar.gz", hashlib.md5(raw).hexdigest())
    xtr, ytr, _, _ = D.load_cifar_files(tmp_path / "d", "cifar10", verify=True, expect_sizes=False)
    np.testing.assert_array_equal(ytr, y)
    np.testing.assert_array_equal(xtr, x)


def test_lookup_order_and_missing_message(tmp_path, no_defaults, monkeypatch):
    a, _ = cifar10_blobs(seed=1)
    b, (_, yb, _, _) = cifar10_blobs(seed=2)
    write_tar(tmp_path / "env" / "cifar10" / "cifar-10-binary.tar.gz", b)  # env var, dataset subfolder
    write_tar(Path.cwd() / ".data" / "cifar10" / "cifar-10-binary.tar.gz", a)
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "env"))
    np.testing.assert_array_equal(D.load_dataset("cifar10", verify=False).y_train, yb)  # env before ./.data
    monkeypatch.delenv(D.ENV_VAR)
    assert D.load_dataset("cifar10", verify=False).y_train.shape == (10,)
    with pytest.raises(D.DatasetError) as e:
        D.load_dataset("cifar100")
    msg = str(e.value)
    assert ".data/cifar100" in msg and "cifar-100-binary.tar.gz" in msg and "tensorflow-datasets" in msg


def test_tfds_path_serves_hwc(tmp_path, no_defaults, monkeypatch):
    """tfds' examples (HWC images, fine `label`) become the same flat HWC rows."""
    import types

    x, y = draw(3, 5)
    xt, yt = draw(2, 6)

    class Builder:
        def is_prepared(self):
            return True

    fake = types.ModuleType("tensorflow_datasets")
    fake.builder = lambda name, data_dir=None: Builder()
    fake.data_source = lambda name, split, data_dir=None: (
        [{"image": a, "label": b, "coarse_label": 0} for a, b in zip(*((x, y) if split == "train" else (xt, yt)))]
    )
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    ds = D.load_dataset("cifar10", source="tfds", normalize=False)
    np.testing.assert_allclose(ds.x_train.reshape(-1, 32, 32, 3), x / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, yt)


def test_engine_trains_a_conv_model_from_a_cifar_archive(tmp_path, no_defaults, monkeypatch):
    """The whole path: --data-dir with the (verified) archive -> flat HWC rows -> a conv
    model of input 32x32x3 in the engine, with augmentation; the test images are the
    archive's, normalised."""
    import hashlib

    from ep_jax.experiments import build, engine
    from ep_jax.experiments.config import RunConfig, validate

    blobs, (x, y, xt, yt) = cifar10_blobs(n_per_batch=4)
    arch = tmp_path / "data" / "cifar-10-binary.tar.gz"
    write_tar(arch, blobs)
    monkeypatch.setitem(D.CIFAR_MD5, "cifar-10-binary.tar.gz", hashlib.md5(arch.read_bytes()).hexdigest())
    monkeypatch.setitem(D.CIFAR_SIZES, "train", 20)
    monkeypatch.setitem(D.CIFAR_SIZES, "test", 3)
    build._DATA_CACHE.clear()
    cfg = validate(
        RunConfig.from_dict(
            dict(
                model="conv",
                dataset="cifar10",
                data_dir=str(tmp_path / "data"),
                channels=[2],
                kernels=[3],
                paddings=[1],
                fc=[10],
                lr=[0.05, 0.05],
                t_free=3,
                t_nudge=1,
                beta=0.5,
                batch_size=10,
                chunk=2,
                eval_batch=3,
                epochs=1,
                augment=True,
            )
        )
    )
    data = build.load_data(cfg)
    np.testing.assert_allclose(data[2], normalised(xt, CIFAR10_STATS), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(data[1], y)
    (s,) = engine.run([engine.Member(cfg, "c", tmp_path / "run")], "new", progress=False, print_fn=lambda *a: None)
    assert s["status"] == "ok" and s["epochs_done"] == 1
    build._DATA_CACHE.clear()
