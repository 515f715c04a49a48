"""`experiments.compare_custom_vjp` is `ep_jax.experiments.compare_custom_vjp` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "compare_custom_vjp")
