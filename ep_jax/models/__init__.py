"""Models by name."""
from ep_jax.models.base import LayeredModel
from ep_jax.models.dendritic import DendriticModel
from ep_jax.models.ep import EPModel

MODELS = {"ep": EPModel, "dendritic": DendriticModel}


def build_model(name: str, **config) -> LayeredModel:
    """`build_model("dendritic", sizes=(784, 256, 10), basal_branches=8, ...)`."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}") from None
    return cls(**config)


__all__ = ["LayeredModel", "EPModel", "DendriticModel", "MODELS", "build_model"]
