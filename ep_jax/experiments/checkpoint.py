"""Checkpoints without pickle: msgpack arrays plus JSON metadata, checksummed, checked
against the run's config, written atomically.

A checkpoint file (`checkpoint.msgpack`) is one msgpack map (format version 2):

    {"format": "ep_jax-checkpoint", "version": 2,
     "meta":   JSON text: epoch, config digest, name, the metrics history, ep_jax, backend,
     "state":  the run's state as nested maps of arrays (`flax.serialization`) in msgpack,
     "sha256": {"meta": hex SHA-256 of the meta text (UTF-8), "state": of the state bytes}}

Reading never executes anything from the file: msgpack decodes plain maps, strings,
numbers and raw array bytes (dtype by name, object arrays refused). Every refusal is one
`CheckpointError` line naming the file, raised before anything on disk changes.

What `load(path, template)` checks, in this order:

1. the layout of the outer map (format, version, exactly its entries) and the metadata's
   digest (`read_meta` does steps 1 and 2 only, without decoding the arrays);
2. the metadata: `epoch` an int >= 0 (not a bool), `digest` and `name` strings, `history`
   a list of one table per epoch (`len(history) == epoch`; row i has `epoch` i + 1, an
   int `steps` >= 0 that never decreases, and numbers for the metrics);
3. the arrays fit the *template* built from the run's config: every leaf's path, shape
   and dtype (so a file of another run or layout says which leaf differs);
4. the state digest: a flipped byte anywhere is "damaged checkpoint (content digest
   mismatch ...)";
5. the values (`check_state`): leaves that the config and seed fix (the relaxation β and
   dt, the injected optimiser hyperparameters lr/momentum, the model buffers alpha/gamma
   and dendritic masks, the step key) equal the template's; the parameters and optimiser
   moments are finite (Adam's second moments >= 0); `alive` is true and `diverged_step`
   is a live member's (a checkpoint is only written for a live member); `step` >= 0,
   every optimiser `count` equals it, and it equals the last history row's `steps` (0 at
   epoch 0).

Fixed leaves must equal the template's exactly, with one allowance: time steps *drawn*
from a distribution (the vector `relaxation.dt` entries of heterogeneous-dt runs: `exp`,
`log` of random normals) may differ from the template's by `ULPS` units in the last place,
since the template is recomputed on the reading machine and another backend may round
those functions differently. Scalars (β, a scalar dt, lr, momentum, alpha/gamma), masks,
keys and counters get no allowance at all.

Version-1 files (ep_jax 0.2.0 before the digest; run folders made then exist) have the
same layout without `sha256`; they are read without a digest check (nothing to check them
against) and get every other check above. A version-1 file that carries a `sha256` entry
is refused (no writer made one). Newer versions are refused.

Dendritic masks (0/1 arrays) are stored as packed bits (1/32 of float32) and checked to
unpack to exactly 0/1.

Only a regular file is read (a named pipe or a device such as `/dev/zero` in its place is
refused in one line, never waited on), and only up to what it can hold: `MAX_BYTES` (4 GiB
of state, the most one msgpack `bin 32` holds, plus the metadata), or with a template its
arrays' bytes twice over plus `META_BYTES`; a larger file is refused before any of it is read.

Writes go to a fresh temporary file in the run folder (`mkstemp`, so nothing planted at a
predictable name can redirect them), are fsynced, then renamed over the old file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import jax
import msgpack
import numpy as np
from flax import serialization

from ep_jax._safe_read import GIB, MIB, read_regular

FORMAT, VERSION = "ep_jax-checkpoint", 2
READABLE_VERSIONS = (1, 2)
ULPS = 4
_UMASK = os.umask(0)
os.umask(_UMASK)
MASK_KEY = "masks"
_ENTRIES = {1: {"format", "version", "meta", "state"}, 2: {"format", "version", "meta", "state", "sha256"}}
META_FIELDS = ("epoch", "digest", "name", "history")
ROW_NUMBERS = ("train_acc", "loss", "test_acc", "test_loss", "time_s")
#: the largest checkpoint file read at all: the state is one msgpack `bin 32` (at most
#: 4 GiB by the format), plus the metadata
MAX_BYTES = 4 * GIB + 64 * MIB
#: room for the layout and the metadata (the history grows ~200 bytes an epoch)
META_BYTES = 64 * MIB


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, damaged, of another run, or does not fit the template."""


def atomic_write(path: Path, data: bytes):
    """Write `data` to `path` atomically (unique temp file in the same folder, fsync, rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str):
    """`atomic_write` of `text` encoded as UTF-8."""
    atomic_write(path, text.encode())


def _pack_masks(tree):
    """Replace every leaf under a "masks" key by its packed bits."""
    if isinstance(tree, dict):
        return {
            k: (jax.tree.map(lambda a: np.packbits(np.asarray(a) != 0), v) if k == MASK_KEY else _pack_masks(v))
            for k, v in tree.items()
        }
    return tree


def _unpack_masks(tree, template):
    if isinstance(tree, dict) and isinstance(template, dict):
        out = {}
        for k, v in tree.items():
            if k == MASK_KEY and k in template:

                def unpack(bits, ref):
                    ref = np.asarray(ref)
                    bits = np.asarray(bits)
                    if bits.dtype != np.uint8 or bits.ndim != 1 or bits.size != -(-ref.size // 8):
                        raise CheckpointError(
                            f"mask of shape {ref.shape} stored with {bits.size} bytes of "
                            f"{bits.dtype}, expected {-(-ref.size // 8)} uint8"
                        )
                    return np.unpackbits(bits, count=ref.size).reshape(ref.shape).astype(ref.dtype)

                try:
                    out[k] = jax.tree.map(unpack, v, serialization.to_state_dict(template[k]))
                except ValueError as e:
                    raise CheckpointError(f"stored masks do not match the model's structure ({e})") from None
            else:
                out[k] = _unpack_masks(v, template.get(k))
        return out
    return tree


def _paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def _named(sd) -> dict:
    """`{dotted name: array}` of a state dict (`relaxation.beta`, `sweep.train.step`, ...)."""
    flat = jax.tree_util.tree_flatten_with_path(sd)[0]
    return {
        ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in p): np.asarray(v)
        for p, v in flat
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(state, meta: dict, *, packed: bool = False) -> bytes:
    """Serialise `state` (any pytree of arrays) and `meta` (JSON-able) as a version-2
    checkpoint, with the SHA-256 of both.

    packed: `state` is a raw state dict as `decode` returns it (masks already packed
    bits), stored as it is: for tools (and tests) that rewrite a decoded checkpoint."""
    sd = serialization.to_state_dict(jax.device_get(state))
    if not packed:
        sd = _pack_masks(sd)
    text = json.dumps(meta)
    state_bytes = serialization.msgpack_serialize(sd)
    return msgpack.packb(
        {
            "format": FORMAT,
            "version": VERSION,
            "meta": text,
            "state": state_bytes,
            "sha256": {"meta": _sha256(text.encode()), "state": _sha256(state_bytes)},
        },
        use_bin_type=True,
    )


class _Outer(NamedTuple):
    meta: dict
    state: bytes
    state_sha256: str | None  # None: a version-1 file (nothing to check against)
    version: int


def _is_hex_digest(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _unpack(data: bytes, source) -> _Outer:
    """The outer layer only (the meta digest checked, the arrays still undecoded)."""
    try:
        outer = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:
        raise CheckpointError(f"{source}: not an ep_jax checkpoint (unreadable as msgpack)") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not an ep_jax checkpoint")
    version = outer.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{source}: checkpoint version {_brief(version)}, this ep_jax reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if set(outer) != _ENTRIES[version]:
        missing, extra = sorted(_ENTRIES[version] - set(outer)), sorted(map(str, set(outer) - _ENTRIES[version]))
        raise CheckpointError(
            f"{source}: damaged checkpoint (a version-{version} checkpoint "
            + (f"without {missing}" if missing else "")
            + (" and " if missing and extra else "")
            + (f"with unexpected {_brief(extra)}" if extra else "")
            + ")"
        )
    text, state = outer["meta"], outer["state"]
    if not isinstance(text, str) or not isinstance(state, bytes):
        raise CheckpointError(f"{source}: damaged checkpoint (bad layout)")
    state_sha256 = None
    if version >= 2:
        sums = outer["sha256"]
        if not isinstance(sums, dict) or set(sums) != {"meta", "state"} or not all(map(_is_hex_digest, sums.values())):
            raise CheckpointError(f"{source}: damaged checkpoint (its sha256 entry is not two SHA-256 digests)")
        try:
            meta_bytes = text.encode()
        except UnicodeError:
            meta_bytes = None
        if meta_bytes is None or _sha256(meta_bytes) != sums["meta"]:
            raise CheckpointError(
                f"{source}: damaged checkpoint (content digest mismatch: the metadata is not what was written)"
            )
        state_sha256 = sums["state"]
    try:
        meta = json.loads(text)
    except Exception as e:
        raise CheckpointError(f"{source}: damaged checkpoint (metadata: {type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: damaged checkpoint (the metadata is not a table)")
    return _Outer(meta, state, state_sha256, version)


def _verify_state(outer: _Outer, source):
    if outer.state_sha256 is not None and _sha256(outer.state) != outer.state_sha256:
        raise CheckpointError(
            f"{source}: damaged checkpoint (content digest mismatch: the arrays are not what was written)"
        )


def _decode_state(outer: _Outer, source) -> dict:
    try:
        sd = serialization.msgpack_restore(outer.state)
    except Exception as e:
        raise CheckpointError(f"{source}: damaged checkpoint ({type(e).__name__})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source}: damaged checkpoint (bad layout)")
    return sd


def decode(data: bytes, source="checkpoint", verify: bool = True) -> tuple[dict, dict]:
    """`(meta, raw state dict)` of checkpoint bytes; CheckpointError if it is not one or
    (`verify`, the default) its content digest does not match. The metadata and values are
    not checked (`check_meta`, `check_state`): this is the raw access for tools and tests."""
    outer = _unpack(data, source)
    sd = _decode_state(outer, source)
    if verify:
        _verify_state(outer, source)
    return outer.meta, sd


# --- metadata -----------------------------------------------------------------------------


def _brief(v, limit=60) -> str:
    """repr of a value read from a file, on one line and short."""
    try:
        r = repr(v)
    except ValueError:  # an int too long to print
        r = f"<{type(v).__name__}>"
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _is_int(v) -> bool:
    return type(v) is int


def _is_number(v) -> bool:
    return type(v) in (int, float)


def check_meta(meta, source="checkpoint") -> dict:
    """`meta` if it is a checkpoint's metadata the engine can use, else CheckpointError
    naming `source` and the field: `epoch` an int >= 0 (not a bool), `digest` and `name`
    strings, `ep_jax`/`backend` strings where present, `history` a list of `epoch` tables
    (row i: `epoch` i + 1, an int `steps` >= 0, never decreasing, numbers for
    `ROW_NUMBERS`)."""

    def bad(field, what):
        raise CheckpointError(f"{source}: damaged checkpoint metadata: {field} {what}")

    if not isinstance(meta, dict):
        bad("the metadata", "is not a table")
    for key in META_FIELDS:
        if key not in meta:
            bad(key, "is missing")
    epoch = meta["epoch"]
    if not _is_int(epoch) or epoch < 0:
        bad("epoch", f"is {_brief(epoch)}, must be an integer >= 0")
    for key in ("digest", "name") + tuple(k for k in ("ep_jax", "backend") if k in meta):
        if not isinstance(meta[key], str):
            bad(key, f"is {_brief(meta[key])}, must be a string")
    history = meta["history"]
    if not isinstance(history, list):
        bad("history", f"is {_brief(history)}, must be a list of one table per epoch")
    if len(history) != epoch:
        bad("history", f"has {len(history)} rows, epoch is {epoch}")
    steps = 0
    for i, row in enumerate(history):
        where = f"history[{i}]"
        if not isinstance(row, dict):
            bad(where, f"is {_brief(row)}, must be a table")
        if row.get("epoch") != i + 1 or not _is_int(row.get("epoch")):
            bad(f"{where}.epoch", f"is {_brief(row.get('epoch'))}, must be {i + 1}")
        s = row.get("steps")
        if "steps" not in row:
            bad(f"{where}.steps", "is missing")
        if not _is_int(s) or s < steps:
            bad(
                f"{where}.steps",
                f"is {_brief(s)}, must be an integer >= {steps} (the step counter after epoch {i + 1})",
            )
        steps = s
        for key in ROW_NUMBERS:
            if not _is_number(row.get(key)):
                bad(f"{where}.{key}", "is missing" if key not in row else f"is {_brief(row[key])}, must be a number")
    return meta


# --- values -------------------------------------------------------------------------------


def _fmt(v) -> str:
    v = v.item() if isinstance(v, np.generic) else v
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _show(a: np.ndarray) -> str:
    if a.ndim == 0:
        return _fmt(a[()])
    if a.size <= 8:
        return "[" + ", ".join(_fmt(v) for v in a.ravel()) + "]"
    return f"{a.dtype}{list(a.shape)}"


def _show_pair(a: np.ndarray, ref: np.ndarray) -> tuple[str, str]:
    sa, sr = _show(a), _show(ref)
    if sa == sr and a.size <= 8 and np.issubdtype(a.dtype, np.floating):  # differ below %g's digits
        full = lambda x: (
            np.format_float_positional(x[()], unique=True, trim="-")
            if x.ndim == 0
            else "[" + ", ".join(np.format_float_positional(v, unique=True, trim="-") for v in x.ravel()) + "]"
        )
        sa, sr = full(a), full(ref)
    return sa, sr


def _fixed(name: str) -> bool:
    """Leaves that the config and seed fix: they must equal the template's."""
    parts = name.split(".")
    return parts[0] == "relaxation" or "buffers" in parts or "hyperparams" in parts or name == "sweep.key"


def _ulps(name: str, ref: np.ndarray) -> int:
    """Units in the last place a fixed leaf may differ by: only drawn time steps."""
    return ULPS if name.startswith("relaxation.dt.") and ref.ndim >= 1 else 0


def _agrees(a: np.ndarray, ref: np.ndarray, ulps: int) -> np.ndarray:
    """Elementwise: `a` is `ref` (floats: within `ulps` units in the last place of `ref`)."""
    if not np.issubdtype(ref.dtype, np.floating) or ulps == 0:
        return a == ref
    tol = ulps * np.spacing(np.abs(ref)).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.isfinite(a) & (np.abs(a.astype(np.float64) - ref.astype(np.float64)) <= tol)


def check_state(state, template, meta: dict | None = None, source="checkpoint"):
    """CheckpointError (naming `source`, the leaf, its stored value and the config's)
    unless the restored `state` is one the run's config and seed can have produced: see
    the module docstring, step 5. `state` and `template` are pytrees of the same
    structure (the restored checkpoint and the member's freshly initialised state, e.g.
    `{"sweep": SweepState, "relaxation": Relaxation}`); leaves are named by their dotted
    path (`relaxation.beta`, `sweep.train.opt_state.hyperparams.lr`). With `meta`, the step
    counter must also equal its history's (`check_meta` first)."""
    got, want = _named(serialization.to_state_dict(state)), _named(serialization.to_state_dict(template))

    def bad(text):
        raise CheckpointError(f"{source}: {text}")

    for name, ref in want.items():
        a = got[name]
        parts = name.split(".")
        if _fixed(name):
            ok = _agrees(a, ref, _ulps(name, ref))
            if not np.all(ok):
                if a.size <= 8:
                    sa, sr = _show_pair(a, ref)
                    bad(f"{name} is {sa}, the config says {sr}")
                bad(f"{name} differs from the config's in {int(ok.size - ok.sum())} of {a.size} entries")
        elif name == "sweep.alive":
            if not np.all(a):
                bad(f"{name} is {_show(a)}: a checkpoint is only written for a live member")
        elif name == "sweep.diverged_step":
            if not np.array_equal(a, ref):
                bad(f"{name} is {_show(a)}, a live member's is {_show(ref)}")
        elif parts[-1] == "step" and np.issubdtype(ref.dtype, np.integer):
            if np.any(a < 0):
                bad(f"{name} is {_show(a)}, must be >= 0")
        elif np.issubdtype(ref.dtype, np.inexact):
            finite = np.isfinite(a)
            if not np.all(finite):
                what = (
                    "non-finite parameters"
                    if "params" in parts
                    else "non-finite optimiser state"
                    if "opt_state" in parts
                    else "non-finite values"
                )
                bad(
                    f"{what} ({name}: {int(a.size - finite.sum())} of {a.size} values, e.g. "
                    f"{_fmt(a[~finite].ravel()[0])})"
                )
            if parts[-1] == "nu" and "opt_state" in parts and np.any(a < 0):
                bad(f"{name} (second moments) holds negative values")
    step_name = next((n for n in want if n.endswith("train.step")), None)
    if step_name is None:
        return
    step = got[step_name]
    for name in want:
        parts = name.split(".")
        if parts[-1] == "count" and "opt_state" in parts and not np.array_equal(got[name], step):
            bad(f"{name} is {_show(got[name])}, the step counter {step_name} is {_show(step)}")
    if meta is not None and step.ndim == 0:
        history = meta.get("history") or []
        expected = history[-1].get("steps") if history else 0
        if int(step) != expected:
            where = (
                f"the history's last row (epoch {len(history)}) says steps={expected}"
                if history
                else "a checkpoint of epoch 0 is at step 0"
            )
            bad(f"{step_name} is {int(step)}, {where}")


# --- restoring ----------------------------------------------------------------------------


def _fit(template, sd: dict, source) -> dict:
    """`sd` with its masks unpacked, after checking that every leaf's path, shape and dtype
    are the template's."""
    tsd = serialization.to_state_dict(template)
    try:
        sd = _unpack_masks(sd, tsd)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    want, got = _paths(tsd), _paths(sd)
    if set(want) != set(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise CheckpointError(
            f"{source}: does not fit this run's state (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for k, ref in want.items():
        a = got[k]
        if a.shape != ref.shape or a.dtype != ref.dtype:
            raise CheckpointError(
                f"{source}: {k} is {a.dtype}{list(a.shape)}, this run needs {ref.dtype}{list(ref.shape)}"
            )
    return sd


def restore(template, sd: dict, source="checkpoint"):
    """The pytree of `template`'s structure with the stored arrays; every leaf's path,
    shape and dtype must match (values are `check_state`'s business)."""
    return serialization.from_state_dict(template, _fit(template, sd, source))


def save(path: Path, state, meta: dict):
    """Write `encode(state, meta)` to `path` atomically."""
    atomic_write(path, encode(state, meta))


def max_bytes(template=None) -> int:
    """The largest checkpoint file read: what the format allows (`MAX_BYTES`), and with a
    `template` what its arrays can take (their bytes, plus `META_BYTES` for the layout and
    the metadata)."""
    if template is None:
        return MAX_BYTES
    leaves = jax.tree.leaves(serialization.to_state_dict(template))
    arrays = sum(int(v.nbytes) if hasattr(v, "nbytes") else np.asarray(v).nbytes for v in leaves)
    return min(MAX_BYTES, 2 * arrays + META_BYTES)


def _read(path: Path, limit: int = None) -> bytes:
    """The checkpoint file's bytes: a regular file of at most `limit` bytes
    (`ep_jax._safe_read.read_regular`; a pipe or a device is refused, never waited on)."""
    try:
        return read_regular(path, MAX_BYTES if limit is None else limit, CheckpointError, "checkpoint")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint") from None


def load(path: Path, template, *, check: bool = True) -> tuple[dict, object]:
    """`(meta, state)` from `path`, restored into `template` (the run's freshly
    initialised state, built from its config and seed).

    Always checked: the layout, the content digests (version 2), every leaf's path, shape
    and dtype. With `check` (the default) also the metadata (`check_meta`) and the values
    (`check_state`: what the config fixes equals the template, finite parameters, a live
    member, the step counter matching the history). `check=False` is for tools that must
    read a checkpoint the engine would refuse."""
    path = Path(path)
    source = str(path)
    outer = _unpack(_read(path, max_bytes(template)), source)
    if check:
        check_meta(outer.meta, source)
    sd = _fit(template, _decode_state(outer, source), source)
    _verify_state(outer, source)
    state = serialization.from_state_dict(template, sd)
    if check:
        check_state(state, template, outer.meta, source)
    return outer.meta, state


def read_meta(path: Path, *, check: bool = True) -> dict:
    """The metadata of a checkpoint, without decoding its arrays: the layout and the
    metadata's digest are checked, and with `check` (the default) its fields
    (`check_meta`)."""
    path = Path(path)
    meta = _unpack(_read(path), str(path)).meta
    return check_meta(meta, str(path)) if check else meta
