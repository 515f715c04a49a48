"""Experiment configuration: a flat dict of plain values (JSON-serialisable), its
defaults, command-line overrides, and how it becomes `(model, estimator, hyper)`."""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np

import ep_jax

DEFAULTS: dict[str, Any] = dict(
    # data
    dataset="mnist", data_dir=None, subset=None, test_subset=None,
    # model
    model="dendritic", sizes=[784, 256, 10], activation="hard_sigmoid", output_activation=None,
    loss="mse", basal_branches=8, apical_branches=2, sparsity=0.5, apical_dense=False,
    # estimator
    estimator="symmetric", t_free=60, t_nudge=12, batched_nudge=True,
    # numeric hyperparameters
    beta=0.1, lr=[0.4, 0.02], alpha=0.2, gamma=1.0, momentum=0.9,
    # time steps: `dt` for every layer, or HTS: hidden dt ~ dt_dist, output dt = dt_out
    dt=1.0, dt_dist=None, dt_mean=None, dt_std=None, dt_min=None, dt_max=None, dt_out=None,
    # loop
    batch_size=64, epochs=20, seed=0, eval_batch=1000, chunk=100, max_state=1e4, float64=False,
)


def parse_value(text: str, like: Any):
    """Parse a command-line value; lists are comma separated (`0.5,0.2`)."""
    if isinstance(like, list) or ("," in text and not text.startswith("[")):
        return [parse_value(t, 0.0) for t in text.strip("[]").split(",") if t.strip()]
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: dict, pairs: list[str]) -> dict:
    cfg = dict(cfg)
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, text = pair.split("=", 1)
        if key not in DEFAULTS:
            raise ValueError(f"unknown config field {key!r}; known fields: {sorted(DEFAULTS)}")
        cfg[key] = parse_value(text, DEFAULTS[key])
    return cfg


def resolve(preset: dict | None = None, overrides: dict | None = None) -> dict:
    cfg = dict(DEFAULTS)
    cfg.update(preset or {})
    cfg.update(overrides or {})
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config fields {sorted(unknown)}")
    return cfg


def build_model(cfg: dict):
    kw = dict(sizes=tuple(cfg["sizes"]), activation=cfg["activation"],
              output_activation=cfg["output_activation"], loss=cfg["loss"])
    if cfg["model"] == "dendritic":
        kw.update(basal_branches=cfg["basal_branches"], apical_branches=cfg["apical_branches"],
                  sparsity=cfg["sparsity"], apical_dense=cfg["apical_dense"])
    return ep_jax.build_model(cfg["model"], **kw)


def build_estimator(cfg: dict) -> ep_jax.Estimator:
    return ep_jax.Estimator(cfg["estimator"], t_free=cfg["t_free"], t_nudge=cfg["t_nudge"],
                            batched_nudge=cfg["batched_nudge"])


def dt_spec(cfg: dict):
    """The HTS spec of the hidden layers (`None` when `dt_dist` is unset)."""
    if cfg["dt_dist"] is None:
        return None
    import dataclasses
    from ep_jax import timesteps
    given = {"mean": cfg["dt_mean"], "std": cfg["dt_std"], "dt_min": cfg["dt_min"], "dt_max": cfg["dt_max"]}
    return dataclasses.replace(timesteps.default_spec(cfg["dt_dist"]),
                               **{k: v for k, v in given.items() if v is not None})


def layer_dts(cfg: dict, model, key):
    """Per-layer dt entries: `cfg["dt"]` everywhere, or HTS per-neuron hidden vectors
    (sampled from `key`) with the output at `dt_out` (default `dt`)."""
    spec = dt_spec(cfg)
    if spec is None:
        return cfg["dt"] if cfg["dt_out"] is None else [cfg["dt"]] * (model.n_layers - 1) + [cfg["dt_out"]]
    from ep_jax import timesteps
    dt_out = cfg["dt_out"] if cfg["dt_out"] is not None else cfg["dt"]
    return list(timesteps.layer_dts(key, model, spec, dt_out))


def build_hyper(cfg: dict, model, key) -> ep_jax.Hyper:
    return ep_jax.make_hyper(model, beta=cfg["beta"], lr=cfg["lr"], dt=layer_dts(cfg, model, key),
                             alpha=cfg["alpha"], gamma=cfg["gamma"], momentum=cfg["momentum"])


def keys(cfg: dict) -> dict:
    """Every random choice of a run derives from `cfg["seed"]`."""
    k = jax.random.PRNGKey(cfg["seed"])
    names = ("init", "data", "dt", "subset")
    return dict(zip(names, jax.random.split(k, len(names))))


def to_jsonable(cfg: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in cfg.items()}
