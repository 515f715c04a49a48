"""`experiments.distributed` is `ep_jax.experiments.distributed` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "distributed")
