"""The repository's short names for the experiment commands.

The experiment layer lives in the `ep_jax` distribution as `ep_jax.experiments` (so that
installing ep_jax puts no generic top-level package into site-packages) and is also
`ep-jax <command>` once installed. From a checkout, `python -m experiments.<command>`
keeps working: each module here is the same module object as `ep_jax.experiments.<name>`
(imported under both names, never twice), and run as a script it runs that command.
This folder is not installed; it also holds the sweep specs (`sweeps/`, a link to the
shipped ones) and the committed results (`results/`).
"""

import importlib
import runpy
import sys


def _alias(name: str, target: str):
    """Make module `name` the module `ep_jax.experiments.<target>`, or run it as `__main__`."""
    full = f"ep_jax.experiments.{target}"
    if name == "__main__":
        runpy.run_module(full, run_name="__main__", alter_sys=True)
        return
    sys.modules[name] = importlib.import_module(full)
