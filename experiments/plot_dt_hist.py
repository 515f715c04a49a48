"""`experiments.plot_dt_hist` is `ep_jax.experiments.plot_dt_hist` (see experiments/__init__.py)."""

from experiments import _alias

_alias(__name__, "plot_dt_hist")
