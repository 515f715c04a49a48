"""What every command shares: one-line errors, `--debug`, the run-mode flags.

Expected failures — a bad config or spec, missing or damaged data, a run folder that
cannot be used as asked, a bad checkpoint, disk full, no permission — end with one line
`error: ...` on stderr and exit status 2. `--debug` shows the traceback instead.

Ctrl-C and SIGTERM end a command with the line `interrupted` on stderr and exit status
130 (the training commands first write what they finished; see `experiments.engine`).
Run from the command line, the process then ends with `os._exit` once its files are
written and its streams flushed: the interpreter's own shutdown would tear JAX's
runtime down while XLA's threads may still compile or run a program. No Python signal
handler runs while XLA compiles (possibly minutes): a command line also watches the
signals from a thread (`signal.set_wakeup_fd`) and ends a command that is still running
`GRACE` s after one, the same way (the engine does this itself during a run).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import tomllib

from ep_jax.experiments import interrupts
from ep_jax.experiments.errors import RunError, SpecError  # noqa: F401  (SpecError: re-exported)
from ep_jax.experiments.interrupts import INTERRUPTED, hard_exit  # noqa: F401  (re-exported)


def expected_errors():
    """The exception types that end a command with one `error:` line (exit status 2)."""
    from ep_jax.data import DatasetError
    from ep_jax.experiments.checkpoint import CheckpointError
    from ep_jax.experiments.config import ConfigError

    return (
        ConfigError,
        SpecError,
        DatasetError,
        RunError,
        CheckpointError,
        OSError,
        tomllib.TOMLDecodeError,
        ValueError,
    )


def describe(e: BaseException) -> str:
    """One line for an expected error: the whole message joined, OS errors said plainly."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        if e.errno == errno.ENOSPC:
            return f"no space left on the device{where}; free some and continue with --resume"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"no permission to write{where}: {e.strerror}"
        return f"{e.strerror or e}{where}"
    # one line, but all of it: a multi-line message (the data layer lists the folders it
    # looked in, then how to get the data) is joined rather than cut after its first line
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0]
    for l in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + l.removeprefix("- ")
    return text


def _start_up_signal(signum, frame):
    interrupts.STATE["signal"] = True
    raise KeyboardInterrupt


#: seconds a command line waits after a signal for Python to stop it (KeyboardInterrupt)
#: before the watcher ends it: no Python handler runs while XLA compiles
GRACE = 2.0


def _watch_signals():
    """A command line's fallback (`main_wrapper`): a signal whose KeyboardInterrupt did not
    end the process within `GRACE` s (the main thread is in native code, e.g. XLA
    compiling outside a training run) ends it with `interrupted` and 130. The engine and
    the distributed start-up take the wake-up fd over while they run, and give it back."""
    try:
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (OSError, ValueError):
        return

    def watch():
        import time

        while True:
            got = os.read(r, 64)
            if any(b in (int(signal.SIGINT), int(signal.SIGTERM)) for b in got):
                time.sleep(GRACE)
                hard_exit(INTERRUPTED, "interrupted")

    threading.Thread(target=watch, name="ep_jax-command-signals", daemon=True).start()


#: how the commands are invoked, for their usage lines: set to "ep-jax <command>" by the
#: `ep-jax` entry point; otherwise the module form that works from a checkout
PROG = None


def prog(module: str) -> str:
    """The program name a command's `--help` shows (`ep-jax train` or `python -m experiments.train`)."""
    return PROG or f"python -m experiments.{module}"


def runs_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The parser of a command that reads run folders (aggregate, stability, ...)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders, sweep folders, or folders holding them")
    return p


def add_common(p: argparse.ArgumentParser):
    """`--debug` (show the traceback of an error)."""
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def add_run_modes(p: argparse.ArgumentParser):
    """`--resume` / `--overwrite`, `--no-progress` and `--log` of the training commands."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint(s) in the output folder")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--log",
        action="append",
        default=[],
        choices=("tensorboard", "wandb"),
        help="also log to TensorBoard event files (<run>/tensorboard/, needs tensorboardX) or to "
        "Weights & Biases (needs wandb); repeatable; off by default",
    )


def main_wrapper(main, argv=None) -> int:
    """Run `main(argv)`; turn expected errors into `error: ...` and exit status 2."""
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    command_line = (argv is None or interrupts.STATE["command_line"]) and (
        threading.current_thread() is threading.main_thread()
    )
    if command_line:  # SIGTERM at start-up stops like Ctrl-C (not a death by signal)
        interrupts.STATE["command_line"] = True
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _start_up_signal)
        _watch_signals()
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        if command_line:  # a second signal would only cut the line below
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_IGN)
            hard_exit(INTERRUPTED, "interrupted")
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except expected_errors() as e:
        if debug:
            raise
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
