"""`experiments.alignment_report` is `ep_jax.experiments.alignment_report` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "alignment_report")
