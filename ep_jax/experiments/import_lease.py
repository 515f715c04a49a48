"""Unpack what a GPU lease brought back (`benchmarks/lease.sh`) into the results.

    python -m experiments.import_lease FOLDER_OR_ARCHIVE [--dest experiments/results/gpu-lease]

The lease packs its run folders into one gzip'd tar split into parts of at most 15 MiB
(`lease.tgz.00`, `lease.tgz.01`, ...: the GPU machine returns at most 8 files of 16 MiB).
Given the folder the files came back in, or any one part, or a whole `.tgz`, this joins
the parts in order, checks every member before writing anything — regular files and
folders only, relative paths without `..` (anything else is refused in one line) — and
writes:

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
import io
import json
import sys
import tarfile
from pathlib import Path, PurePosixPath

from ep_jax.experiments import cli
from ep_jax.experiments.errors import RunError

DEST = Path("experiments/results/gpu-lease")
RESUME = Path(".lease/resume")
CHECKPOINT = "checkpoint.msgpack"
PART = "lease.tgz."


def parts_of(path: Path) -> list[Path]:
    """The archive's parts in order: `lease.tgz.NN` in a folder, the siblings of one part,
    or one whole archive file."""
    if path.is_dir():
        found = sorted(path.glob(PART + "*"))
        if not found:
            raise RunError(f"{path}: no {PART}NN parts in this folder (is it what the lease brought back?)")
        return found
    if not path.is_file():
        raise RunError(f"{path}: no such file or folder")
    if path.name.startswith(PART) and path.name[len(PART):].isdigit():
        return sorted(path.parent.glob(PART + "*"))
    return [path]


def check_member(m: tarfile.TarInfo) -> PurePosixPath:
    """The member's relative path; a one-line RunError for anything unsafe."""
    p = PurePosixPath(m.name)
    if p.is_absolute() or m.name.startswith(("/", "\\")) or ".." in p.parts or ":" in m.name:
        raise RunError(f"refusing archive member {m.name!r}: absolute path or '..' (nothing was written)")
    if not (m.isfile() or m.isdir()):
        raise RunError(f"refusing archive member {m.name!r}: not a regular file or folder (nothing was written)")
    return p


def read(parts: list[Path]) -> list[tuple[PurePosixPath, bytes | None]]:
    """`[(relative path, bytes or None for a folder)]` of the joined archive, all checked."""
    blob = b"".join(p.read_bytes() for p in parts)
    try:
        tf = tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz")
        members = tf.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise RunError(f"{parts[0]}: not a complete lease archive ({len(parts)} part(s) joined: "
                       f"{type(e).__name__}: {e})") from None
    paths = [check_member(m) for m in members]
    out = []
    for m, p in zip(members, paths):
        out.append((p, tf.extractfile(m).read() if m.isfile() else None))
    return out


def write(entries, dest: Path, resume: Path) -> dict:
    """Write the checked entries; returns counts."""
    n_files = n_ckpt = 0
    for p, data in entries:
        if data is None:
            continue
        target = (resume if p.name == CHECKPOINT else dest) / Path(*p.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".importing")
        tmp.write_bytes(data)
        tmp.replace(target)
        n_ckpt += p.name == CHECKPOINT
        n_files += p.name != CHECKPOINT
    # a run finished in this lease needs no checkpoint from an earlier one
    stale = 0
    for ck in resume.rglob(CHECKPOINT) if resume.exists() else []:
        summary = dest / ck.parent.relative_to(resume) / "summary.json"
        if finished_summary(summary):
            ck.unlink()
            stale += 1
    return {"files": n_files, "checkpoints": n_ckpt, "stale_checkpoints_removed": stale}


def finished_summary(path: Path) -> bool:
    """A run is finished when its summary says `ok` or `diverged` with every epoch done
    (the config's `epochs`, beside it)."""
    try:
        s = json.loads(path.read_text())
        cfg = json.loads((path.parent / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if s.get("status") == "diverged":
        return True
    return s.get("status") == "ok" and (s.get("epochs_done") or 0) >= cfg.get("epochs", 0)


def parser():
    """The command line's argument parser."""
    p = argparse.ArgumentParser(prog=cli.prog("import_lease"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive", help="the folder the lease's files came back in, one lease.tgz.NN part, or a .tgz")
    p.add_argument("--dest", default=str(DEST), help=f"where the run files go (default {DEST})")
    p.add_argument("--resume-dir", default=str(RESUME),
                   help=f"where the checkpoints of unfinished runs go (default {RESUME}, carried by the next lease)")
    return p


def main(argv=None) -> int:
    """`python -m experiments.import_lease`: returns the exit status."""
    a = parser().parse_args(argv)
    parts = parts_of(Path(a.archive))
    entries = read(parts)
    dest, resume = Path(a.dest), Path(a.resume_dir)
    counts = write(entries, dest, resume)
    runs = sorted({p.parent for p, d in entries if d is not None and p.name == "summary.json"})
    done = sum(finished_summary(dest / Path(*r.parts) / "summary.json") for r in runs)
    print(f"imported {counts['files']} files of {len(runs)} runs ({done} finished) into {dest}, "
          f"{counts['checkpoints']} checkpoints of unfinished runs into {resume}"
          + (f" ({counts['stale_checkpoints_removed']} stale removed)" if counts["stale_checkpoints_removed"] else "")
          + f"; from {len(parts)} part(s)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_wrapper(main))
