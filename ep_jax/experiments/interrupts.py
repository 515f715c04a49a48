"""How a process ends on an interrupt (Ctrl-C, SIGTERM): what the engine and the commands
share about it, apart from the commands themselves (`cli`), so the engine needs no command.

`STATE["command_line"]`: the process runs a command as its own command line (set by the
`ep-jax` entry point and by `cli.main_wrapper` for the `python -m` forms): an interrupt
then ends the process (`hard_exit`) once files are written, and the engine's signal watcher
may end it. `STATE["signal"]`: a signal that arrived while no handler of the engine was
installed (start-up), for the engine to act on if the KeyboardInterrupt itself was
swallowed (raised in a gc callback).
"""

from __future__ import annotations

import os
import sys

#: exit status of an interrupted command (Ctrl-C, SIGTERM)
INTERRUPTED = 130

STATE = {"command_line": False, "signal": False}


def hard_exit(code: int, line: str | None = None):
    """Print `line` to stderr, flush both streams, and end the process at once (no
    interpreter shutdown: XLA's threads may still be compiling or running)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 — a closed stream: nothing more to say
            pass
    if line is not None:
        try:
            print(line, file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)
