"""`experiments.hidden_states` is `ep_jax.experiments.hidden_states` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "hidden_states")
