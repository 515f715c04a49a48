"""Unpack what a GPU lease brought back (`benchmarks/lease.sh`) into the results.

    python -m experiments.import_lease FOLDER_OR_ARCHIVE [--dest experiments/results/gpu-lease]

The lease packs its run folders into one gzip'd tar split into parts of at most 15 MiB
(`lease.tgz.00`, `lease.tgz.01`, ...: the GPU machine returns at most 8 files of 16 MiB),
and records in `lease.json` (beside the parts, step `pack`, entry `archive`) a manifest:
every part's name, size and SHA-256, the whole archive's size and SHA-256, and every
packed file's size and SHA-256. Given the folder the files came back in, or any one part,
this checks everything before writing anything:

- the parts: exactly the manifest's (a missing, extra or renamed part is named), each of
  its size and SHA-256, joined in the manifest's order, the whole archive's digest;
- the archive: gzip inflated to at most what the manifest's files take (or `MAX_UNPACKED`),
  CRC and length checked; the tar read to its end-of-archive marker (a damaged header in
  the middle is refused, not taken for the end); every member's declared size within the
  archive;
- the members: regular files (and folders) only, relative paths of plain names (no `..`,
  `.`, empty or absolute parts, no backslash or colon), each once; with a manifest, exactly
  its files, each of its size and SHA-256.

An archive of the lease's earlier format (no manifest in `lease.json`, or a whole `.tgz`
given) is imported only when it can still be verified whole: parts named `lease.tgz.00` up
to `lease.tgz.NN` without a gap, the joined stream's gzip CRC-32 and length, the tar to its
end marker; anything else is refused in one line, naming what is wrong. Then it writes:

- every run file (config, metrics, summary, results.md, speed.json, lease.json) under
  `--dest` (default `experiments/results/gpu-lease`): small, to be committed;
- the checkpoints of unfinished runs (`checkpoint.msgpack`) under `--resume-dir` (default
  `.lease/resume`, git-ignored): the next lease carries `.lease`, copies them back into
  its run folders and continues those runs where this lease stopped.

Runs the next lease treats as finished (summary status `ok` or `diverged`, all epochs
done) are skipped by it; a run whose checkpoint did not fit into the archive starts
again from scratch. Importing the same archive twice gives the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import sys
import tarfile
from pathlib import Path, PurePosixPath

from ep_jax._safe_read import MIB, decompress, read_regular
from ep_jax.experiments import checkpoint as ckpt
from ep_jax.experiments import cli, files, runfolder
from ep_jax.experiments.errors import RunError

DEST = Path("experiments/results/gpu-lease")
RESUME = Path(".lease/resume")
CHECKPOINT = "checkpoint.msgpack"
PART = "lease.tgz."
MANIFEST = "lease.json"
FORMAT, VERSION = "ep_jax-lease", 2
#: the largest part read (the lease writes 15 MiB; the machine returns files of at most 16)
MAX_PART = 16 * MIB
#: the most parts read (the lease writes at most 5 beside its 3 other files; tests more)
MAX_PARTS = 16
#: the most an archive may inflate to without a manifest to bound it
MAX_UNPACKED = 1024 * MIB
#: the largest lease.json read
MAX_MANIFEST = 16 * MIB
_HEX = re.compile(r"[0-9a-f]{64}")
_UNSAFE = re.compile(r"[\\:\x00-\x1f\x7f]")


def sha256(data: bytes) -> str:
    """The hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def part_name(i: int) -> str:
    """The name of part `i` as the lease writes it (`lease.tgz.00`)."""
    return f"{PART}{i:02d}"


def parts_of(path: Path) -> tuple[list[Path], Path | None]:
    """`(parts, folder holding lease.json or None)`: the `lease.tgz.*` files of a folder
    (or of the folder of one part), or one whole archive file. Parts are not yet in any
    order: `verified_blob` orders them by the manifest or by their numbers."""
    if path.is_dir():
        found = sorted(path.glob(PART + "*"))
        if not found:
            raise RunError(f"{path}: no {PART}NN parts in this folder (is it what the lease brought back?)")
        return found, path
    if not path.exists():
        raise RunError(f"{path}: no such file or folder")
    if path.name.startswith(PART) and path.name[len(PART) :].isdigit():
        return sorted(path.parent.glob(PART + "*")), path.parent
    return [path], None


def read_manifest(folder: Path | None) -> dict | None:
    """The archive manifest of `folder/lease.json` (step `pack`, entry `archive`), checked
    for its layout; None when there is no lease.json or it has no manifest (the earlier
    format, or a lease stopped between writing its parts and its manifest)."""
    if folder is None:
        return None
    path = folder / MANIFEST
    text = files.read_text(path, limit=MAX_MANIFEST)
    if text is None:
        return None
    lease = files.parse_json(text, str(path), "table")
    pack = (lease.get("steps") or {}).get("pack") if isinstance(lease.get("steps"), dict) else None
    m = pack.get("archive") if isinstance(pack, dict) else None
    if m is None:
        return None

    def bad(what):
        raise RunError(f"{path}: damaged archive manifest ({what}); nothing was written")

    def entry(e, where):
        if not (
            isinstance(e, dict)
            and type(e.get("bytes")) is int
            and e["bytes"] >= 0
            and isinstance(e.get("sha256"), str)
            and _HEX.fullmatch(e["sha256"])
        ):
            bad(f"{where} needs an integer 'bytes' and a hex 'sha256'")

    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        bad(f"expected format {FORMAT!r} version {VERSION}")
    entry(m, "the archive")
    parts = m.get("parts")
    if not isinstance(parts, list) or not 1 <= len(parts) <= MAX_PARTS:
        bad(f"'parts' must list 1 to {MAX_PARTS} parts")
    for i, p in enumerate(parts):
        entry(p, f"part {i}")
        if p.get("name") != part_name(i):
            bad(f"part {i} is named {str(p.get('name'))[:40]!r}, expected {part_name(i)!r}")
    if sum(p["bytes"] for p in parts) != m["bytes"]:
        bad("the parts' sizes do not add up to the archive's")
    fs = m.get("files")
    if not isinstance(fs, dict) or not fs:
        bad("'files' must map every packed file to its size and digest")
    for name, e in fs.items():
        entry(e, f"file {name[:80]!r}")
    return m


def _join(parts: list[Path]) -> list[bytes]:
    return [read_regular(p, MAX_PART, RunError, "lease part") for p in parts]


def verified_blob(parts: list[Path], manifest: dict | None) -> tuple[bytes, str]:
    """The joined archive bytes, every part checked (module docstring); and how."""
    if manifest is not None:
        want = [p["name"] for p in manifest["parts"]]
        have = {p.name: p for p in parts}
        missing, extra = [n for n in want if n not in have], sorted(set(have) - set(want))
        if missing:
            raise RunError(
                f"{parts[0].parent}: part(s) {', '.join(missing)} missing (the lease wrote {len(want)}: "
                f"{want[0]} .. {want[-1]}); nothing was written"
            )
        if extra:
            raise RunError(
                f"{have[extra[0]]}: not one of the lease's {len(want)} parts (its manifest lists "
                f"{want[0]} .. {want[-1]}); remove it or fetch the files again; nothing was written"
            )
        blobs = _join([have[n] for n in want])
        for e, path, b in zip(manifest["parts"], (have[n] for n in want), blobs):
            if len(b) != e["bytes"] or sha256(b) != e["sha256"]:
                raise RunError(
                    f"{path}: {len(b)} bytes, SHA-256 {sha256(b)[:16]}...; the lease's manifest says "
                    f"{e['bytes']} bytes, {e['sha256'][:16]}... (damaged, or of another lease); "
                    "nothing was written"
                )
        blob = b"".join(blobs)
        if len(blob) != manifest["bytes"] or sha256(blob) != manifest["sha256"]:
            raise RunError(
                f"{parts[0].parent}: the joined parts do not match the manifest's archive digest; nothing was written"
            )
        return blob, f"{len(parts)} part(s), each checked against the lease's manifest"
    if len(parts) == 1 and not parts[0].name.startswith(PART):
        return read_regular(parts[0], MAX_PART * MAX_PARTS, RunError, "lease archive"), "one archive file"
    if len(parts) > MAX_PARTS:
        raise RunError(f"{parts[0].parent}: {len(parts)} {PART}* files, a lease writes at most {MAX_PARTS}")
    names = sorted(p.name for p in parts)
    want = [part_name(i) for i in range(len(parts))]
    nums = sorted(int(n[len(PART) :]) for n in names if n[len(PART) :].isdigit())
    if names != want and len(nums) == len(names) and names == sorted(part_name(i) for i in nums):
        missing = [part_name(i) for i in range(nums[-1]) if i not in set(nums)]
        raise RunError(
            f"{parts[0].parent}: part(s) {', '.join(missing[:5])} missing (found {len(parts)} parts up to "
            f"{part_name(nums[-1])}, and no manifest in {MANIFEST}); nothing was written"
        )
    if names != want:
        odd = next(n for n in names if n not in want)
        raise RunError(
            f"{parts[0].parent / odd}: the parts must be named {want[0]} .. {want[-1]} without a gap, as "
            f"the lease writes them (and there is no manifest in {MANIFEST} to order them by); "
            "nothing was written"
        )
    by = {p.name: p for p in parts}
    return b"".join(_join([by[n] for n in want])), f"{len(parts)} part(s) in order, no manifest"


def check_member(m: tarfile.TarInfo) -> PurePosixPath:
    """The member's relative path; a one-line RunError for anything unsafe: not a
    regular file or folder, an absolute path, a part that is empty, `.` or `..`, a
    backslash, colon or control character, or a name that is not its own normal form."""
    name = m.name
    p = PurePosixPath(name)
    if (
        name.startswith(("/", "\\"))
        or _UNSAFE.search(name)
        or not p.parts
        or p.is_absolute()
        or any(part in (".", "..") for part in name.rstrip("/").split("/"))
        or str(p) != name.rstrip("/")
    ):
        raise RunError(
            f"refusing archive member {name[:100]!r}: not a plain relative path (absolute, '.', '..', "
            "empty parts or odd characters); nothing was written"
        )
    if not (m.isfile() or m.isdir()):
        raise RunError(f"refusing archive member {name[:100]!r}: not a regular file or folder (nothing was written)")
    return p


def unpack(blob: bytes, source, limit: int) -> list[tuple[tarfile.TarInfo, bytes]]:
    """`[(member, bytes)]` of the gzip'd tar `blob`: inflated to at most `limit` bytes
    (CRC and length checked), read to its end-of-archive marker, every size within it."""
    try:
        tar = decompress(blob, limit, source, RunError, "lease archive")
    except RunError as e:
        raise RunError(
            f"{source}: not a complete lease archive ({str(e).removeprefix(f'{source}: ')}); nothing was written"
        ) from None
    try:
        tf = tarfile.open(fileobj=io.BytesIO(tar), mode="r:")
        members = tf.getmembers()
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise RunError(
            f"{source}: not a complete lease archive ({type(e).__name__}: {e}); nothing was written"
        ) from None
    if tar[tf.offset :].strip(b"\x00"):
        raise RunError(
            f"{source}: not a complete lease archive (a damaged tar header at byte {tf.offset} after "
            f"{len(members)} member(s)); nothing was written"
        )
    out = []
    for m in members:
        check_member(m)
        if m.isfile() and m.offset_data + m.size > len(tar):
            raise RunError(
                f"refusing archive member {m.name[:100]!r}: declares {m.size} bytes, more than the "
                "archive holds; nothing was written"
            )
        out.append((m, tar[m.offset_data : m.offset_data + m.size] if m.isfile() else b""))
    return out


def read(parts: list[Path], folder: Path | None = None) -> tuple[list[tuple[PurePosixPath, bytes | None]], str]:
    """`([(relative path, bytes or None for a folder)], how it was verified)` of the
    archive, everything checked (module docstring) before anything is written."""
    manifest = read_manifest(folder)
    blob, how = verified_blob(parts, manifest)
    source = parts[0] if len(parts) == 1 else parts[0].parent
    if manifest is not None:
        fs = manifest["files"]
        limit = sum(-(-e["bytes"] // 512) * 512 + 3 * 512 + len(n) for n, e in fs.items()) + 64 * 1024
    else:
        limit = MAX_UNPACKED
    members = unpack(blob, source, min(limit, MAX_UNPACKED))
    out, seen = [], {}
    for m, data in members:
        p = PurePosixPath(m.name.rstrip("/"))
        if p in seen and not (m.isdir() and seen[p] is None):
            raise RunError(f"refusing archive member {m.name[:100]!r}: in the archive twice; nothing was written")
        seen[p] = data if m.isfile() else None
        out.append((p, data if m.isfile() else None))
    file_paths = {p for p, d in out if d is not None}
    for p in file_paths:
        clash = next((q for q in p.parents if q in file_paths), None)
        if clash is not None:
            raise RunError(
                f"refusing archive member {str(p)[:100]!r}: inside {str(clash)!r}, which is a file; nothing was written"
            )
    if manifest is not None:
        got = {str(p): d for p, d in out if d is not None}
        missing, extra = sorted(set(fs) - set(got)), sorted(set(got) - set(fs))
        if missing or extra:
            raise RunError(
                f"{source}: the archive's files differ from the manifest's ("
                + (f"missing {missing[:3]}" if missing else "")
                + (", " if missing and extra else "")
                + (f"not listed {extra[:3]}" if extra else "")
                + "); nothing was written"
            )
        for name, d in got.items():
            if len(d) != fs[name]["bytes"] or sha256(d) != fs[name]["sha256"]:
                raise RunError(
                    f"{source}: {name}: SHA-256 does not match the manifest's (damaged archive); nothing was written"
                )
        how += ", every file's SHA-256 too"
    return out, how


def write(entries, dest: Path, resume: Path) -> dict:
    """Write the checked entries; returns counts. Every target folder is checked first
    (`runfolder.check_outputs`): a file there that ep_jax did not write (not in the
    folder's manifest), a link or a folder in a file's place refuses the import before
    anything is written; the written names are recorded in each folder's manifest."""
    targets: dict[Path, list[tuple[str, bytes]]] = {}
    for p, data in entries:
        # the GPU machine's manifests stay there: here each folder's manifest records what
        # the import itself writes (runfolder.claim_outputs)
        if data is not None and p.name != runfolder.MANIFEST:
            folder = (resume if p.name == CHECKPOINT else dest) / Path(*p.parts[:-1])
            targets.setdefault(folder, []).append((p.name, data))
    for folder, items in targets.items():
        for parent in [folder, *folder.parents]:
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    raise RunError(f"{parent} exists and is not a folder; nothing was written")
                break
        runfolder.check_outputs(folder, [n for n, _ in items], "import-lease")
    n_files = n_ckpt = 0
    for folder, items in targets.items():
        runfolder.claim_outputs(folder, [n for n, _ in items], "import-lease")
        for name, data in items:
            ckpt.atomic_write(folder / name, data)
            n_ckpt += name == CHECKPOINT
            n_files += name != CHECKPOINT
    # a run finished in this lease needs no checkpoint from an earlier one; only a checkpoint
    # that an import wrote (listed in its folder's manifest) is removed
    stale = 0
    for ck in resume.rglob(CHECKPOINT) if resume.is_dir() else []:
        summary = dest / ck.parent.relative_to(resume) / "summary.json"
        if (
            not ck.is_symlink()
            and ck.is_file()
            and CHECKPOINT in runfolder.owned(ck.parent)["files"]
            and finished_summary(summary)
        ):
            ck.unlink()
            stale += 1
    return {"files": n_files, "checkpoints": n_ckpt, "stale_checkpoints_removed": stale}


def finished_summary(path: Path) -> bool:
    """A run is finished when its summary says `ok` or `diverged` with every epoch done
    (the config's `epochs`, beside it)."""
    try:  # regular files of bounded size only (a pipe in their place is not waited on)
        s = files.read_json(path, "table")
        cfg = files.read_json(path.parent / "config.json", "table")
    except (RunError, OSError):
        return False
    if s is None or cfg is None:
        return False
    if s.get("status") == "diverged":
        return True
    done, epochs = s.get("epochs_done") or 0, cfg.get("epochs", 0)
    return s.get("status") == "ok" and isinstance(done, int) and isinstance(epochs, int) and done >= epochs


def parser():
    """The command line's argument parser."""
    p = argparse.ArgumentParser(
        prog=cli.prog("import_lease"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("archive", help="the folder the lease's files came back in, one lease.tgz.NN part, or a .tgz")
    p.add_argument("--dest", default=str(DEST), help=f"where the run files go (default {DEST})")
    p.add_argument(
        "--resume-dir",
        default=str(RESUME),
        help=f"where the checkpoints of unfinished runs go (default {RESUME}, carried by the next lease)",
    )
    return p


def main(argv=None) -> int:
    """`python -m experiments.import_lease`: returns the exit status."""
    a = parser().parse_args(argv)
    parts, folder = parts_of(Path(a.archive))
    entries, how = read(parts, folder)
    dest, resume = Path(a.dest), Path(a.resume_dir)
    counts = write(entries, dest, resume)
    runs = sorted({p.parent for p, d in entries if d is not None and p.name == "summary.json"})
    done = sum(finished_summary(dest / Path(*r.parts) / "summary.json") for r in runs)
    print(
        f"imported {counts['files']} files of {len(runs)} runs ({done} finished) into {dest}, "
        f"{counts['checkpoints']} checkpoints of unfinished runs into {resume}"
        + (f" ({counts['stale_checkpoints_removed']} stale removed)" if counts["stale_checkpoints_removed"] else "")
        + f"; from {how}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_wrapper(main))
