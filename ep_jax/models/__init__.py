"""Models by name: `build_model("ep" | "dendritic", sizes=..., ...)`, `build_model("conv" |
"dendritic_conv", input_shape=..., channels=..., fc=..., ...)` (ep_jax.models.conv)."""

from ep_jax.models.base import LayeredModel, Model, OutputGrad
from ep_jax.models.conv import ConvEPModel
from ep_jax.models.dendritic import DendriticModel
from ep_jax.models.dendritic_conv import DendriticConvModel
from ep_jax.models.ep import EPModel

MODELS = {"ep": EPModel, "dendritic": DendriticModel, "conv": ConvEPModel, "dendritic_conv": DendriticConvModel}


def build_model(name: str, **config) -> LayeredModel:
    """`build_model("dendritic", sizes=(784, 256, 10), basal_branches=8, ...)`: the model
    class registered under `name` (`MODELS`) built from its dataclass fields."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    try:
        return cls(**config)
    except TypeError as e:
        raise ValueError(f"bad option for the {name!r} model: {e}") from None


__all__ = [
    "LayeredModel",
    "Model",
    "OutputGrad",
    "EPModel",
    "DendriticModel",
    "ConvEPModel",
    "DendriticConvModel",
    "MODELS",
    "build_model",
]
