"""`experiments.sweep` is `ep_jax.experiments.sweep` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "sweep")
