"""Checkpoints without pickle: msgpack arrays plus JSON metadata, written atomically.

A checkpoint file (`checkpoint.msgpack`) is one msgpack map:

    {"format": "ep_jax-checkpoint", "version": 1,
     "meta":  JSON text: epoch, config digest, the metrics history, ...,
     "state": the run's state as nested maps of arrays (`flax.serialization`)}

Reading never executes anything from the file: msgpack decodes plain maps, strings,
numbers and raw array bytes (dtype by name, object arrays refused). The state is restored
into a *template* built from the run's config; every leaf's path, shape and dtype must
match, else `CheckpointError` (one line) and nothing changes.

Dendritic masks (0/1 arrays) are stored as packed bits (1/32 of float32) and checked to
unpack to exactly 0/1.

Writes go to a fresh temporary file in the run folder (`mkstemp`, so nothing planted at a
predictable name can redirect them), are fsynced, then renamed over the old file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax
import msgpack
import numpy as np
from flax import serialization

FORMAT, VERSION = "ep_jax-checkpoint", 1
_UMASK = os.umask(0)
os.umask(_UMASK)
MASK_KEY = "masks"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, of another run, or does not fit the template."""


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
    atomic_write(path, text.encode())


def _pack_masks(tree):
    """Replace every leaf under a "masks" key by its packed bits."""
    if isinstance(tree, dict):
        return {k: (jax.tree.map(lambda a: np.packbits(np.asarray(a) != 0), v) if k == MASK_KEY
                    else _pack_masks(v)) for k, v in tree.items()}
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
                        raise CheckpointError(f"mask of shape {ref.shape} stored with {bits.size} bytes of "
                                              f"{bits.dtype}, expected {-(-ref.size // 8)} uint8")
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


def encode(state, meta: dict) -> bytes:
    """Serialise `state` (any pytree of arrays) and `meta` (JSON-able)."""
    sd = _pack_masks(serialization.to_state_dict(jax.device_get(state)))
    return msgpack.packb({"format": FORMAT, "version": VERSION, "meta": json.dumps(meta),
                          "state": serialization.msgpack_serialize(sd)}, use_bin_type=True)


def _unpack(data: bytes, source) -> tuple[dict, bytes]:
    """`(meta, state bytes)`: the outer layer only, the arrays still undecoded."""
    try:
        outer = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:
        raise CheckpointError(f"{source}: not an ep_jax checkpoint (unreadable as msgpack)") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not an ep_jax checkpoint")
    if outer.get("version") != VERSION:
        raise CheckpointError(f"{source}: checkpoint version {outer.get('version')!r}, this ep_jax reads {VERSION}")
    try:
        meta = json.loads(outer["meta"])
        state = outer["state"]
    except Exception as e:
        raise CheckpointError(f"{source}: damaged checkpoint ({type(e).__name__})") from None
    if not isinstance(meta, dict) or not isinstance(state, bytes):
        raise CheckpointError(f"{source}: damaged checkpoint (bad layout)")
    return meta, state


def decode(data: bytes, source="checkpoint") -> tuple[dict, dict]:
    """`(meta, raw state dict)` of checkpoint bytes; CheckpointError if it is not one."""
    meta, state = _unpack(data, source)
    try:
        sd = serialization.msgpack_restore(state)
    except Exception as e:
        raise CheckpointError(f"{source}: damaged checkpoint ({type(e).__name__})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source}: damaged checkpoint (bad layout)")
    return meta, sd


def restore(template, sd: dict, source="checkpoint"):
    """The pytree of `template`'s structure with the stored arrays; every leaf's path,
    shape and dtype must match."""
    tsd = serialization.to_state_dict(template)
    try:
        sd = _unpack_masks(sd, tsd)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    want, got = _paths(tsd), _paths(sd)
    if set(want) != set(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise CheckpointError(f"{source}: does not fit this run's state (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    for k, ref in want.items():
        a = got[k]
        if a.shape != ref.shape or a.dtype != ref.dtype:
            raise CheckpointError(f"{source}: {k} is {a.dtype}{list(a.shape)}, this run needs "
                                  f"{ref.dtype}{list(ref.shape)}")
    return serialization.from_state_dict(template, sd)


def save(path: Path, state, meta: dict):
    atomic_write(path, encode(state, meta))


def load(path: Path, template) -> tuple[dict, object]:
    """`(meta, state)` from `path`, restored into `template`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint") from None
    meta, sd = decode(data, str(path))
    return meta, restore(template, sd, str(path))


def read_meta(path: Path) -> dict:
    """The metadata of a checkpoint, without restoring its arrays."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint") from None
    return _unpack(data, str(path))[0]
