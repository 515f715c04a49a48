"""`experiments.checkpoint` is `ep_jax.experiments.checkpoint` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "checkpoint")
