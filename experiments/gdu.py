"""`experiments.gdu` is `ep_jax.experiments.gdu` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "gdu")
