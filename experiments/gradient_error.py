"""`experiments.gradient_error` is `ep_jax.experiments.gradient_error` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "gradient_error")
