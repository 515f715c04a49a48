"""`experiments.import_lease` is `ep_jax.experiments.import_lease` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "import_lease")
