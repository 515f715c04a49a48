"""`experiments.aggregate` is `ep_jax.experiments.aggregate` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "aggregate")
