"""The experiment layer's expected failures: each ends a command with one `error:` line.

`ConfigError` (a bad config value, `config.py`), `DatasetError` (missing or damaged data,
`ep_jax.data`) and `CheckpointError` (`checkpoint.py`) live beside what raises them.
"""

from __future__ import annotations


class RunError(RuntimeError):
    """A run or sweep folder cannot be used as asked (exists, no checkpoint, another run's,
    held by another process, ...)."""


class SpecError(ValueError):
    """A sweep spec file cannot be read (the message names the file and line)."""


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or the time budget: stop at a safe point, keep the checkpoints."""
