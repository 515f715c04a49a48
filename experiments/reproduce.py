"""`experiments.reproduce` is `ep_jax.experiments.reproduce` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "reproduce")
