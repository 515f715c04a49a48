"""A run's building blocks from its config: keys, model, estimator, optimiser, time
steps, data and the order of its examples.

Keys. Everything random derives from the member's seed:
`init, dt, step, data = split(PRNGKey(seed), 4)` — params and masks from `init`, sampled
heterogeneous time steps from `dt`, step t's key (random nudge signs) is
`fold_in(step, t)`, epoch e's example order is `permutation(fold_in(data, e), n)`, and with
`augment` example j's crop and flip at step t come from `fold_in(fold_in(fold_in(data,
AUG_TAG), t), j)` (`ep_jax.augment`).
Each member has its own data order, so a member trained in a sweep, alone, or by a plain
loop over `ep_jax.train_step` goes through the same numbers. The subset (`subset`) is
`ep_jax.data.subset_indices(fold_in(PRNGKey(subset_seed), 0), ...)`: the same examples for
every seed. An epoch is every full batch, then the partial last batch (as PyTorch's
DataLoader, the reference's, does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import ep_jax
from ep_jax.experiments.config import DENDRITIC_MODELS, RunConfig


def keys(cfg: RunConfig) -> dict:
    """The member's keys: `init, dt, step, data = split(PRNGKey(seed), 4)` (module docstring)."""
    k = jax.random.split(jax.random.PRNGKey(cfg.seed), 4)
    return dict(zip(("init", "dt", "step", "data"), k))


def build_model(cfg: RunConfig):
    """The model of a config: `ep_jax.build_model(cfg.model, **cfg.model_options())`."""
    return ep_jax.build_model(cfg.model, **cfg.model_options())


def build_augment(cfg: RunConfig):
    """The training augmentation of a config (`ep_jax.augment.CropFlip` of its images, 4
    pixels of edge padding and flips, as Laborieux et al. 2021), or None."""
    if not cfg.augment:
        return None
    from ep_jax.augment import CropFlip

    return CropFlip(tuple(cfg.image_shape()), pad=4, flip=True)


def augment_key(cfg: RunConfig):
    """The member's augmentation key: `fold_in(data, AUG_TAG)` (step t: `fold_in` of it with t)."""
    from ep_jax.augment import AUG_TAG

    return jax.random.fold_in(keys(cfg)["data"], AUG_TAG)


def build_estimator(cfg: RunConfig) -> ep_jax.Estimator:
    """The gradient estimator of a config."""
    free, nudge = ep_jax.solvers.parse_phases(cfg.solver)
    return ep_jax.Estimator(
        cfg.estimator,
        t_free=cfg.t_free,
        t_nudge=cfg.t_nudge,
        nudge=cfg.nudge,
        n_points=cfg.n_points,
        tol=cfg.implicit_tol,
        solver=free,
        nudge_solver=None if nudge == free else nudge,
    )


def lr_schedule(cfg: RunConfig):
    """`ep_jax.optim.CosineDecay` with period `lr_epochs` (default: the config's epochs; per
    epoch, to `lr_min`), or None."""
    if cfg.lr_schedule != "cosine":
        return None
    return ep_jax.optim.CosineDecay(cfg.steps_per_epoch(), cfg.lr_epochs or cfg.epochs, cfg.lr_min)


def build_optimizer(cfg: RunConfig, model):
    """The optimiser (its rates are set per member, see `opt_hyperparams`)."""
    extra = dict(weight_decay=cfg.weight_decay, schedule=lr_schedule(cfg))
    if cfg.optimizer == "adam":
        return ep_jax.optim.adam(model, lr=cfg.lr, **extra)
    return ep_jax.optim.sgd(model, lr=cfg.lr, momentum=cfg.momentum, **extra)


_OPTIMIZERS: dict = {}


def group_optimizer(cfg: RunConfig, model):
    """The optimiser of a group, one object per (model, kind, precision): its rates are
    placeholders, every member's own are set through `opt_hyperparams`. Reusing the object
    lets `jit` reuse the compiled step across runs, resumes and groups of one process."""
    from ep_jax.models.base import default_float

    extra = dict(weight_decay=cfg.weight_decay, schedule=lr_schedule(cfg))
    key = (model, cfg.optimizer, str(default_float()), cfg.weight_decay, extra["schedule"])
    if key not in _OPTIMIZERS:
        _OPTIMIZERS[key] = (
            ep_jax.optim.adam(model, lr=0.0, **extra)
            if cfg.optimizer == "adam"
            else ep_jax.optim.sgd(model, lr=0.0, momentum=0.0, **extra)
        )
    return _OPTIMIZERS[key]


def opt_hyperparams(cfg: RunConfig, model) -> dict:
    """The member's optimiser hyperparameters (rates per synapse, momentum) as arrays."""
    lr = ep_jax.optim.per_synapse_rates(model, cfg.lr)
    if cfg.optimizer == "adam":
        return {"lr": lr}
    return {"lr": lr, "momentum": jnp.asarray(cfg.momentum, lr.dtype)}


def model_settings(cfg: RunConfig) -> dict:
    """The model's numeric settings of a config (alpha, gamma, or none)."""
    if cfg.model in DENDRITIC_MODELS:
        return {"alpha": cfg.alpha}
    return {"gamma": cfg.gamma} if cfg.model == "ep" else {}  # the conv model has no settings


def build_relaxation(cfg: RunConfig, model) -> ep_jax.Relaxation:
    """β and the time steps; heterogeneous hidden steps are sampled from the `dt` key."""
    spec = cfg.dt_spec()
    if spec is None:
        dt = cfg.dt if not isinstance(cfg.dt, tuple) else list(cfg.dt)
    else:
        dt_out = cfg.dt_out if cfg.dt_out is not None else cfg.dt
        dt = list(ep_jax.timesteps.layer_dts(keys(cfg)["dt"], model, spec, dt_out))
    return ep_jax.make_relaxation(model, beta=cfg.beta, dt=dt, est=build_estimator(cfg))


_DATA_CACHE: dict = {}


def load_data(cfg: RunConfig):
    """`(x_train, y_train, x_test, y_test)` numpy arrays after the subsets (cached)."""
    key = (
        cfg.dataset,
        cfg.data_dir,
        cfg.subset,
        cfg.test_subset,
        cfg.subset_seed,
        cfg.synthetic_train,
        cfg.synthetic_test,
        cfg.synthetic_noise,
        cfg.n_inputs(),
        cfg.n_classes(),
    )
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    if cfg.dataset == "synthetic":
        ds = ep_jax.synthetic.make_synthetic(
            jax.random.PRNGKey(cfg.subset_seed),
            n_features=cfg.n_inputs(),
            n_classes=cfg.n_classes(),
            n_train=cfg.synthetic_train,
            n_test=cfg.synthetic_test,
            noise=cfg.synthetic_noise,
        )
    else:
        ds = ep_jax.data.load_dataset(cfg.dataset, data_dir=cfg.data_dir)
    base = jax.random.PRNGKey(cfg.subset_seed)
    i = ep_jax.data.subset_indices(jax.random.fold_in(base, 0), len(ds.y_train), cfg.subset)
    j = ep_jax.data.subset_indices(jax.random.fold_in(base, 1), len(ds.y_test), cfg.test_subset)
    out = (ds.x_train[i], ds.y_train[i], ds.x_test[j], ds.y_test[j])
    if len(_DATA_CACHE) > 2:
        _DATA_CACHE.clear()
    _DATA_CACHE[key] = out
    return out


def epoch_order(cfg: RunConfig, epoch: int, n: int) -> np.ndarray:
    """The example order of epoch `epoch` (1-based) for this member."""
    return np.asarray(jax.random.permutation(jax.random.fold_in(keys(cfg)["data"], epoch), n))


def epoch_batches(cfg: RunConfig, epoch: int, n: int):
    """`(full (n // B, B), rest (n % B,))` example indices of the epoch's batches."""
    perm = epoch_order(cfg, epoch, n)
    B = cfg.batch_size
    n_full = n // B
    return perm[: n_full * B].reshape(n_full, B), perm[n_full * B :]
