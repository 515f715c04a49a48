"""Datasets: MNIST, KMNIST and Fashion-MNIST, offline from files or online via tfds.

`load_dataset(name)` returns a `Dataset` of flattened float32 images `(N, 784)` and int32
labels (train 60 000, test 10 000), normalised as the reference code does: pixels scaled to [0, 1],
then MNIST unchanged, KMNIST `(x − 0.1918)/0.3483`, Fashion-MNIST `(x − 0.2860)/0.3530`.

Where it looks, in order (the first place holding a complete set of files wins):
1. the `data_dir` argument (`--data-dir` on the command lines): when given, the ONLY
   place looked;
2. the environment variable `EP_JAX_DATA_DIR`;
3. `/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist`; Fashion-MNIST only);
4. `./.data/<name>` in the current working directory (`.data/mnist`, `.data/kmnist`,
   `.data/fashion-mnist` or `.data/fashion_mnist`);
5. tensorflow-datasets (`mnist`, `kmnist`, `fashion_mnist`), imported only at this point.
In the folders of 1 and 2 the files may sit directly or in a subfolder named after the
dataset (`mnist/`, `MNIST/`, `kmnist/`, `KMNIST/`, `fashion-mnist/`, `fashion_mnist/`,
`fmnist/`, `FashionMNIST/`).

File formats: the four standard IDX files (`train-images-idx3-ubyte[.gz]`,
`train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`),
or for KMNIST the official `kmnist-{train,test}-{imgs,labels}.npz` (array `arr_0`).
Files are always checked for structure and content (IDX magic number, dimensions and
payload length; images uint8 `(N, 28, 28)` with N >= 1, integer labels in 0..9, one per
image) and, with `verify=True`, against the official md5 sums (of the file, or of the
decompressed IDX payload: Debian recompressed Fashion-MNIST, so only its payloads
match) and the official sizes. Any problem raises `DatasetError` naming the file;
nothing is returned half-loaded.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import queue
import threading
import weakref
import zlib
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

DATASETS = ("mnist", "kmnist", "fashion_mnist")
ALIASES = {"fmnist": "fashion_mnist", "fashion-mnist": "fashion_mnist", "k-mnist": "kmnist"}
NORMALISATION = {"mnist": None, "kmnist": (0.1918, 0.3483), "fashion_mnist": (0.2860, 0.3530)}
SUBFOLDERS = {"mnist": ("mnist", "MNIST"), "kmnist": ("kmnist", "KMNIST"),
              "fashion_mnist": ("fashion-mnist", "fashion_mnist", "fmnist", "FashionMNIST")}
DEBIAN_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
REPO_ROOT = Path(__file__).resolve().parent.parent  # the folder above the package (not a place looked)
LOCAL_DIR = ".data"  # `./.data/<name>`, relative to the current working directory
ENV_VAR = "EP_JAX_DATA_DIR"
SIZES = {"train": 60000, "test": 10000}

IDX_FILES = {("train", "images"): "train-images-idx3-ubyte", ("train", "labels"): "train-labels-idx1-ubyte",
             ("test", "images"): "t10k-images-idx3-ubyte", ("test", "labels"): "t10k-labels-idx1-ubyte"}
NPZ_FILES = {("train", "images"): "kmnist-train-imgs.npz", ("train", "labels"): "kmnist-train-labels.npz",
             ("test", "images"): "kmnist-test-imgs.npz", ("test", "labels"): "kmnist-test-labels.npz"}

# Official md5 sums: of the decompressed IDX payload, or of the file as distributed.
MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": {"6bbc9ace898e44ae57da46a324031adb", "f68b3c2dcbeaaa9fbdd348bbdeb94873"},
        "train-labels-idx1-ubyte": {"a25bea736e30d166cdddb491f175f624", "d53e105ee54ea40749a09fcbcd1e9432"},
        "t10k-images-idx3-ubyte": {"2646ac647ad5339dbf082846283269ea", "9fb629c4189551a2d022fa330f9573f3"},
        "t10k-labels-idx1-ubyte": {"27ae3e4e09519cfbb04c329615203637", "ec29112dd5afa0611ce80d1b7f02629c"},
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": {"f4a8712d7a061bf5bd6d2ca38dc4d50a", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"},
        "train-labels-idx1-ubyte": {"9018921c3c673c538a1fc5bad174d6f9", "25c81989df183df01b3e8a0aad5dffbe"},
        "t10k-images-idx3-ubyte": {"8181f5470baa50b63fa0f6fddb340f0a", "bef4ecab320f06d8554ea6380940ec79"},
        "t10k-labels-idx1-ubyte": {"15d484375f8d13e6eb1aabb0c3f46965", "bb300cfdad3c16e7a12a480ee83cd310"},
    },
    "kmnist": {
        "train-images-idx3-ubyte": {"bdb82020997e1d708af4cf47b453dcf7"},
        "train-labels-idx1-ubyte": {"e144d726b3acfaa3e44228e80efcd344", "949e75301f8813e0dc5800dcc320fc52"},
        "t10k-images-idx3-ubyte": {"5c965bf0a639b31b8f53240b1b52f4d7"},
        "t10k-labels-idx1-ubyte": {"7320c461ea6c1c855c0b718fb2a4b134"},
        "kmnist-train-imgs.npz": {"a183fbc01ed9a345513b145673d3d0bb"},
        "kmnist-train-labels.npz": {"b0e1d240e8afec72b50437fc3bc5908a"},
        "kmnist-test-imgs.npz": {"dace6de62ca8b90843cc45366337d02e"},
        "kmnist-test-labels.npz": {"3ae489a79983d0fe386152684e3b5412"},
    },
}

HOW_TO_GET = {
    "mnist": "put the 4 MNIST IDX .gz files in a folder and pass --data-dir (or set EP_JAX_DATA_DIR)",
    "kmnist": "download kmnist-{train,test}-{imgs,labels}.npz (or the IDX .gz files) from "
              "https://github.com/rois-codh/kmnist into a folder and pass --data-dir (or set EP_JAX_DATA_DIR)",
    "fashion_mnist": "apt-get install dataset-fashion-mnist (Debian/Ubuntu), or put the 4 IDX .gz files "
                     "in a folder and pass --data-dir (or set EP_JAX_DATA_DIR)",
}


class DatasetError(RuntimeError):
    """A dataset is missing, corrupt or fails its checksum."""


class Dataset(NamedTuple):
    """A dataset as host arrays: flattened images and integer labels."""
    name: str
    x_train: np.ndarray   # (60000, 784) float32
    y_train: np.ndarray   # (60000,) int32
    x_test: np.ndarray    # (10000, 784) float32
    y_test: np.ndarray    # (10000,) int32


def canonical_name(name: str) -> str:
    """The dataset's name in `DATASETS` (aliases and case resolved); ValueError if unknown."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)} (or alias fmnist)")
    return key


# --- file readers -------------------------------------------------------------------------

def _read_bytes(path: Path) -> tuple[bytes, bytes]:
    """(file bytes, payload bytes): the payload is decompressed for `.gz` files."""
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw, raw
    try:
        return raw, gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: corrupt or truncated gzip file ({e})") from None


def parse_idx(payload: bytes, source="<bytes>") -> np.ndarray:
    """Decode an IDX file (uint8 data) into an array, checking its header and length."""
    if len(payload) < 4 or payload[0] != 0 or payload[1] != 0:
        raise DatasetError(f"{source}: not an IDX file (bad magic number)")
    if payload[2] != 0x08:
        raise DatasetError(f"{source}: IDX data type 0x{payload[2]:02x} is not unsigned byte (0x08)")
    ndim = payload[3]
    if ndim < 1 or len(payload) < 4 + 4 * ndim:
        raise DatasetError(f"{source}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(payload, ">u4", count=ndim, offset=4))
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(payload) != expected:
        raise DatasetError(f"{source}: IDX payload has {len(payload)} bytes, its header {dims} needs {expected} "
                           "(truncated or corrupt file)")
    return np.frombuffer(payload, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_idx(path) -> np.ndarray:
    """Read an IDX file, gzipped or not."""
    path = Path(path)
    return parse_idx(_read_bytes(path)[1], path)


def _read_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path) as z:
            return np.asarray(z["arr_0"])
    except Exception as e:  # zipfile.BadZipFile, KeyError, ValueError, EOFError ...
        raise DatasetError(f"{path}: cannot read the .npz file ({type(e).__name__}: {e})") from None


def _verify(name: str, path: Path, file_bytes: bytes, payload: bytes):
    base = path.name[:-3] if path.name.endswith(".gz") else path.name
    known = MD5.get(name, {}).get(base)
    if not known:
        return
    sums = {hashlib.md5(file_bytes).hexdigest(), hashlib.md5(payload).hexdigest()}
    if not sums & known:
        raise DatasetError(f"{path}: md5 {sorted(sums)} does not match the official {sorted(known)}; the file is "
                           "corrupt or not the official release (ep_jax.data.load_dataset(..., verify=False) loads it anyway)")


def _find_file(folder: Path, stem: str) -> Path | None:
    for cand in (folder / (stem + ".gz"), folder / stem):
        if cand.is_file():
            return cand
    return None


def _files_in(folder: Path, name: str) -> dict | None:
    """The complete set of files for `name` in `folder`, or None."""
    idx = {k: _find_file(folder, stem) for k, stem in IDX_FILES.items()}
    if all(idx.values()):
        return idx
    if name == "kmnist":
        npz = {k: folder / f for k, f in NPZ_FILES.items()}
        if all(p.is_file() for p in npz.values()):
            return npz
    return None


def load_files(folder, name: str, verify: bool = True, expect_sizes: bool | None = None):
    """Load the raw uint8 images `(N, 28, 28)` and labels from the files in `folder`.

    Returns `(x_train, y_train, x_test, y_test)`; raises `DatasetError` on any problem.
    """
    name = canonical_name(name)
    files = _files_in(Path(folder), name)
    if files is None:
        raise DatasetError(f"{folder}: no complete set of {name} files")
    arrays = {}
    for key, path in files.items():
        if path.suffix == ".npz":
            if verify:
                raw = path.read_bytes()
                _verify(name, path, raw, raw)
            arrays[key] = _read_npz(path)
        else:
            file_bytes, payload = _read_bytes(path)
            if verify:
                _verify(name, path, file_bytes, payload)
            arrays[key] = parse_idx(payload, path)
    for split in ("train", "test"):
        x, y = arrays[(split, "images")], arrays[(split, "labels")]
        fx, fy = files[(split, "images")], files[(split, "labels")]
        if x.dtype != np.uint8:
            raise DatasetError(f"{fx}: images have dtype {x.dtype}, expected uint8 (pixel values 0..255)")
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DatasetError(f"{fx}: images have shape {x.shape}, expected (N, 28, 28)")
        if len(x) == 0:
            raise DatasetError(f"{fx}: holds 0 {split} examples, expected at least 1")
        if not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(f"{fy}: labels have dtype {y.dtype}, expected integers 0..9")
        if y.ndim != 1 or len(y) != len(x):
            raise DatasetError(f"{fy}: {len(y)} labels for {len(x)} images")
        if (verify if expect_sizes is None else expect_sizes) and len(y) != SIZES[split]:
            raise DatasetError(f"{fx}: {len(y)} {split} examples, expected {SIZES[split]}")
        if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise DatasetError(f"{fy}: label {bad} outside 0..9")
    return (arrays[("train", "images")], arrays[("train", "labels")],
            arrays[("test", "images")], arrays[("test", "labels")])


def candidate_dirs(name: str, data_dir=None) -> list[Path]:
    """Folders searched for `name`, in order (see the module docstring). An explicit
    `data_dir` is the only place looked (with its dataset-named subfolders); `./.data`
    is taken relative to the current working directory at the time of the call."""
    if data_dir:
        r = Path(data_dir)
        return list(dict.fromkeys([r] + [r / s for s in SUBFOLDERS[name]]))
    roots = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    out = []
    for r in roots:
        out += [r] + [r / s for s in SUBFOLDERS[name]]
    if name in DEBIAN_DIRS:
        out.append(DEBIAN_DIRS[name])
    local = Path.cwd() / LOCAL_DIR
    for s in SUBFOLDERS[name][:1] + ("fashion_mnist",) * (name == "fashion_mnist"):
        out.append(local / s)
    return list(dict.fromkeys(out))


def available_offline(name: str, data_dir=None) -> bool:
    """Whether a complete set of `name`'s files lies in one of the folders searched
    (`candidate_dirs`); nothing is read beyond the file names, no download is tried."""
    name = canonical_name(name)
    return any(_files_in(f, name) is not None for f in candidate_dirs(name, data_dir))


TFDS_HOST = ("storage.googleapis.com", 443)  # where tensorflow-datasets downloads from


def _online(host=TFDS_HOST, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to tfds' download host opens within `timeout` seconds."""
    import socket
    try:
        socket.create_connection(host, timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_tfds(name: str, data_dir=None):
    import tensorflow_datasets as tfds  # lazy: the core never needs it

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not _online():
            # tfds would retry its downloads for minutes before giving up
            raise DatasetError(f"tensorflow-datasets has no prepared copy of {name!r} and cannot download it "
                               f"(no connection to {TFDS_HOST[0]})")
        builder.download_and_prepare()

    def split(s):
        ds = tfds.data_source(name, split=s, data_dir=data_dir)
        x = np.stack([np.asarray(ex["image"]).reshape(28, 28) for ex in ds]).astype(np.uint8)
        y = np.asarray([ex["label"] for ex in ds])
        return x, y
    (xtr, ytr), (xte, yte) = split("train"), split("test")
    return xtr, ytr, xte, yte


def _finish(name, raw, normalize: bool) -> Dataset:
    xtr, ytr, xte, yte = raw

    def prep(x):
        x = np.asarray(x, np.float32).reshape(len(x), -1) / np.float32(255.0)
        if normalize and NORMALISATION[name]:
            mean, std = NORMALISATION[name]
            x = (x - np.float32(mean)) / np.float32(std)
        return x
    return Dataset(name, prep(xtr), np.asarray(ytr, np.int32), prep(xte), np.asarray(yte, np.int32))


def load_dataset(name: str, data_dir=None, normalize: bool = True, source: str = "auto",
                 verify: bool = True) -> Dataset:
    """Load `name` (mnist, kmnist, fashion_mnist) as a `Dataset` of float32 arrays.

    `source`: "auto" (files, then tfds), "files" or "tfds". See the module docstring for
    the folders searched; with `data_dir` given, only that folder is (no tfds either).
    `verify=False` skips the md5 and size checks (structure, dtypes and the label range
    are always checked).
    """
    name = canonical_name(name)
    if source not in ("auto", "files", "tfds"):
        raise ValueError(f"source must be 'auto', 'files' or 'tfds', got {source!r}")
    if data_dir and source == "auto":
        source = "files"
    looked = []
    if source in ("auto", "files"):
        for folder in candidate_dirs(name, data_dir):
            if _files_in(folder, name) is not None:
                return _finish(name, load_files(folder, name, verify), normalize)
            looked.append(f"  - {folder}: {'no complete set of files' if folder.is_dir() else 'does not exist'}")
    have_tfds = False
    if source in ("auto", "tfds"):
        try:
            import tensorflow_datasets  # noqa: F401
            have_tfds = True
        except ImportError as e:
            looked.append(f"  - tensorflow-datasets: not importable ({e}; pip install 'ep_jax[tfds]')")
        try:
            if have_tfds:
                return _finish(name, _load_tfds(name), normalize)
        except Exception as e:  # download or preparation failure (offline, ...)
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            looked.append(f"  - tensorflow-datasets: {msg or type(e).__name__}")
    how = HOW_TO_GET[name]
    if source != "files":
        how += ("; or let tensorflow-datasets download it on a machine with internet access" if have_tfds
                else "; or pip install 'ep_jax[tfds]' on a machine with internet access")
    raise DatasetError(f"dataset {name!r} not found. Looked in:\n" + "\n".join(looked) + f"\nTo get it: {how}.")


# --- batching -----------------------------------------------------------------------------

def epoch_permutation(key, n: int) -> np.ndarray:
    """The example order of one epoch: a permutation of `range(n)` from `key`."""
    return np.asarray(jax.random.permutation(key, n))


def subset_indices(key, total: int, n: int | None) -> np.ndarray:
    """Indices of a seeded random subset of `n` of `total` examples, in original order
    (all of them when `n` is None). `1 <= n <= total`, else a ValueError."""
    if n is None:
        return np.arange(total)
    if not 1 <= int(n) <= total:
        raise ValueError(f"subset must lie in [1, {total}], got {n}")
    return np.sort(epoch_permutation(key, total)[:int(n)])


def subset(ds: Dataset, n_train: int | None, n_test: int | None = None, key=None) -> Dataset:
    """A seeded random subset (`subset_indices`) of `n_train` train and `n_test` test
    examples; the train and test choices use `split(key)`."""
    key = jax.random.PRNGKey(0) if key is None else key
    k1, k2 = jax.random.split(key)
    i, j = subset_indices(k1, len(ds.y_train), n_train), subset_indices(k2, len(ds.y_test), n_test)
    return Dataset(ds.name, ds.x_train[i], ds.y_train[i], ds.x_test[j], ds.y_test[j])


class batches:
    """Iterator of `(x_batch, y_batch)` device arrays, shuffled by `key` when given.

    A background thread slices and `device_put`s up to `prefetch` batches ahead, so the
    accelerator does not wait on Python. The thread checks a stop flag while it waits on
    the queue: `close()`, leaving a `with` block, dropping the iterator, or interpreter
    exit all stop it, and nothing is printed at exit when the iterator was not used up.

        for xb, yb in batches(x, y, 64, key=jax.random.PRNGKey(0)):
            ...
    """

    def __init__(self, x, y, batch_size: int, key=None, drop_last: bool = False, prefetch: int = 2,
                 device=None):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(y)
        if len(x) != n:
            raise ValueError(f"x and y differ in length: {len(x)} vs {n}")
        order = epoch_permutation(key, n) if key is not None else np.arange(n)
        stops = range(0, (n // batch_size) * batch_size if drop_last else n, batch_size)
        put = (lambda a: jax.device_put(a, device)) if device is not None else jax.device_put
        self._items = ((put(x[order[i:i + batch_size]]), put(y[order[i:i + batch_size]])) for i in stops)
        self._len = len(stops)
        self._thread = None
        if prefetch > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=_produce, args=(self._items, self._queue, self._stop),
                                            daemon=True)
            self._thread.start()
            # runs at garbage collection or at interpreter exit, whichever comes first
            self._finalizer = weakref.finalize(self, _stop_thread, self._stop, self._thread)

    def __len__(self):
        return self._len

    def __iter__(self):
        return self

    def __next__(self):
        if self._thread is None:
            return next(self._items)
        item = self._queue.get()
        if item is _DONE:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self):
        """Stop the producer thread (idempotent)."""
        if self._thread is not None:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_DONE = object()


def _produce(items, q: queue.Queue, stop: threading.Event):
    try:
        for item in items:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        item = _DONE
    except BaseException as e:  # surfaced in the consumer
        item = e
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return
        except queue.Full:
            continue


def _stop_thread(stop: threading.Event, thread: threading.Thread):
    stop.set()
    thread.join(timeout=5)
