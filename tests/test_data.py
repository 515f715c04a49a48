"""Data layer: IDX/npz readers on files the tests write, real Fashion-MNIST and MNIST."""

import gzip
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ep_jax import data as D

FMNIST = Path("/usr/share/datasets/fashion-mnist")
# the project's shared MNIST files sit beside the checkout (CI has them there); the
# library never looks there by itself, so the tests pass the folder explicitly
SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.fixture
def mnist_dir() -> Path:
    """The shared MNIST folder beside the checkout (skips when it is absent)."""
    if not D.available_offline("mnist", SHARED_MNIST):
        pytest.skip(f"the shared MNIST files are not beside the checkout ({SHARED_MNIST})")
    return SHARED_MNIST


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file written from its definition (big-endian dims after a 4-byte magic)."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_set(folder: Path, n_train=50, n_test=20, seed=0, gz=True):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        b = idx_bytes(a)
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(b) if gz else b)
    return arrays


@pytest.fixture
def no_defaults(monkeypatch, tmp_path):
    """No env var, no Debian folder, no ./.data (the working directory is an empty
    tmp_path/"cwd"), no tfds: only what a test names."""
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    monkeypatch.setattr(D, "DEBIAN_DIRS", {"fashion_mnist": tmp_path / "no-debian"})
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip_and_normalisation(tmp_path, no_defaults, gz):
    arrays = write_set(tmp_path / "d", gz=gz)
    for name, norm in (("mnist", None), ("fmnist", (0.2860, 0.3530)), ("kmnist", (0.1918, 0.3483))):
        ds = D.load_dataset(name, data_dir=tmp_path / "d", verify=False)
        x = arrays["train-images-idx3-ubyte"].reshape(50, 784) / 255.0
        if norm:
            x = (x - norm[0]) / norm[1]
        np.testing.assert_allclose(ds.x_train, x, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
        assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32 and ds.x_test.shape == (20, 784)
    raw = D.load_dataset("mnist", data_dir=tmp_path / "d", verify=False, normalize=False)
    assert raw.x_train.min() >= 0 and raw.x_train.max() <= 1


def test_kmnist_npz_and_env_var_subfolder(tmp_path, no_defaults, monkeypatch):
    rng = np.random.default_rng(1)
    folder = tmp_path / "env" / "kmnist"
    folder.mkdir(parents=True)
    arrs = {
        "kmnist-train-imgs.npz": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "kmnist-train-labels.npz": rng.integers(0, 10, 30, dtype=np.uint8),
        "kmnist-test-imgs.npz": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "kmnist-test-labels.npz": rng.integers(0, 10, 12, dtype=np.uint8),
    }
    for f, a in arrs.items():
        np.savez_compressed(folder / f, arr_0=a)
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "env"))
    ds = D.load_dataset("kmnist", verify=False, normalize=False)
    np.testing.assert_allclose(ds.x_test, arrs["kmnist-test-imgs.npz"].reshape(12, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, arrs["kmnist-train-labels.npz"])
    # the official checksums reject files that are not the official release
    with pytest.raises(D.DatasetError, match="kmnist-train-imgs.npz: md5 .* does not match"):
        D.load_dataset("kmnist")
    (folder / "kmnist-test-labels.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(D.DatasetError, match="kmnist-test-labels.npz: cannot read"):
        D.load_dataset("kmnist", verify=False)


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda b: gzip.compress(b)[:-20], "corrupt or truncated gzip"),
        (lambda b: gzip.compress(b[:-100]), "truncated or corrupt"),
        (lambda b: gzip.compress(b"\x01\x02" + b[2:]), "bad magic"),
        (lambda b: gzip.compress(b[:2] + b"\x0d" + b[3:]), "not unsigned byte"),
    ],
)
def test_corrupt_files_raise_naming_the_file(tmp_path, no_defaults, damage, match):
    arrays = write_set(tmp_path)
    target = tmp_path / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(damage(idx_bytes(arrays["t10k-images-idx3-ubyte"])))
    with pytest.raises(D.DatasetError, match=match) as e:
        D.load_dataset("mnist", data_dir=tmp_path, verify=False)
    assert "t10k-images-idx3-ubyte.gz" in str(e.value)


def test_mismatched_counts_and_bad_labels(tmp_path, no_defaults):
    write_set(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(49))))
    with pytest.raises(D.DatasetError, match="49 labels for 50 images"):
        D.load_dataset("mnist", data_dir=tmp_path, verify=False)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(50, 12))))
    with pytest.raises(D.DatasetError, match="label 12 outside"):
        D.load_dataset("mnist", data_dir=tmp_path, verify=False)


def write_kmnist_npz(folder: Path, **override):
    rng = np.random.default_rng(2)
    arrs = {
        "kmnist-train-imgs.npz": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "kmnist-train-labels.npz": rng.integers(0, 10, 30, dtype=np.uint8),
        "kmnist-test-imgs.npz": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "kmnist-test-labels.npz": rng.integers(0, 10, 12, dtype=np.uint8),
    }
    arrs.update(override)
    folder.mkdir(parents=True, exist_ok=True)
    for f, a in arrs.items():
        np.savez_compressed(folder / f, arr_0=a)
    return arrs


@pytest.mark.parametrize(
    "file,array,match",
    [
        ("kmnist-train-labels.npz", np.array([3, -1] + [0] * 28, np.int64), "label -1 outside 0..9"),
        ("kmnist-test-labels.npz", np.full(12, 10, np.int16), "label 10 outside 0..9"),
        ("kmnist-test-labels.npz", np.zeros(12, np.float32), "labels have dtype float32, expected integers"),
        ("kmnist-train-imgs.npz", np.full((30, 28, 28), 1000.0), "images have dtype float64, expected uint8"),
        ("kmnist-test-imgs.npz", np.zeros((12, 28, 28), np.int64), "images have dtype int64, expected uint8"),
    ],
)
def test_npz_contents_are_checked_without_verify(tmp_path, no_defaults, file, array, match):
    """verify=False skips the checksums, never the dtypes and value ranges."""
    write_kmnist_npz(tmp_path / "k", **{file: array})
    with pytest.raises(D.DatasetError, match=match) as e:
        D.load_dataset("kmnist", data_dir=tmp_path / "k", verify=False)
    assert str(e.value).startswith(str(tmp_path / "k" / file)) and "\n" not in str(e.value)
    write_kmnist_npz(tmp_path / "ok")  # the control: the same files, valid, load
    assert D.load_dataset("kmnist", data_dir=tmp_path / "ok", verify=False).x_train.shape == (30, 784)


@pytest.mark.parametrize("split", ["train", "t10k"])
def test_idx_with_zero_examples_is_refused_naming_the_file(tmp_path, no_defaults, split):
    write_set(tmp_path)
    for kind, shape in (("images-idx3", (0, 28, 28)), ("labels-idx1", (0,))):
        (tmp_path / f"{split}-{kind}-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(shape))))
    with pytest.raises(D.DatasetError, match="holds 0 .* examples, expected at least 1") as e:
        D.load_dataset("mnist", data_dir=tmp_path, verify=False)
    assert str(e.value).startswith(str(tmp_path / f"{split}-images-idx3-ubyte.gz")) and "\n" not in str(e.value)


def test_checksum_mismatch_and_size_check(tmp_path, no_defaults):
    write_set(tmp_path)
    with pytest.raises(D.DatasetError, match=r"md5 .* does not match the official .*verify=False"):
        D.load_dataset("fashion_mnist", data_dir=tmp_path)


def test_missing_dataset_explicit_folder_is_the_only_place(tmp_path, no_defaults, monkeypatch):
    write_set(tmp_path / "env")  # data the env var points at ...
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(D.DatasetError) as e:  # ... is not used: data_dir given
        D.load_dataset("fashion_mnist", data_dir=tmp_path / "nowhere", verify=False)
    msg = str(e.value)
    looked = [l for l in msg.splitlines() if l.startswith("  - ")]
    assert looked and all(l.startswith(f"  - {tmp_path / 'nowhere'}") for l in looked), msg
    assert "no-debian" not in msg and str(tmp_path / "env") not in msg and "tensorflow-datasets:" not in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        D.load_dataset("cifar")


def test_missing_dataset_lists_every_default_place(tmp_path, no_defaults):
    with pytest.raises(D.DatasetError) as e:
        D.load_dataset("fashion_mnist")
    msg = str(e.value)
    assert "no-debian" in msg and str(tmp_path / "cwd" / ".data" / "fashion-mnist") in msg
    assert "tensorflow-datasets: not importable" in msg and "pip install 'ep_jax[tfds]'" in msg


def test_lookup_order(tmp_path, no_defaults, monkeypatch):
    """data_dir (alone) > EP_JAX_DATA_DIR > Debian's folder > ./.data (the working directory's)."""
    places = {
        "explicit": tmp_path / "explicit",
        "env": tmp_path / "env" / "fashion_mnist",
        "debian": tmp_path / "no-debian",
        "local": tmp_path / "cwd" / ".data" / "fashion-mnist",
    }
    labels = {
        name: write_set(folder, seed=i)["t10k-labels-idx1-ubyte"] for i, (name, folder) in enumerate(places.items())
    }
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "env"))

    def found(**kw):
        y = D.load_dataset("fmnist", verify=False, **kw).y_test
        return [n for n, l in labels.items() if np.array_equal(l, y)]

    assert found(data_dir=places["explicit"]) == ["explicit"]
    assert found() == ["env"]
    monkeypatch.delenv(D.ENV_VAR)
    assert found() == ["debian"]
    monkeypatch.setattr(D, "DEBIAN_DIRS", {})
    assert found() == ["local"]
    assert D.candidate_dirs("fashion_mnist") == [places["local"], tmp_path / "cwd" / ".data" / "fashion_mnist"]
    assert D.candidate_dirs("mnist", data_dir=tmp_path) == [tmp_path, tmp_path / "mnist", tmp_path / "MNIST"]


def test_local_data_is_relative_to_the_working_directory(tmp_path, no_defaults, monkeypatch):
    """`./.data/<name>` follows the current working directory (what the README says), not
    the folder the package was installed in."""
    labels = write_set(tmp_path / "project" / ".data" / "mnist")["t10k-labels-idx1-ubyte"]
    with pytest.raises(D.DatasetError, match="not found"):
        D.load_dataset("mnist", verify=False)  # cwd is the empty tmp_path/"cwd"
    monkeypatch.chdir(tmp_path / "project")
    assert D.candidate_dirs("mnist") == [tmp_path / "project" / ".data" / "mnist"]
    assert D.available_offline("mnist")
    np.testing.assert_array_equal(D.load_dataset("mnist", verify=False).y_test, labels)


def test_shared_folder_beside_the_package_is_not_looked_in(tmp_path, no_defaults, monkeypatch):
    """No user has the project's `shared/data` beside their copy of the package: the
    library never looks there (tests pass that folder explicitly)."""
    monkeypatch.setattr(D, "REPO_ROOT", tmp_path / "repo")
    write_set(tmp_path / "shared" / "data" / "mnist")
    write_set(tmp_path / "repo" / ".data" / "mnist")
    assert D.candidate_dirs("mnist") == [tmp_path / "cwd" / ".data" / "mnist"]
    assert not D.available_offline("mnist")
    with pytest.raises(D.DatasetError) as e:
        D.load_dataset("mnist", verify=False)
    assert str(tmp_path / "shared") not in str(e.value) and str(tmp_path / "repo") not in str(e.value)


class FakeBuilder:
    def __init__(self, prepared):
        self.prepared = prepared
        self.download_called = False

    def is_prepared(self):
        return self.prepared

    def download_and_prepare(self):
        self.download_called = True
        raise AssertionError("a download was attempted offline")


def fake_tfds(builder, examples=None):
    import types

    mod = types.ModuleType("tensorflow_datasets")
    mod.builder = lambda name, data_dir=None: builder
    mod.data_source = lambda name, split, data_dir=None: examples[split]
    return mod


def test_tfds_fails_fast_offline(tmp_path, no_defaults, monkeypatch):
    import time

    builder = FakeBuilder(prepared=False)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds(builder))
    monkeypatch.setattr(D, "_online", lambda *a, **k: False)
    t0 = time.perf_counter()
    with pytest.raises(D.DatasetError) as e:
        D.load_dataset("kmnist")
    assert time.perf_counter() - t0 < 5 and not builder.download_called
    msg = str(e.value)
    assert "tensorflow-datasets has no prepared copy of 'kmnist' and cannot download it" in msg
    assert "install tensorflow-datasets" not in msg and "pip install" not in msg  # it is installed
    assert "https://github.com/rois-codh/kmnist" in msg


def test_tfds_prepared_copy_is_used(tmp_path, no_defaults, monkeypatch):
    rng = np.random.default_rng(0)
    examples = {
        s: [
            {"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), "label": int(rng.integers(0, 10))}
            for _ in range(n)
        ]
        for s, n in (("train", 6), ("test", 4))
    }
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds(FakeBuilder(prepared=True), examples))
    ds = D.load_dataset("mnist", normalize=False)
    assert ds.x_train.shape == (6, 784) and ds.y_test.tolist() == [e["label"] for e in examples["test"]]
    np.testing.assert_allclose(ds.x_test[1], examples["test"][1]["image"].reshape(-1) / 255.0, rtol=1e-6)


def test_subset_indices():
    k = jax.random.PRNGKey(7)
    np.testing.assert_array_equal(D.subset_indices(k, 50, None), np.arange(50))
    a = D.subset_indices(k, 1000, 100)
    assert len(a) == 100 and len(set(a.tolist())) == 100 and np.all(np.diff(a) > 0) and a.max() < 1000
    np.testing.assert_array_equal(a, D.subset_indices(k, 1000, 100))  # seeded
    assert not np.array_equal(a, D.subset_indices(jax.random.PRNGKey(8), 1000, 100))
    assert set(D.subset_indices(k, 1000, 40).tolist()) <= set(a.tolist())  # nested subsets
    np.testing.assert_array_equal(D.subset_indices(k, 30, 30), np.arange(30))
    for bad in (0, -5, 1001):
        with pytest.raises(ValueError, match=r"subset must lie in \[1, 1000\]"):
            D.subset_indices(k, 1000, bad)


def test_files_path_does_not_import_tfds(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "tensorflow_datasets", raising=False)
    write_set(tmp_path)
    D.load_dataset("mnist", data_dir=tmp_path, verify=False)
    assert "tensorflow_datasets" not in sys.modules


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed (CI installs it)")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    ds = D.load_dataset("fmnist")  # found in /usr/share/datasets/fashion-mnist, md5-verified
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)
    raw = D.read_idx(FMNIST / "train-images-idx3-ubyte.gz").astype(np.float64) / 255
    assert abs(raw.mean() - 0.2860) < 5e-4 and abs(raw.std() - 0.3530) < 5e-4  # the normalisation constants
    assert abs(ds.x_train.mean()) < 2e-3 and abs(ds.x_train.std() - 1) < 2e-3


def test_real_mnist(mnist_dir):
    ds = D.load_dataset("mnist", data_dir=mnist_dir)
    np.testing.assert_array_equal(np.bincount(ds.y_train), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949])
    np.testing.assert_array_equal(np.bincount(ds.y_test), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    assert int(np.rint(ds.x_test.astype(np.float64) * 255).sum()) == 264923200  # SOURCES.md pixel sum


def test_batches_seeded_complete_and_closable():
    x = np.arange(103 * 2, dtype=np.float32).reshape(103, 2)
    y = np.arange(103)
    k = jax.random.PRNGKey(3)
    a = [np.asarray(b[1]) for b in D.batches(x, y, 10, key=k)]
    b = [np.asarray(b[1]) for b in D.batches(x, y, 10, key=k)]
    c = [np.asarray(b[1]) for b in D.batches(x, y, 10, key=jax.random.PRNGKey(4))]
    assert all(np.array_equal(u, v) for u, v in zip(a, b)) and len(a) == 11
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))
    np.testing.assert_array_equal(np.sort(np.concatenate(a)), y)
    assert [len(v) for v in D.batches(x, y, 10, drop_last=True)] == [2] * 10
    for xb, yb in D.batches(x, y, 10, key=k):
        np.testing.assert_array_equal(np.asarray(xb)[:, 0], 2 * np.asarray(yb))
    it = D.batches(x, y, 1, prefetch=1)
    next(it)
    it.close()  # must not hang with the producer blocked on a full queue
    sub = D.subset(D.Dataset("t", x, y, x[:20], y[:20]), 30, 5, key=k)
    assert len(sub.y_train) == 30 and len(set(sub.y_train.tolist())) == 30 and len(sub.y_test) == 5
