"""Loggers: hooks of the training loop (`loop.Hook`) that report, each on its own.

- `JsonlLogger` (always on): each finished epoch's row appended to the member's
  `metrics.jsonl`, once its checkpoint is written (the checkpoint hook runs first), so the
  file always equals the checkpoint's history;
- `ConsoleLogger`: one line per epoch (a single run: its accuracies; a sweep: the
  members' mean, min and max), a line per diverged member, a summary line at the end;
- `ProgressBar`: a tqdm bar of steps on stderr (a single run also shows its running
  accuracy, which reads each chunk's counts; a sweep's bar waits for nothing). The console
  lines are written with the bar cleared first (`tqdm.external_write_mode`), so an epoch
  line never lands on the bar's line, also when stdout and stderr share a pipe or a file;
- `TensorBoardLogger` (`--log tensorboard`, extra `ep_jax[tensorboard]`): event files under
  `<run folder>/tensorboard/` through tensorboardX, one scalar per row column;
- `WandbLogger` (`--log wandb`, extra `ep_jax[wandb]`): one Weights & Biases run per
  member (project `ep_jax`, named after the member), the config as its config.
Both optional writers are off by default and refuse with one line when their library is
not installed — `check_loggers`, called by `engine.run` before any folder is made or
locked, so a refusal leaves nothing behind (no run folder stuck at "running"). They open
their event files / W&B runs in `start`, inside the training loop, so a failure there
ends the run as "failed", with its summary written.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np

from ep_jax.experiments.errors import RunError
from ep_jax.experiments.loop import Hook

OPTIONAL = ("tensorboard", "wandb")


def plural(n: int, word: str) -> str:
    """`1 epoch`, `2 epochs`."""
    return f"{n} {word}" + ("" if n == 1 else "s")


class JsonlLogger(Hook):
    """Rows appended to `metrics.jsonl` (module docstring); `folders[i]` is member i's RunFolder."""

    def __init__(self, folders, is_main: bool = True):
        self.folders, self.is_main = folders, is_main

    def after_epoch(self, loop, state, rx, end):
        """Append the rows of the members whose checkpoint of this epoch is written."""
        if not self.is_main:
            return
        for i, row in enumerate(end.rows):
            if row is not None and loop.start[i] == end.epoch:
                self.folders[i].append_metrics(row)


class ConsoleLogger(Hook):
    """Epoch lines through `print_fn` (module docstring)."""

    def __init__(self, names, label: str, print_fn: Callable = print):
        self.names, self.label, self.print_fn = list(names), label, print_fn

    def print(self, text: str):
        """One line, with any progress bar cleared first and redrawn after."""
        from tqdm import tqdm

        with tqdm.external_write_mode():
            self.print_fn(text)

    def after_epoch(self, loop, state, rx, end):
        """The epoch's line(s)."""
        for i in end.diverged:
            self.print(f"{self.names[i]}: STOPPED: {loop.message[i]}")
        if loop.M == 1:
            row = end.rows[0]
            if row is not None:
                self.print(
                    f"epoch {end.epoch}: train {row['train_acc']:.2f}%  test {row['test_acc']:.2f}%  "
                    f"loss {row['loss']:.4f}  ({end.elapsed:.1f} s)"
                )
            return
        ok = [i for i in range(loop.M) if end.active[i] and end.alive[i]]
        if ok:
            accs = 100 * end.test_acc[ok]
            self.print(
                f"{self.label}: epoch {end.epoch}: test accuracy mean {accs.mean():.2f}% "
                f"(min {accs.min():.2f}, max {accs.max():.2f}) over {plural(len(ok), 'member')} "
                f"({end.elapsed:.1f} s)"
            )


class ProgressBar(Hook):
    """A tqdm bar over the group's remaining steps (module docstring)."""

    def __init__(self, desc: str, enabled: bool = True):
        self.desc = desc
        self.enabled = enabled
        self.bar = None

    def start(self, loop, state, rx):
        """Open the bar."""
        from tqdm.auto import tqdm

        total = (loop.cfg.epochs - loop.first_epoch() + 1) * loop.steps_per_epoch()
        self.bar = tqdm(
            total=total, unit="step", disable=not self.enabled, leave=False, file=sys.stderr, desc=self.desc
        )
        self.correct, self.seen, self.epoch = 0.0, 0, None

    def after_chunk(self, loop, state, rx, chunk):
        """Advance; a single run's running accuracy."""
        self.bar.update(chunk.steps)
        if self.enabled and loop.M == 1:
            if chunk.epoch != self.epoch:
                self.correct, self.seen, self.epoch = 0.0, 0, chunk.epoch
            self.correct += float(np.asarray(chunk.info.correct).sum())
            self.seen += chunk.steps * chunk.batch
            self.bar.set_postfix(acc=f"{100 * self.correct / self.seen:.2f}%")

    def after_epoch(self, loop, state, rx, end):
        """Keep the bar below the epoch's printed lines."""
        self.bar.refresh()

    def stop(self, loop, reason):
        """Close the bar (before anything else is printed)."""
        if self.bar is not None:
            self.bar.close()


class TensorBoardLogger(Hook):
    """Scalars of every row (and the alignment angle) per member, step = training step."""

    def __init__(self, folders, names):
        check_loggers(["tensorboard"])
        self.folders, self.writers = folders, []

    def start(self, loop, state, rx):
        """Open one event-file writer per member, in `<run folder>/tensorboard/`."""
        from tensorboardX import SummaryWriter

        from ep_jax.experiments.runfolder import TENSORBOARD, record

        for f in self.folders:
            record(f.path, folders=[TENSORBOARD])
            self.writers.append(SummaryWriter(logdir=str(f.path / TENSORBOARD)))

    def after_epoch(self, loop, state, rx, end):
        """One scalar per numeric column."""
        for i, row in enumerate(end.rows):
            if row is None:
                continue
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "steps"):
                    self.writers[i].add_scalar(k, v, row["steps"])
            for rec in row.get("alignment", []):
                self.writers[i].add_scalar("alignment/angle", rec["angle"], rec["step"])
            self.writers[i].flush()

    def stop(self, loop, reason):
        """Close the event files."""
        for w in self.writers:
            w.close()


class WandbLogger(Hook):
    """One W&B run per member (module docstring)."""

    def __init__(self, names, configs):
        check_loggers(["wandb"])
        self.names, self.configs, self.runs = list(names), list(configs), []

    def start(self, loop, state, rx):
        """Start one W&B run per member."""
        import wandb

        self.runs = [
            wandb.init(project="ep_jax", name=n, config=c.to_json(), reinit="create_new")
            for n, c in zip(self.names, self.configs)
        ]

    def after_epoch(self, loop, state, rx, end):
        """Log every numeric column."""
        for i, row in enumerate(end.rows):
            if row is not None:
                self.runs[i].log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["steps"])

    def stop(self, loop, reason):
        """Finish the W&B runs."""
        for r in self.runs:
            r.finish(exit_code=0 if reason == "ok" else 1)


#: the library each optional writer imports, and how to install it
NEEDS = {
    "tensorboard": ("tensorboardX", "tensorboardX: pip install 'ep_jax[tensorboard]'"),
    "wandb": ("wandb", "wandb: pip install 'ep_jax[wandb]'"),
}


def check_loggers(kinds):
    """Refuse (RunError, one line) an unknown optional writer or one whose library is not
    installed — before anything is written (module docstring)."""
    for k in kinds:
        if k not in NEEDS:
            raise RunError(f"--log: unknown logger {k!r}; choose from {', '.join(OPTIONAL)}")
        module, how = NEEDS[k]
        try:
            __import__(module)
        except ImportError:
            raise RunError(f"--log {k} needs {how}") from None


def optional_loggers(kinds, folders, names, configs) -> list[Hook]:
    """The optional writers asked for (`--log`)."""
    out = []
    for k in kinds:
        if k == "tensorboard":
            out.append(TensorBoardLogger(folders, names))
        elif k == "wandb":
            out.append(WandbLogger(names, configs))
        else:
            raise RunError(f"--log: unknown logger {k!r}; choose from {', '.join(OPTIONAL)}")
    return out
