"""`experiments.presets` is `ep_jax.experiments.presets` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "presets")
