"""`experiments.engine` is `ep_jax.experiments.engine` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "engine")
