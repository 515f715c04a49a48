"""A run folder: its files, who holds it, and what may replace it.

One folder per run (a single run, or one member of a sweep):

- `config.json`        the run's `RunConfig` (round-trips through `RunConfig.from_dict`);
- `metrics.jsonl`      one line per finished epoch; always equal to the checkpoint's history;
- `checkpoint.msgpack` the state after the last finished epoch (`experiments.checkpoint`);
- `summary.json`       status, message, final/best accuracy — written on every exit path;
- `learning_curve.png`, `alignment.png` (with alignment tracking).

Every write is atomic (a fresh temporary file in the folder, fsynced, renamed over the
old one), so an interruption leaves the previous version of a file, never half of one.

**One process at a time.** `hold()` takes an OS-level lock (`flock` on the folder
itself, so nothing is created to take it) before the first write and keeps it until the
run ends; the kernel releases it when the process exits, also after `kill -9`. While it
is held, a second command refuses with one line naming the folder and the holder (pid,
host, start time, from `.ep_jax-holder.json`, written once the holder starts writing and
removed when it lets go).

**What `--overwrite` may remove.** Only a folder this project made as a run folder: its
`config.json` reads as a run config and it has a `summary.json` or a checkpoint. Never
the working directory or a folder above it, never a folder holding anything else
(a `thesis.tex` beside no config: refused, naming what is there).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from ep_jax.experiments import checkpoint as ckpt
from ep_jax.experiments.errors import RunError

CONFIG, METRICS, SUMMARY, CHECKPOINT = "config.json", "metrics.jsonl", "summary.json", "checkpoint.msgpack"
CURVE, ALIGNMENT = "learning_curve.png", "alignment.png"
HOLDER = ".ep_jax-holder.json"


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
        RunConfig.from_dict(json.loads((path / CONFIG).read_text()))
    except Exception:   # noqa: BLE001 — any failure means "not recognisably ours"
        return False
    return True


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
            raise RunError(f"{p} is in use: {holder_text(p)} holds this {self.kind} folder; wait for it to "
                           "finish (or stop it) and try again") from None
        except OSError:   # a file system without flock: go on unlocked rather than refuse every run
            os.close(fd)
            return self
        self.fd = fd
        return self

    def write_holder(self):
        """Record who holds the folder (for the refusal message of a second process)."""
        import sys
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
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
        h = json.loads((Path(path) / HOLDER).read_text())
        return f"process {int(h['pid'])} on {h['host']} (since {h['started']}: {h.get('command', '')[:80]})"
    except Exception:   # noqa: BLE001 — no note yet (the holder is still checking) or a damaged one
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
        """Holds anything (other than a stale holder note)."""
        return self.path.is_dir() and any(p.name != HOLDER for p in self.path.iterdir())

    def check_replaceable(self):
        """Refuse (RunError) unless `--overwrite` may remove this folder (module docstring)."""
        if not self.busy():
            return
        guard_removal(self.path)
        if not is_run_folder(self.path):
            names = sorted(p.name for p in self.path.iterdir() if p.name != HOLDER)
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise RunError(f"{self.path} is not a run folder (it holds {shown}); --overwrite replaces only "
                           "run folders made by ep_jax: choose another --out")

    def clear(self):
        """Remove every file of the folder, keeping the folder (and its lock)."""
        for p in self.path.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

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
