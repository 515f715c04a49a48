"""`experiments.example_ep_head` is `ep_jax.experiments.example_ep_head` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "example_ep_head")
