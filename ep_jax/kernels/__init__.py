"""Fused relaxation kernels (Pallas): every step of a phase in one launch.

`relax`, `free_phase` and `nudged_phases` have the signatures of `ep_jax.dynamics`' and
give the same states (the XLA path's maths, step for step); see `ep_jax.kernels.fused`.
The solver `ep_jax.solvers.Pallas` runs them (`Estimator(solver=Pallas())`: the free and
nudged phases of the EP estimators). On a CPU the kernel runs only in Pallas interpret
mode (`interpret=True`), a test tool: slower than the XLA path.
"""

from ep_jax.kernels.fused import (  # noqa: F401
    BackendUnavailable,
    KernelShapeError,
    free_phase,
    nudged_phases,
    relax,
    supported,
)
