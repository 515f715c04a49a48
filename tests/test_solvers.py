"""The relaxation solvers (`ep_jax.solvers`): one signature, several ways of running a
phase. Checks: the default scan is today's relaxation bit for bit; the asynchronous
(even/odd) solver reaches the synchronous solver's fixed point (float64, every model
family, scalar and per-neuron dt); the adaptive stop; the estimators' and the config's
solver settings and their one-line refusals."""
from __future__ import annotations

import numpy as np
import pytest

import ep_jax


# --- Estimator: step counts are integers ---------------------------------------------------

@pytest.mark.parametrize("field,value", [("t_free", 10.7), ("t_free", "10"), ("t_free", True),
                                         ("t_nudge", 2.5), ("t_nudge", False), ("t_nudge", None)])
def test_estimator_refuses_non_integer_steps(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be an integer number of steps, got "):
        ep_jax.Estimator(**{field: value})


def test_estimator_accepts_numpy_integer_steps():
    est = ep_jax.Estimator(t_free=np.int64(10), t_nudge=np.int32(3))
    assert (est.t_free, est.t_nudge) == (10, 3) and type(est.t_free) is int and type(est.t_nudge) is int
    assert est == ep_jax.Estimator(t_free=10, t_nudge=3) and hash(est) == hash(ep_jax.Estimator(t_free=10, t_nudge=3))
