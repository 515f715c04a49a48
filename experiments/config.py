"""`experiments.config` is `ep_jax.experiments.config` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "config")
