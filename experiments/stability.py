"""`experiments.stability` is `ep_jax.experiments.stability` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "stability")
