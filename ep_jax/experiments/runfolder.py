"""A run folder: its files, who holds it, and what may replace it.

One folder per run (a single run, or one member of a sweep):

- `config.json`        the run's `RunConfig` (round-trips through `RunConfig.from_dict`);
- `metrics.jsonl`      one line per finished epoch; always equal to the checkpoint's history;
- `checkpoint.msgpack` the state after the last finished epoch (`experiments.checkpoint`);
- `summary.json`       status, message, final/best accuracy — written on every exit path;
- `learning_curve.png`, `alignment.png` (with alignment tracking);
- `tensorboard/`       event files (`--log tensorboard`);
- `.ep_jax-files.json` the manifest: what ep_jax writes here (below).

Every write is atomic (a fresh temporary file in the folder, fsynced, renamed over the
old one), so an interruption leaves the previous version of a file, never half of one.

**One process at a time.** `hold()` takes an OS-level lock (`flock` on the folder
itself, so nothing is created to take it) before the first write and keeps it until the
run ends; the kernel releases it when the process exits, also after `kill -9`. While it
is held, a second command refuses with one line naming the folder and the holder (pid,
host, start time, from `.ep_jax-holder.json`, written once the holder starts writing and
removed when it lets go).

**What the project wrote: the manifest.** A run folder (and a sweep or reproduce output
folder) records, in `.ep_jax-files.json`, the names of the files and sub-folders ep_jax
writes there — recorded *before* the first write, so the record is never short of what is
on disk: `{"ep_jax": "manifest", "version": 1, "files": [...], "folders": [...]}` (names,
one path component each, sorted). A folder made before manifests existed counts as having
written only the project's known names (`RUN_FILES`; a sweep: `sweep.json` and
`results.md` beside a readable `sweep.json`).

**What `--overwrite` may remove.** Only a folder this project made as a run folder (its
`config.json` reads as a run config and it has a `summary.json` or a checkpoint), never
the working directory or a folder above it — and in it only the entries the manifest
names (a `tensorboard/` folder only while it holds nothing but event files), by name,
without following symbolic links. A folder holding anything else (a user's `notes.txt`,
`analysis/`, a symbolic link, even one named like a run file) is refused in one line
naming the first such entry, and nothing is removed.

**Output files beside a user's.** `claim_outputs(folder, names)` is how the commands that
write fixed-name outputs (`aggregate --out/--plot`, `stability --out`, the analysis
commands' figures and JSON) take a name: it refuses, naming it, a file that exists and
that the folder's manifest does not list (ep_jax did not write it), and records the names
before they are written. `sweep` and `reproduce` check their `sweep.json`/`results.md` the
same way (accepting, in folders made before manifests, what they wrote then) and `record`
them.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ep_jax._safe_read import MIB, read_regular
from ep_jax.experiments import checkpoint as ckpt
from ep_jax.experiments.errors import RunError

CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "checkpoint.msgpack"
CURVE, ALIGNMENT = "learning_curve.png", "alignment.png"
HOLDER = ".ep_jax-holder.json"
MANIFEST = ".ep_jax-files.json"
TENSORBOARD = "tensorboard"
#: the files a run folder made before manifests existed may hold (besides the holder note)
RUN_FILES = (CONFIG, METRICS, SUMMARY, CHECKPOINT, CURVE, ALIGNMENT)
#: what a sweep folder made before manifests existed may hold (with a readable sweep.json)
SWEEP_FILES = ("sweep.json", "results.md")
#: the names tensorboardX gives its event files
EVENTS_PREFIX = "events.out.tfevents."


# --- the manifest: what ep_jax wrote in a folder ------------------------------------------


def read_manifest(folder: Path) -> dict | None:
    """`{"files": set, "folders": set}` recorded in `folder` (module docstring); None when
    there is no manifest; RunError naming it when it is damaged."""
    path = Path(folder) / MANIFEST
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise RunError(f"{path}: not a regular file ep_jax wrote (a link, a folder or a pipe); move it away")
    try:  # a regular file of a bounded size: a pipe or a device in its place is refused, never waited on
        text = read_regular(path, 16 * MIB, RunError, "manifest").decode("utf-8")
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, OSError) as e:
        raise RunError(f"{path}: unreadable ({e}); move it away or restore it") from None
    try:
        d = json.loads(text)
        ok = (
            isinstance(d, dict)
            and d.get("ep_jax") == "manifest"
            and all(
                isinstance(d.get(k, []), list) and all(isinstance(n, str) and _plain_name(n) for n in d.get(k, []))
                for k in ("files", "folders")
            )
        )
    except (ValueError, RecursionError):
        ok = False
    if not ok:
        raise RunError(f"{path}: not an ep_jax manifest (damaged or edited); restore it or move it away")
    return {"files": set(d.get("files", [])), "folders": set(d.get("folders", []))}


def _plain_name(n: str) -> bool:
    return bool(n) and n not in (".", "..") and "/" not in n and "\\" not in n and "\0" not in n


def record(folder: Path, files=(), folders=()):
    """Add `files` and `folders` (names inside `folder`) to its manifest (written
    atomically, only when something is new). Call it before writing them."""
    folder = Path(folder)
    have = owned(folder)
    files, folders = set(files) - have["files"], set(folders) - have["folders"]
    if not files and not folders and (folder / MANIFEST).is_file():
        return
    have["files"] |= files
    have["folders"] |= folders
    ckpt.atomic_write_text(
        folder / MANIFEST,
        json.dumps(
            {"ep_jax": "manifest", "version": 1, "files": sorted(have["files"]), "folders": sorted(have["folders"])},
            indent=1,
        )
        + "\n",
    )


def owned(folder: Path) -> dict:
    """`{"files": set, "folders": set}` that ep_jax wrote in `folder`: its manifest, or for
    a folder made before manifests existed, what it counted as ours then (a run folder's
    known files and `tensorboard/`, a sweep folder's `sweep.json` and `results.md`)."""
    have = read_manifest(folder) if Path(folder).is_dir() else None
    if have is None:
        have = {"files": set(), "folders": set()}
        if is_run_folder(folder):
            have = {"files": set(RUN_FILES), "folders": {TENSORBOARD}}
        elif _is_sweep_record(Path(folder) / "sweep.json"):
            have["files"] = set(SWEEP_FILES)
    return have


def _is_sweep_record(path: Path) -> bool:
    """Whether `path` is a sweep's `sweep.json` (a table with a list of members)."""
    try:
        d = json.loads(read_regular(path, 64 * MIB, RunError, "sweep record")) if not path.is_symlink() else None
    except (OSError, RunError, ValueError, RecursionError):
        return False
    return isinstance(d, dict) and isinstance(d.get("members"), list)


def _is_temp(name: str, files) -> bool:
    """A temporary file an interrupted atomic write of one of `files` left (`.NAME.xxxx.tmp`)."""
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in files)


def first_foreign(folder: Path, files, folders=(), folder_ok=None) -> str | None:
    """The first entry of `folder` (sorted) that ep_jax did not write there: not one of
    `files` (plain files, not links), not one of `folders` (real folders, checked with
    `folder_ok(path) -> foreign entry or None` when given), not the holder note, the
    manifest or a temporary file of an interrupted write. None when there is none."""
    files, folders = set(files) | {HOLDER, MANIFEST}, set(folders)
    for p in sorted(Path(folder).iterdir(), key=lambda q: q.name):
        n = p.name
        if p.is_symlink():
            return n
        if n in files or _is_temp(n, files):
            if p.is_file():
                continue
            return n
        if n in folders and p.is_dir():
            inner = folder_ok(p) if folder_ok is not None else None
            if inner is None:
                continue
            return f"{n}/{inner}"
        return n
    return None


def _events_only(path: Path) -> str | None:
    """The first entry of a `tensorboard/` folder that is not an event file (None: all are)."""
    for q in sorted(path.iterdir(), key=lambda q: q.name):
        if q.is_symlink() or not q.is_file() or not q.name.startswith(EVENTS_PREFIX):
            return q.name
    return None


def run_manifest(path: Path) -> dict:
    """What ep_jax wrote in a run folder: its manifest, or for a folder made before
    manifests existed the known run files and `tensorboard/`."""
    m = read_manifest(path)
    return m if m is not None else {"files": set(RUN_FILES), "folders": {TENSORBOARD}}


def check_outputs(folder: Path, names, what: str = ""):
    """The check of `claim_outputs`, writing nothing: RunError (one line) when one of
    `names` exists in `folder` and ep_jax did not write it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunError(f"{folder} exists and is not a folder")
    mine = owned(folder)["files"]
    for n in names:
        p = folder / n
        if p.is_symlink() or (p.exists() and (not p.is_file() or n not in mine)):
            raise RunError(
                f"{p} exists and ep_jax did not write it; {what or 'this command'} never writes over "
                "a file it did not write: move it away or choose another output path"
            )


def check_output_file(path, what: str):
    """`check_outputs` of a single output file given by its path."""
    path = Path(path)
    if not path.name or path.name in (".", ".."):
        raise RunError(f"{what}: {str(path)!r} is not a file name")
    check_outputs(path.parent, [path.name], what)


def claim_outputs(folder: Path, names, what: str = "") -> Path:
    """Make `folder` (and its parents) if needed, refuse (RunError, one line) when one of
    `names` exists there and ep_jax did not write it (its manifest does not list it, or it
    is a link or a folder), then record `names` in the manifest; returns `folder`. Every
    command that writes fixed-name outputs calls it before writing them."""
    folder = Path(folder)
    check_outputs(folder, names, what)
    folder.mkdir(parents=True, exist_ok=True)
    record(folder, files=names)
    return folder


def claim_output_file(path, what: str) -> Path:
    """`claim_outputs` of a single output file given by its path (`--out table.md`)."""
    path = Path(path)
    check_output_file(path, what)
    claim_outputs(path.parent, [path.name], what)
    return path


def guard_removal(path: Path, what: str = "--overwrite"):
    """Refuse (RunError) to remove the working directory, a folder above it, or the root."""
    p = Path(path).resolve()
    cwd = Path.cwd().resolve()
    if p == cwd or p in cwd.parents or p == Path(p.anchor):
        raise RunError(f"{path}: {what} never removes the working directory or a folder above it")


def is_run_folder(path: Path) -> bool:
    """Whether `path` looks like a run folder this project made (module docstring)."""
    from ep_jax.experiments.config import RunConfig

    path = Path(path)
    if not (path / CONFIG).is_file() or not ((path / SUMMARY).is_file() or (path / CHECKPOINT).is_file()):
        return False
    try:
        RunConfig.from_dict(json.loads(read_regular(path / CONFIG, 64 * MIB, RunError, "config")))
    except Exception:  # noqa: BLE001 — any failure means "not recognisably ours"
        return False
    return True


def _folder_check(m: dict):
    """How a run folder's sub-folders are checked: `tensorboard/` holds only event files."""
    return lambda p: _events_only(p) if p.name == TENSORBOARD else first_foreign(p, ())


class FolderLock:
    """An exclusive `flock` on a folder, held by this process until `release()`.

    `acquire()` creates the folder (and its parents) if needed — `created` lists what it
    made, so a refusal can take them away again — and raises RunError naming the holder
    when another process has it."""

    def __init__(self, path: Path, kind: str = "run"):
        self.path = Path(path)
        self.kind = kind
        self.fd = None
        self.created: list[Path] = []

    def acquire(self):
        """Take the lock (module docstring); RunError if another process holds it."""
        if self.fd is not None:
            return self
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunError(f"{p} exists and is not a folder")
        missing = []
        q = p
        while not q.exists():
            missing.append(q)
            q = q.parent
        for q in reversed(missing):
            q.mkdir(exist_ok=True)
            self.created.append(q)
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self.undo_created()
            raise RunError(
                f"{p} is in use: {holder_text(p)} holds this {self.kind} folder; wait for it to "
                "finish (or stop it) and try again"
            ) from None
        except OSError:  # a file system without flock: go on unlocked rather than refuse every run
            os.close(fd)
            return self
        self.fd = fd
        return self

    def write_holder(self):
        """Record who holds the folder (for the refusal message of a second process)."""
        import sys

        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:300],
        }
        ckpt.atomic_write_text(self.path / HOLDER, json.dumps(info) + "\n")

    def undo_created(self):
        """Remove the folders `acquire` made, if they are still empty."""
        for q in sorted(self.created, key=lambda q: len(q.parts), reverse=True):
            try:
                q.rmdir()
            except OSError:
                pass
        self.created = []

    def release(self):
        """Let go: remove the holder note, unlock."""
        if self.fd is None:
            return
        try:
            (self.path / HOLDER).unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def holder_text(path: Path) -> str:
    """`"process 123 on host (since ...)"` from the holder note, or "another process"."""
    try:
        h = json.loads(read_regular(Path(path) / HOLDER, MIB, RunError, "holder note"))
        return f"process {int(h['pid'])} on {h['host']} (since {h['started']}: {h.get('command', '')[:80]})"
    except Exception:  # noqa: BLE001 — no note yet (the holder is still checking) or a damaged one
        return "another process"


class RunFolder:
    """The files of one run folder (module docstring); writes are atomic."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = FolderLock(self.path)

    def file(self, name: str) -> Path:
        """The path of one of the folder's files."""
        return self.path / name

    def busy(self) -> bool:
        """Holds anything (other than a stale holder note or a manifest alone)."""
        return self.path.is_dir() and any(p.name not in (HOLDER, MANIFEST) for p in self.path.iterdir())

    def check_manifest(self):
        """Refuse (RunError) a damaged manifest (`read_manifest`) before the run writes."""
        if self.path.is_dir():
            read_manifest(self.path)

    def check_new(self):
        """Refuse (RunError) a folder that holds anything, saying what it holds."""
        if not self.busy():
            return
        if (self.path / CONFIG).exists() or (self.path / CHECKPOINT).exists():
            raise RunError(
                f"{self.path} already holds a run: pass --resume to continue it or --overwrite to replace it"
            )
        first = next(iter(sorted(p.name for p in self.path.iterdir() if p.name not in (HOLDER, MANIFEST))))
        raise RunError(
            f"{self.path} is not empty (it holds {first!r}) and holds no run; a new run needs a new "
            "or empty folder: choose another --out"
        )

    def check_replaceable(self):
        """Refuse (RunError) unless `--overwrite` may remove this folder (module docstring)."""
        if not self.busy():
            return
        guard_removal(self.path)
        if not is_run_folder(self.path):
            names = sorted(p.name for p in self.path.iterdir() if p.name != HOLDER)
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise RunError(
                f"{self.path} is not a run folder (it holds {shown}); --overwrite replaces only "
                "run folders made by ep_jax: choose another --out"
            )
        m = run_manifest(self.path)
        foreign = first_foreign(self.path, m["files"], m["folders"], _folder_check(m))
        if foreign is not None:
            raise RunError(
                f"{self.path} holds {foreign!r}, which ep_jax did not write; --overwrite removes only "
                "the files a run wrote: move it away, or choose another --out"
            )

    def clear(self):
        """Remove exactly what ep_jax wrote here (the manifest's entries, by name, never
        following a link), keeping the folder (and its lock); refuses (RunError, nothing
        removed) when the folder holds anything else."""
        self.check_replaceable()
        if not self.path.is_dir():
            return
        m = run_manifest(self.path)
        files = m["files"] | {HOLDER}
        for p in sorted(self.path.iterdir(), key=lambda q: q.name):
            if p.name == MANIFEST:
                continue
            if p.name in m["folders"] and p.is_dir() and not p.is_symlink():
                for q in p.iterdir():
                    q.unlink()
                p.rmdir()
            elif p.name in files or _is_temp(p.name, files):
                p.unlink()
        (self.path / MANIFEST).unlink(missing_ok=True)

    def prepare(self, mode: str, folders=()):
        """Before a run writes: clear the folder ("overwrite"), make it, record the run's
        files (and `folders`, e.g. `tensorboard`) in its manifest, write the holder note."""
        if mode == "overwrite" and self.path.is_dir():
            self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        record(self.path, RUN_FILES, folders)
        self.lock.write_holder()

    def write_json(self, name: str, value):
        """`name` as indented JSON, atomically."""
        ckpt.atomic_write_text(self.path / name, json.dumps(value, indent=1) + "\n")

    def write_metrics(self, history: list):
        """`metrics.jsonl` rewritten from a history (atomically)."""
        ckpt.atomic_write_text(self.path / METRICS, "".join(json.dumps(h) + "\n" for h in history))

    def append_metrics(self, row: dict):
        """One finished epoch's line appended to `metrics.jsonl`."""
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
