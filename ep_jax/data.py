"""Datasets: MNIST, KMNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100, offline from files or
online via tfds.

`load_dataset(name)` returns a `Dataset` of flattened float32 images and int32 labels:
MNIST-family `(N, 784)` = 28x28x1 images (train 60 000, test 10 000), CIFAR `(N, 3072)` =
32x32x3 images flattened in row-major HWC order, i.e. `x.reshape(N, 32, 32, 3)` is the
image (train 50 000, test 10 000; CIFAR-100's fine labels 0..99). `IMAGE_SHAPES` gives each
dataset's `(H, W, C)`. Normalisation, pixels first scaled to [0, 1]: as the reference code,
MNIST unchanged, KMNIST `(x − 0.1918)/0.3483`, Fashion-MNIST `(x − 0.2860)/0.3530`; CIFAR
per channel (R, G, B) `(x − mean)/std` with the values everyone uses — CIFAR-10 mean
(0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010) (those of Laborieux et al. 2021's
code, `main.py` of Laborieux-Axel/Equilibrium-Propagation, which divides by 3 x std on top:
not done here), CIFAR-100 mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762) (the
training set's, as in weiaicunzai/pytorch-cifar100).

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

CIFAR (`cifar10`, `cifar100`; no Debian folder) is read only from the official *binary*
version, with numpy, never unpickled: the archive `cifar-10-binary.tar.gz` (read in memory,
not extracted) or its extracted files `data_batch_1.bin` .. `data_batch_5.bin` and
`test_batch.bin` (records of 1 label byte + 3072 pixel bytes: 1024 R, 1024 G, 1024 B, each
row-major 32x32), or `cifar-100-binary.tar.gz` / `train.bin`, `test.bin` (records of 2 label
bytes, coarse then fine, + 3072; the fine label is used). Subfolders looked in: `cifar10/`,
`cifar-10/`, `CIFAR10/`, `cifar-10-batches-bin/` (`cifar100/`, `cifar-100/`, `CIFAR100/`,
`cifar-100-binary/`). The pickled "python version" (`cifar-10-python.tar.gz`,
`cifar-10-batches-py/`, `data_batch_1` without `.bin`, any file starting with pickle's magic
byte) is refused with one line naming the binary archive to use. Checksums (`verify=True`):
the archives' SHA-256 as tensorflow-datasets publishes them (`url_checksums/cifar10.txt`,
`cifar100.txt`) or their MD5 from the CIFAR page (c32a1d4a..., 03b5dce0...); the extracted
`.bin` files' MD5 as listed by rai-project/dldataset (`vision/cifar10.go`, `cifar100.go`).

File formats: the four standard IDX files (`train-images-idx3-ubyte[.gz]`,
`train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`),
or for KMNIST the official `kmnist-{train,test}-{imgs,labels}.npz` (array `arr_0`).
Files are always checked for structure and content (IDX magic number, dimensions and
payload length; images uint8 `(N, 28, 28)` with N >= 1, integer labels in 0..9, one per
image) and, with `verify=True`, against the official md5 sums (of the file, or of the
decompressed IDX payload: Debian recompressed Fashion-MNIST, so only its payloads
match) and the official sizes. Any problem raises `DatasetError` naming the file;
nothing is returned half-loaded.

Nothing is read or allocated beyond what the formats of the known datasets allow
(`ep_jax._safe_read`): only regular files are read (a named pipe or a device in a file's
place is refused, never waited on); an IDX file, compressed or not, and what a `.gz`
inflates to, is at most `IDX_MAX_BYTES` (60 000 images of 28x28; decompression stops
there, before any checksum, so a gzip bomb costs 47 MB, not all memory); IDX dimensions
are multiplied in exact integers; an npz file holds exactly `arr_0.npy`, whose zip size,
inflated size and npy header (a plain dtype, a shape needing exactly the bytes present)
are checked before the array is made; a CIFAR archive is at most `CIFAR_TAR_BYTES`, read
and inflated to at most that, and its batches' declared sizes are checked before they are
read.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
import weakref
import zlib
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from ep_jax._safe_read import MIB, compression, decompress, read_regular

DATASETS = ("mnist", "kmnist", "fashion_mnist", "cifar10", "cifar100")
CIFAR = ("cifar10", "cifar100")
ALIASES = {
    "fmnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
    "k-mnist": "kmnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}
#: (H, W, C) of each dataset's images; the flat inputs are these in row-major order
IMAGE_SHAPES = {
    "mnist": (28, 28, 1),
    "kmnist": (28, 28, 1),
    "fashion_mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
    "cifar100": (32, 32, 3),
}
N_CLASSES = {"mnist": 10, "kmnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
NORMALISATION = {
    "mnist": None,
    "kmnist": (0.1918, 0.3483),
    "fashion_mnist": (0.2860, 0.3530),
    # per channel (R, G, B); sources in the module docstring
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
SUBFOLDERS = {
    "mnist": ("mnist", "MNIST"),
    "kmnist": ("kmnist", "KMNIST"),
    "fashion_mnist": ("fashion-mnist", "fashion_mnist", "fmnist", "FashionMNIST"),
    "cifar10": ("cifar10", "cifar-10", "CIFAR10", "cifar-10-batches-bin"),
    "cifar100": ("cifar100", "cifar-100", "CIFAR100", "cifar-100-binary"),
}
DEBIAN_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
REPO_ROOT = Path(__file__).resolve().parent.parent  # the folder above the package (not a place looked)
LOCAL_DIR = ".data"  # `./.data/<name>`, relative to the current working directory
ENV_VAR = "EP_JAX_DATA_DIR"
SIZES = {"train": 60000, "test": 10000}
CIFAR_SIZES = {"train": 50000, "test": 10000}

IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
NPZ_FILES = {
    ("train", "images"): "kmnist-train-imgs.npz",
    ("train", "labels"): "kmnist-train-labels.npz",
    ("test", "images"): "kmnist-test-imgs.npz",
    ("test", "labels"): "kmnist-test-labels.npz",
}

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
    "cifar10": "download the binary version https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz into a "
    "folder and pass --data-dir (or set EP_JAX_DATA_DIR)",
    "cifar100": "download the binary version https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz into a "
    "folder and pass --data-dir (or set EP_JAX_DATA_DIR)",
}


class DatasetError(RuntimeError):
    """A dataset is missing, corrupt or fails its checksum."""


class Dataset(NamedTuple):
    """A dataset as host arrays: flattened images and integer labels."""

    name: str
    x_train: np.ndarray  # (N, H*W*C) float32: (60000, 784) MNIST-family, (50000, 3072) CIFAR
    y_train: np.ndarray  # (N,) int32
    x_test: np.ndarray  # (10000, H*W*C) float32
    y_test: np.ndarray  # (10000,) int32


def canonical_name(name: str) -> str:
    """The dataset's name in `DATASETS` (aliases and case resolved); ValueError if unknown."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)} (or alias fmnist)")
    return key


# --- file readers -------------------------------------------------------------------------

#: the most examples one split of a known dataset has (MNIST-family and CIFAR train: 60 000 /
#: 50 000): no IDX, npz or CIFAR file of a known dataset declares more
MAX_EXAMPLES = max(SIZES["train"], CIFAR_SIZES["train"])
#: the largest IDX payload of a known dataset, by its kind: magic + dims + data
IDX_MAX_BYTES = {"images": 4 + 4 * 3 + MAX_EXAMPLES * 28 * 28, "labels": 4 + 4 + MAX_EXAMPLES}
#: room for an npz file's zip and npy headers around the array
NPZ_SLACK = 64 << 10


def _read_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them (`ep_jax._safe_read`);
    DatasetError naming it otherwise."""
    try:
        return read_regular(path, limit, DatasetError, what)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing") from None


def _read_bytes(path: Path, limit: int = max(IDX_MAX_BYTES.values())) -> tuple[bytes, bytes]:
    """(file bytes, payload bytes): the payload is decompressed for `.gz` files. Neither
    may exceed `limit` bytes (the largest IDX file of a known dataset): a bigger file, or
    a gzip stream that would inflate beyond it, is refused as soon as that is known."""
    raw = _read_file(path, limit, "IDX file")
    if path.suffix != ".gz":
        return raw, raw
    return raw, decompress(raw, limit, path, DatasetError, "IDX file")


def parse_idx(payload: bytes, source="<bytes>") -> np.ndarray:
    """Decode an IDX file (uint8 data) into an array, checking its header and length
    (the dimensions' product in exact integers: a header declaring 65536^4 entries does
    not wrap around)."""
    if len(payload) < 4 or payload[0] != 0 or payload[1] != 0:
        raise DatasetError(f"{source}: not an IDX file (bad magic number)")
    if payload[2] != 0x08:
        raise DatasetError(f"{source}: IDX data type 0x{payload[2]:02x} is not unsigned byte (0x08)")
    ndim = payload[3]
    if ndim < 1 or len(payload) < 4 + 4 * ndim:
        raise DatasetError(f"{source}: truncated IDX header")
    dims = tuple(int.from_bytes(payload[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + math.prod(dims)
    if len(payload) != expected:
        raise DatasetError(
            f"{source}: IDX payload has {len(payload)} bytes, its header {dims} needs {expected} "
            "(truncated or corrupt file)"
        )
    return np.frombuffer(payload, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_idx(path, limit: int = max(IDX_MAX_BYTES.values())) -> np.ndarray:
    """Read an IDX file, gzipped or not, of at most `limit` bytes (decompressed)."""
    path = Path(path)
    return parse_idx(_read_bytes(path, limit)[1], path)


def _npz_array(raw: bytes, path: Path, limit: int) -> np.ndarray:
    """The array `arr_0` of the npz file bytes `raw`, checked before anything is
    allocated: one member `arr_0.npy` of at most `limit` bytes (its declared size, and
    what it inflates to), an npy header of a plain dtype whose shape needs exactly the
    bytes that follow. Never unpickles."""
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        infos = z.infolist()
        if [i.filename for i in infos] != ["arr_0.npy"]:
            raise DatasetError(f"{path}: holds {[i.filename for i in infos][:5]}, expected the one array arr_0.npy")
        if infos[0].file_size > limit:
            raise DatasetError(
                f"{path}: arr_0.npy declares {infos[0].file_size} bytes, more than a {path.name} can hold ({limit})"
            )
        with z.open(infos[0]) as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise DatasetError(f"{path}: arr_0.npy inflates to more than {limit} bytes (a decompression bomb?)")
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if header is None:
        raise DatasetError(f"{path}: arr_0.npy is npy format version {version}, expected 1.0 or 2.0")
    shape, fortran, dtype = header(f)
    if dtype.hasobject:
        raise DatasetError(f"{path}: arr_0 has dtype {dtype} (Python objects); ep_jax never unpickles data")
    count = math.prod(shape)
    if len(data) - f.tell() != count * dtype.itemsize:
        raise DatasetError(
            f"{path}: arr_0 declares shape {shape} of {dtype} ({count * dtype.itemsize} bytes), "
            f"the file holds {len(data) - f.tell()}"
        )
    a = np.frombuffer(data, dtype, count, f.tell())
    return a.reshape(shape[::-1]).T if fortran else a.reshape(shape)


def _read_npz(path: Path, kind: str = "images", raw: bytes | None = None) -> np.ndarray:
    limit = IDX_MAX_BYTES[kind] + NPZ_SLACK
    raw = _read_file(path, limit, "npz file") if raw is None else raw
    try:
        return _npz_array(raw, path, limit)
    except DatasetError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError of a bad npy header, EOFError ...
        raise DatasetError(f"{path}: cannot read the .npz file ({type(e).__name__}: {e})") from None


def _verify(name: str, path: Path, file_bytes: bytes, payload: bytes):
    base = path.name[:-3] if path.name.endswith(".gz") else path.name
    known = MD5.get(name, {}).get(base)
    if not known:
        return
    sums = {hashlib.md5(file_bytes).hexdigest(), hashlib.md5(payload).hexdigest()}
    if not sums & known:
        raise DatasetError(
            f"{path}: md5 {sorted(sums)} does not match the official {sorted(known)}; the file is "
            "corrupt or not the official release (ep_jax.data.load_dataset(..., verify=False) loads it anyway)"
        )


def _find_file(folder: Path, stem: str) -> Path | None:
    for cand in (folder / (stem + ".gz"), folder / stem):
        if cand.is_file():
            return cand
    return None


def _files_in(folder: Path, name: str) -> dict | None:
    """The complete set of files for `name` in `folder`, or None."""
    if name in CIFAR:
        return _cifar_files_in(folder, name)
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
    if name in CIFAR:
        return load_cifar_files(folder, name, verify, expect_sizes)
    files = _files_in(Path(folder), name)
    if files is None:
        raise DatasetError(f"{folder}: no complete set of {name} files")
    arrays = {}
    for key, path in files.items():
        if path.suffix == ".npz":
            raw = _read_file(path, IDX_MAX_BYTES[key[1]] + NPZ_SLACK, "npz file")
            if verify:
                _verify(name, path, raw, raw)
            arrays[key] = _read_npz(path, key[1], raw)
        else:
            file_bytes, payload = _read_bytes(path, IDX_MAX_BYTES[key[1]])
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
    return (
        arrays[("train", "images")],
        arrays[("train", "labels")],
        arrays[("test", "images")],
        arrays[("test", "labels")],
    )


# --- CIFAR: the official binary version, fixed-size records read with numpy ----------------

CIFAR_ARCHIVES = {"cifar10": "cifar-10-binary.tar.gz", "cifar100": "cifar-100-binary.tar.gz"}
CIFAR_BINS = {
    "cifar10": {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
    "cifar100": {"train": ("train.bin",), "test": ("test.bin",)},
}
#: label bytes per record (CIFAR-100: coarse, fine) and the label range of each byte
CIFAR_LABEL_BYTES = {"cifar10": (10,), "cifar100": (20, 100)}
CIFAR_PIXELS = 32 * 32 * 3
#: the pickled "python version": what a user may have instead, and what to get
CIFAR_PICKLED = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", "data_batch_1", "test_batch"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", "train", "test"),
}
PICKLE_MAGIC = 0x80  # the first byte of a pickle (protocol >= 2); no CIFAR label byte is that large
# SHA-256 of the archives: tensorflow-datasets' url_checksums/cifar10.txt, cifar100.txt
CIFAR_SHA256 = {
    "cifar-10-binary.tar.gz": "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
    "cifar-100-binary.tar.gz": "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
}
# MD5: of the archives as on https://www.cs.toronto.edu/~kriz/cifar.html; of the extracted
# files as listed by rai-project/dldataset (vision/cifar10.go, vision/cifar100.go)
CIFAR_MD5 = {
    "cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530",
    "cifar-100-binary.tar.gz": "03b5dce01913d631647c71ecec9e9cb8",
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
    "train.bin": "6172c7755cfe09b2fe270c85cebc1b15",
    "test.bin": "4499cfba6c016c1be1438163640a0898",
}
CIFAR_ARCHIVE_BYTES = {"cifar-10-binary.tar.gz": 170052171, "cifar-100-binary.tar.gz": 168513733}
#: the most an archive may take, compressed or not: the binary batches (184 MB, either
#: dataset) plus the tar headers and the small text files beside them
CIFAR_TAR_BYTES = 192 * MIB


def _use_binary(name: str) -> str:
    return (
        f"use the binary version {CIFAR_ARCHIVES[name]} (https://www.cs.toronto.edu/~kriz/"
        f"{CIFAR_ARCHIVES[name]}); ep_jax never unpickles data"
    )


def _is_pickle(path: Path) -> bool:
    """Whether the regular file `path` starts with pickle's magic byte (a pipe or a device
    is not opened)."""
    import stat

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            return os.read(fd, 1) == bytes([PICKLE_MAGIC])
        finally:
            os.close(fd)
    except OSError:
        return False


def _cifar_pickled_in(folder: Path, name: str) -> Path | None:
    """A file or folder of the pickled python version in `folder` (or `folder` itself)."""
    if folder.is_file():
        if folder.name in CIFAR_PICKLED[name][:1] or _is_pickle(folder):
            return folder
        return None
    archive, subdir, *batches = CIFAR_PICKLED[name]
    for cand in (folder / archive, folder / subdir):
        if cand.exists():
            return cand
    for b in batches:
        if (folder / b).is_file() and _is_pickle(folder / b):
            return folder / b
    return None


def _cifar_files_in(folder: Path, name: str) -> dict | None:
    """`{"archive": path}` or `{"bins": {split: [paths]}}` for `name` in `folder` (the
    archive itself may be given as the folder), or None."""
    archive = CIFAR_ARCHIVES[name]
    if folder.is_file():
        return {"archive": folder} if folder.name.endswith((".tar.gz", ".tgz", ".tar")) else None
    bins = {split: [folder / f for f in fs] for split, fs in CIFAR_BINS[name].items()}
    if all(p.is_file() for ps in bins.values() for p in ps):
        return {"bins": bins}
    if (folder / archive).is_file():
        return {"archive": folder / archive}
    return None


def _check_cifar_sum(path: Path, member: str, raw: bytes):
    sha = CIFAR_SHA256.get(member)
    md5 = CIFAR_MD5.get(member)
    if sha is None and md5 is None:
        return
    got_sha, got_md5 = hashlib.sha256(raw).hexdigest(), hashlib.md5(raw).hexdigest()
    if got_sha != sha and got_md5 != md5:
        raise DatasetError(
            f"{path}: md5 {got_md5} does not match the official {member}'s {md5}"
            + (f" (nor sha256 {got_sha[:16]}... its {sha[:16]}...)" if sha else "")
            + "; the file is corrupt or not the official release "
            "(ep_jax.data.load_dataset(..., verify=False) loads it anyway)"
        )


def parse_cifar_records(raw: bytes, name: str, source="<bytes>") -> tuple[np.ndarray, np.ndarray]:
    """`(images (N, 32, 32, 3) uint8 HWC, fine labels (N,) uint8)` of a CIFAR binary batch:
    fixed-size records of the label byte(s) then 3072 pixel bytes (1024 R, 1024 G, 1024 B,
    each row-major 32x32). DatasetError naming `source` for a pickle, a length that is not
    a whole number of records, no record, or a label out of range."""
    ranges = CIFAR_LABEL_BYTES[name]
    rec = len(ranges) + CIFAR_PIXELS
    if raw[:1] == bytes([PICKLE_MAGIC]):
        raise DatasetError(
            f"{source}: a Python pickle (the CIFAR 'python version'), not a binary batch; " + _use_binary(name)
        )
    if len(raw) == 0 or len(raw) % rec:
        raise DatasetError(
            f"{source}: {len(raw)} bytes is not a whole number of {rec}-byte {name} records (truncated or corrupt file)"
        )
    a = np.frombuffer(raw, np.uint8).reshape(-1, rec)
    for j, hi in enumerate(ranges):
        bad = a[:, j] >= hi
        if bad.any():
            i = int(np.argmax(bad))
            raise DatasetError(
                f"{source}: record {i} has label byte {j} = {int(a[i, j])}, outside 0..{hi - 1} "
                "(corrupt file, or not the binary version)"
            )
    x = a[:, len(ranges) :].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), a[:, len(ranges) - 1].copy()


def _read_cifar_archive(path: Path, name: str, verify: bool) -> dict:
    """`{member file name: bytes}` of the binary batches inside the archive (in memory).
    The archive is read (at most `CIFAR_TAR_BYTES`) and decompressed (to at most as much)
    before tar looks at it, and every wanted member's declared size is checked against the
    most records a batch holds before it is read."""
    import io
    import tarfile

    raw = _read_file(path, CIFAR_TAR_BYTES, "CIFAR archive")
    if verify:
        _check_cifar_sum(path, CIFAR_ARCHIVES[name], raw)
    wanted = {f for fs in CIFAR_BINS[name].values() for f in fs}
    most = CIFAR_SIZES["train"] * (len(CIFAR_LABEL_BYTES[name]) + CIFAR_PIXELS)
    out, names = {}, []
    try:
        if compression(raw) is not None or path.name.endswith((".gz", ".tgz")):
            raw = _decompress_archive(raw, path)
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for m in tar:
                names.append(m.name)
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in wanted:
                    if m.size > most or m.offset_data + m.size > len(raw):
                        raise DatasetError(
                            f"{path}: member {m.name} declares {m.size} bytes, more than "
                            + (
                                f"a {name} batch holds ({most})"
                                if m.size > most
                                else "the archive holds (truncated or corrupt archive)"
                            )
                        )
                    out[base] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        first = (str(e).strip().splitlines() or [""])[0].rstrip(":")
        raise DatasetError(f"{path}: corrupt or truncated archive ({type(e).__name__}: {first})") from None
    pickled = CIFAR_PICKLED[name][1]
    if any(n.split("/", 1)[0] == pickled for n in names):
        raise DatasetError(f"{path}: holds the pickled 'python version' ({pickled}/); " + _use_binary(name))
    missing = sorted(wanted - set(out))
    if missing:
        raise DatasetError(
            f"{path}: the archive lacks {', '.join(missing)} (not the {CIFAR_ARCHIVES[name]} archive, or truncated)"
        )
    return out


def _decompress_archive(raw: bytes, path: Path) -> bytes:
    try:
        return decompress(raw, CIFAR_TAR_BYTES, path, DatasetError, "CIFAR archive")
    except DatasetError as e:
        if "corrupt or truncated" in str(e):  # the message the archive's other damage gives
            raise DatasetError(
                str(e).replace("truncated gzip file", "truncated archive", 1).replace("compressed file", "archive", 1)
            ) from None
        raise


def load_cifar_files(folder, name: str, verify: bool = True, expect_sizes: bool | None = None):
    """Load CIFAR's raw uint8 images `(N, 32, 32, 3)` (HWC) and labels from the binary
    archive or its extracted `.bin` files in `folder` (module docstring).

    Returns `(x_train, y_train, x_test, y_test)`; raises `DatasetError` on any problem
    (the pickled python version, checksums with `verify`, record structure, labels, the
    official 50 000 / 10 000 examples with `verify` or `expect_sizes`)."""
    name = canonical_name(name)
    folder = Path(folder)
    pickled = _cifar_pickled_in(folder, name)
    files = _cifar_files_in(folder, name)
    if files is None:
        if pickled is not None:
            raise DatasetError(f"{pickled}: the pickled CIFAR 'python version'; " + _use_binary(name))
        raise DatasetError(f"{folder}: no complete set of {name} files")
    if "archive" in files:
        path = files["archive"]
        if _is_pickle(path) or path.name == CIFAR_PICKLED[name][0]:
            raise DatasetError(f"{path}: the pickled CIFAR 'python version'; " + _use_binary(name))
        blobs = _read_cifar_archive(path, name, verify)
        sources = {f: f"{path}:{f}" for f in blobs}
    else:
        blobs, sources = {}, {}
        most = CIFAR_SIZES["train"] * (len(CIFAR_LABEL_BYTES[name]) + CIFAR_PIXELS)
        for p in (p for ps in files["bins"].values() for p in ps):
            blobs[p.name] = _read_file(p, most, "CIFAR batch")
            sources[p.name] = str(p)
            if verify and blobs[p.name][:1] != bytes([PICKLE_MAGIC]):
                _check_cifar_sum(p, p.name, blobs[p.name])
    out = []
    for split in ("train", "test"):
        parts = [parse_cifar_records(blobs[f], name, sources[f]) for f in CIFAR_BINS[name][split]]
        x = np.concatenate([a for a, _ in parts])
        y = np.concatenate([b for _, b in parts])
        if (verify if expect_sizes is None else expect_sizes) and len(y) != CIFAR_SIZES[split]:
            where = sources[CIFAR_BINS[name][split][0]].rsplit(":", 1)[0] if "archive" in files else folder
            raise DatasetError(f"{where}: {len(y)} {split} examples, expected {CIFAR_SIZES[split]}")
        out += [x, y]
    return tuple(out)


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
            raise DatasetError(
                f"tensorflow-datasets has no prepared copy of {name!r} and cannot download it "
                f"(no connection to {TFDS_HOST[0]})"
            )
        builder.download_and_prepare()

    def split(s):
        ds = tfds.data_source(name, split=s, data_dir=data_dir)
        h, w, c = IMAGE_SHAPES[name]
        shape = (h, w) if c == 1 else (h, w, c)
        x = np.stack([np.asarray(ex["image"]).reshape(shape) for ex in ds]).astype(np.uint8)
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
            # per channel: the flat HWC layout repeats the C channels fastest
            c = IMAGE_SHAPES[name][2]
            mean, std = np.tile(np.float32(mean), x.shape[1] // c), np.tile(np.float32(std), x.shape[1] // c)
            x = (x - mean) / std
        return x

    return Dataset(name, prep(xtr), np.asarray(ytr, np.int32), prep(xte), np.asarray(yte, np.int32))


def load_dataset(
    name: str, data_dir=None, normalize: bool = True, source: str = "auto", verify: bool = True
) -> Dataset:
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
            pickled = _cifar_pickled_in(folder, name) if name in CIFAR else None
            if pickled is not None:  # refused where found, rather than passed over
                raise DatasetError(f"{pickled}: the pickled CIFAR 'python version'; " + _use_binary(name))
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
        how += (
            "; or let tensorflow-datasets download it on a machine with internet access"
            if have_tfds
            else "; or pip install 'ep_jax[tfds]' on a machine with internet access"
        )
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
    return np.sort(epoch_permutation(key, total)[: int(n)])


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

    def __init__(self, x, y, batch_size: int, key=None, drop_last: bool = False, prefetch: int = 2, device=None):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(y)
        if len(x) != n:
            raise ValueError(f"x and y differ in length: {len(x)} vs {n}")
        order = epoch_permutation(key, n) if key is not None else np.arange(n)
        stops = range(0, (n // batch_size) * batch_size if drop_last else n, batch_size)
        put = (lambda a: jax.device_put(a, device)) if device is not None else jax.device_put
        self._items = ((put(x[order[i : i + batch_size]]), put(y[order[i : i + batch_size]])) for i in stops)
        self._len = len(stops)
        self._thread = None
        if prefetch > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=_produce, args=(self._items, self._queue, self._stop), daemon=True)
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
