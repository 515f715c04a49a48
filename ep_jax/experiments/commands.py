"""`ep-jax <command> [options]`: every experiment command behind one entry point.

    ep-jax train --preset fmnist-dep-1h        # = python -m experiments.train ... (from a checkout)
    ep-jax sweep SPEC.toml
    ep-jax <command> --help                    # each command's options

`python -m ep_jax.experiments <command>` is the same entry point without the script.
"""

from __future__ import annotations

import importlib
import sys

#: command -> (module of ep_jax.experiments, one-line description)
COMMANDS = {
    "train": ("train", "one training run into a run folder (presets, --set, --resume)"),
    "sweep": ("sweep", "a sweep spec (TOML/JSON): many members, vmapped groups"),
    "reproduce": ("reproduce", "the papers' tables as resumable seed sweeps"),
    "aggregate": ("aggregate", "mean ± std over seeds per cell, against the papers"),
    "stability": ("stability", "heterogeneous-time-step runs in Table 1's layout, with stability"),
    "hidden-states": ("hidden_states", "EP against DEP hidden-state statistics over the free phase"),
    "gdu": ("gdu", "EP against BPTT per step k (gradient-descending updates)"),
    "gradient-error": ("gradient_error", "EP estimates against the exact equilibrium gradient; phase residuals"),
    "alignment-report": ("alignment_report", "EP-vs-BPTT alignment logged during training"),
    "plot-dt-hist": ("plot_dt_hist", "histograms of the heterogeneous time steps"),
    "compare-custom-vjp": ("compare_custom_vjp", "EP as a custom-VJP layer against jax.grad"),
    "example-ep-head": ("example_ep_head", "an EP block as the head of a flax model"),
    "import-lease": ("import_lease", "unpack what a GPU lease brought back into experiments/results"),
}


def usage() -> str:
    """The `ep-jax --help` text: every command with its one-line description."""
    width = max(map(len, COMMANDS))
    lines = ["usage: ep-jax <command> [options]   (ep-jax <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:{width}s}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Dispatch `argv` (default `sys.argv[1:]`) to a command; its exit status."""
    from ep_jax.experiments import cli, distributed, interrupts

    interrupts.STATE["command_line"] = argv is None  # the process's own command line: an interrupt ends it
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name = argv[0].replace("_", "-")
    if name not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    cli.PROG = f"ep-jax {name}"
    mod = importlib.import_module(f"ep_jax.experiments.{COMMANDS[name][0]}")
    # the training commands' wrapper: the one-line errors of cli.main_wrapper, plus leaving a
    # distributed job cleanly (a no-op for the commands that never start one)
    return distributed.main_wrapper(mod.main, argv[1:])


if __name__ == "__main__":
    sys.exit(main())
