"""`experiments.train` is `ep_jax.experiments.train` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "train")
