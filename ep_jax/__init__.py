"""ep_jax: equilibrium propagation (standard, dendritic, heterogeneous time steps) in JAX."""
from ep_jax import activations, data, dendrites, dynamics, estimators, losses, timesteps
from ep_jax.estimators import Aux, Estimator, estimate
from ep_jax.hyper import Hyper, make_hyper
from ep_jax.layer import make_ep_block
from ep_jax.models import DendriticModel, EPModel, build_model
from ep_jax.train import (TrainState, evaluate, evaluate_jit, init_state, make_optimizer,
                          predict, train_step, train_step_jit, train_steps,
                          train_steps_jit)

__all__ = [
    "activations", "data", "dendrites", "dynamics", "estimators", "losses", "timesteps",
    "make_ep_block", "Aux", "Estimator", "estimate", "Hyper", "make_hyper",
    "DendriticModel", "EPModel", "build_model",
    "TrainState", "evaluate", "evaluate_jit", "init_state", "make_optimizer", "predict",
    "train_step", "train_step_jit", "train_steps", "train_steps_jit",
]
