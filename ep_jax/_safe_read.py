"""Reading files a user hands us: regular files only, never more than the format allows.

`read_regular(path, limit, error)` is the one way ep_jax reads a file it did not just
write (data files, checkpoints, run folders' JSON, sweep specs, lease archives). It opens
without blocking (a named pipe in place of a file is refused, not waited on), reads only a
regular file (a pipe, a device such as `/dev/zero`, a socket or a folder is refused), and
refuses a file larger than `limit` bytes before reading any of it; a file that grows while
it is read is cut at `limit` + 1 bytes and refused. Every refusal is `error(message)`, the
message naming the file on one line.

`decompress(data, limit, source, error)` inflates gzip (also several members in a row),
bzip2 or xz data to at most `limit` bytes, stopping as soon as more would come out: a bomb
is refused after producing `limit` + 1 bytes, not after exhausting memory.
"""

from __future__ import annotations

import bz2
import lzma
import os
import stat
import zlib
from pathlib import Path

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def size_text(n: int) -> str:
    """`n` bytes for a message: `512 bytes`, `3.0 MiB`, `8.0 GiB`."""
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def a(what: str) -> str:
    """`what` with its indefinite article: "a checkpoint", "an IDX file"."""
    return ("an " if what[:1].lower() in "aeio" or what[:3] in ("IDX", "npz", "MD5") else "a ") + what


def _kind(mode: int) -> str:
    return (
        "a folder"
        if stat.S_ISDIR(mode)
        else "a named pipe (FIFO)"
        if stat.S_ISFIFO(mode)
        else "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )


def read_regular(path, limit: int, error=OSError, what: str = "file"):
    """The bytes of the regular file `path`, at most `limit` of them; `error(message)`
    naming `path` when it is missing, not a regular file, or larger than `limit`
    (`what` says what the file is, for the message: "checkpoint", "IDX file", ...).
    A missing file raises `FileNotFoundError`, so that callers may treat it apart."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not {a(what)}") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                raise error(f"{path}: is a folder, not {a(what)}")
            raise error(f"{path}: is {_kind(st.st_mode)}, not a regular file; refusing to read it as {a(what)}")
        if st.st_size > limit:
            raise error(
                f"{path}: {size_text(st.st_size)}, more than {a(what)} can be ({size_text(limit)}); "
                "damaged or not this kind of file"
            )
        chunks, n = [], 0
        while n <= limit:
            b = os.read(fd, min(limit + 1 - n, 16 * MIB))
            if not b:
                break
            chunks.append(b)
            n += len(b)
    except OSError as e:
        if isinstance(e, error):
            raise
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if n > limit:
        raise error(f"{path}: grew past {size_text(limit)} while being read, more than {a(what)} can be")
    return b"".join(chunks)


def _decompressor(data: bytes):
    if data[:2] == b"\x1f\x8b":
        return "gzip", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)
    if data[:3] == b"BZh":
        return "bzip2", bz2.BZ2Decompressor
    if data[:6] == b"\xfd7zXZ\x00":
        return "xz", lzma.LZMADecompressor
    return None, None


def compression(data: bytes) -> str | None:
    """ "gzip", "bzip2" or "xz" by the magic bytes of `data`; None for anything else."""
    return _decompressor(data)[0]


def decompress(data: bytes, limit: int, source, error=OSError, what: str = "file") -> bytes:
    """`data` (gzip, bzip2 or xz) decompressed: at most `limit` bytes, else `error` naming
    `source`; a truncated or corrupt stream (bad CRC or length included) is `error` too."""
    kind, make = _decompressor(data)
    if kind is None:
        raise error(f"{source}: corrupt or truncated compressed file (not gzip, bzip2 or xz data)")
    out, n, rest = [], 0, data
    try:
        while rest:
            d = make()
            chunk = (
                d.decompress(rest, limit + 1 - n) if kind == "gzip" else d.decompress(rest, max_length=limit + 1 - n)
            )
            while True:
                out.append(chunk)
                n += len(chunk)
                if n > limit:
                    raise error(
                        f"{source}: decompresses to more than {size_text(limit)}, more than {a(what)} can be "
                        "(a damaged file or a decompression bomb)"
                    )
                if kind == "gzip":
                    if d.eof or not d.unconsumed_tail:
                        break
                    chunk = d.decompress(d.unconsumed_tail, limit + 1 - n)
                else:
                    if d.eof or d.needs_input:
                        break
                    chunk = d.decompress(b"", max_length=limit + 1 - n)
            if not d.eof:
                raise error(f"{source}: corrupt or truncated {kind} file (the stream ends before its end marker)")
            rest = d.unused_data
            if kind == "gzip" and rest and rest[:2] != b"\x1f\x8b" and not rest.strip(b"\x00"):
                break  # zero padding after the last member (tar.gz written in blocks)
    except (zlib.error, OSError, EOFError, lzma.LZMAError) as e:
        if isinstance(e, error):
            raise
        raise error(f"{source}: corrupt or truncated {kind} file ({type(e).__name__}: {e})") from None
    return b"".join(out)
