"""`experiments.cli` is `ep_jax.experiments.cli` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "cli")
