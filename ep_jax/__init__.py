"""ep_jax: equilibrium propagation (standard, dendritic, heterogeneous time steps) in JAX.

    import jax, ep_jax
    model = ep_jax.build_model("dendritic", sizes=(784, 256, 10))
    est = ep_jax.Estimator("symmetric", t_free=60, t_nudge=12)
    opt = ep_jax.optim.sgd(model, lr=[0.4, 0.02], momentum=0.9)      # or any optax transformation
    rx = ep_jax.make_relaxation(model, beta=0.1, dt=1.0)
    state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0), alpha=0.2)
    state, info = ep_jax.train_step_jit(model, est, opt, key, state, x, y, rx)

docs/api.md gives the overview; docs/equations.md the mathematics.
"""

from ep_jax import (
    activations,
    alignment,
    augment,
    data,
    dendrites,
    dynamics,
    estimators,
    layer,
    losses,
    models,
    optim,
    parallel,
    reference,
    relaxation,
    solvers,
    sweep,
    synthetic,
    timesteps,
    train,
)
from ep_jax.estimators import Aux, Estimator, estimate
from ep_jax.layer import make_ep_block
from ep_jax.models import DendriticModel, EPModel, Model, build_model
from ep_jax.relaxation import Relaxation, make_relaxation
from ep_jax.train import (
    Evaluation,
    StepInfo,
    TrainState,
    evaluate,
    evaluate_jit,
    init_state,
    predict,
    step_key,
    train_step,
    train_step_jit,
    train_steps,
    train_steps_jit,
)

# the package's version, its one source (pyproject.toml reads it statically; CHANGELOG.md and
# CITATION.cff name it, tests/test_packaging.py checks all three)
__version__ = "0.2.0"


def __getattr__(name):
    # imported only when asked for: nn pulls in flax, experiments the experiment layer,
    # kernels jax's Pallas
    if name in ("nn", "experiments", "kernels"):
        import importlib

        return importlib.import_module(f"ep_jax.{name}")
    raise AttributeError(f"module 'ep_jax' has no attribute {name!r}")


__all__ = [
    "activations",
    "alignment",
    "augment",
    "data",
    "dendrites",
    "dynamics",
    "estimators",
    "experiments",
    "kernels",
    "layer",
    "losses",
    "models",
    "nn",
    "optim",
    "parallel",
    "reference",
    "relaxation",
    "solvers",
    "sweep",
    "synthetic",
    "timesteps",
    "train",
    "Aux",
    "Estimator",
    "estimate",
    "make_ep_block",
    "DendriticModel",
    "EPModel",
    "Model",
    "build_model",
    "Relaxation",
    "make_relaxation",
    "Evaluation",
    "StepInfo",
    "TrainState",
    "evaluate",
    "evaluate_jit",
    "init_state",
    "predict",
    "step_key",
    "train_step",
    "train_step_jit",
    "train_steps",
    "train_steps_jit",
]
