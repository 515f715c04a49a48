"""The one config type of every run: `RunConfig`, its fields, ranges and rules.

A single run, every member of a sweep, every preset and every TOML spec is a `RunConfig`.
`validate()` checks the whole config — types, ranges and the rules between fields —
before any data is read or any file is touched, and raises `ConfigError` with one line
naming the field. `config.json` in a run folder is `to_json()`; `RunConfig.from_dict`
reads it back (round trip).

Fields are *static* (they shape the compiled program: widths, steps, batch size, data)
or *numeric* (`NUMERIC`: arrays in the compiled program — seed, β, rates, momentum, α,
γ, time steps). Members of a sweep that agree on every static field form one group and
train as one vmapped program.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import reprlib
from collections.abc import Mapping
from typing import Any

from ep_jax import activations, losses, solvers, timesteps
from ep_jax.estimators import EP_KINDS, KINDS, NUDGES, RANDOM_SIGN_KINDS

DATASETS = ("mnist", "kmnist", "fashion_mnist", "cifar10", "cifar100", "synthetic")
DATASET_ALIASES = {
    "fmnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}
TRAIN_SIZE = {"mnist": 60000, "kmnist": 60000, "fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000}
TEST_SIZE = {"mnist": 10000, "kmnist": 10000, "fashion_mnist": 10000, "cifar10": 10000, "cifar100": 10000}
OPTIMIZERS = ("sgd", "adam")
#: models whose layers are convolutions (input_shape, channels, kernels, ... , fc)
CONV_MODELS = ("conv", "dendritic_conv")
DENDRITIC_MODELS = ("dendritic", "dendritic_conv")
POOLS = ("max", "avg", "none")
LR_SCHEDULES = ("constant", "cosine")
#: the fields of the convolutional models, and of the MLPs
CONV_FIELDS = ("input_shape", "channels", "kernels", "strides", "paddings", "pools", "fc", "readout")

#: step counters, example indices and epoch numbers are int32 on the device
INT32_MAX = 2**31 - 1
#: the most relaxation steps per phase (t_free, t_nudge): a million steps per example is
#: already days of compute; far below the int32 step counters
MAX_STEPS = 10**6
#: the widest layer: 2^24 neurons (a 784 x 2^24 float32 kernel alone is 51 GB)
MAX_WIDTH = 2**24


class ConfigError(ValueError):
    """A config value or combination is invalid (the message names the field)."""


#: fields of earlier versions that `solver` replaced: `relaxation_impl` (xla | pallas) and
#: `free_tol` (an adaptive free phase, scanned nudged phases). Old config.json files still
#: load (`from_dict` maps them onto `solver`), and a config's digest is computed from
#: those names wherever they express it, so old checkpoints keep resuming.
LEGACY = ("relaxation_impl", "free_tol")


def _from_legacy(d: Mapping, where: str = "") -> Mapping:
    """`d` with `relaxation_impl` / `free_tol` turned into the `solver` they mean."""
    if not any(k in d for k in LEGACY):
        return d
    d = dict(d)
    impl, tol = d.pop("relaxation_impl", "xla"), d.pop("free_tol", None)
    if impl not in ("xla", "pallas"):
        raise ConfigError(f"{where}relaxation_impl (replaced by solver): expected xla or pallas, got {short(impl)}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < math.inf):
        raise ConfigError(f"{where}free_tol (replaced by solver): expected a positive number, got {short(tol)}")
    if impl == "pallas" and tol is not None:
        raise ConfigError(f"{where}free_tol (replaced by solver) cannot be combined with relaxation_impl pallas")
    meant = "pallas" if impl == "pallas" else (f"adaptive:{float(tol)!r}/scan" if tol is not None else None)
    if meant is not None:
        given = d.get("solver", "scan")
        if given not in ("scan", meant):
            raise ConfigError(
                f"{where}solver {short(given)} contradicts the older field(s) relaxation_impl/"
                f"free_tol (which mean solver={meant!r}); give solver only"
            )
        d["solver"] = meant
    return d


def _to_legacy(d: dict) -> dict:
    """`to_json()` as the digest reads it: a solver the older fields could express is
    written as them (`relaxation_impl` pallas, `free_tol`), so its digest is the one of a
    config saved before `solver` existed."""
    free, nudge = solvers.parse_phases(d["solver"])
    if free == nudge == solvers.Pallas():  # (pallas:interpret, a test mode, is new: its own name)
        d = {**d, "relaxation_impl": "pallas"}
        del d["solver"]
    elif isinstance(free, solvers.Adaptive) and nudge == solvers.Scan():
        d = {**d, "free_tol": free.tol}
        del d["solver"]
    return d


def _f(default, help, **meta):
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def _plain(v):
    """A default as `to_json` writes it (tuples as lists)."""
    return list(v) if isinstance(v, tuple) else v


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs; see each field's `help` (`describe()`)."""

    # data
    dataset: str = _f(
        "mnist", "mnist | kmnist | fashion_mnist (fmnist) | cifar10 | cifar100 | synthetic", choices=DATASETS
    )
    data_dir: str | None = _f(None, "folder with the dataset files; when given, the only place looked")
    subset: int | None = _f(None, "train on N examples (a seeded random choice, the same for every seed)")
    test_subset: int | None = _f(None, "evaluate on N test examples (seeded random choice)")
    subset_seed: int = _f(0, "seed of the subset choice (and of the synthetic dataset)", lo=0, hi=2**32 - 1)
    synthetic_train: int = _f(2000, "synthetic dataset: training examples", lo=1, hi=INT32_MAX)
    synthetic_test: int = _f(500, "synthetic dataset: test examples", lo=1, hi=INT32_MAX)
    synthetic_noise: float = _f(0.3, "synthetic dataset: pixel noise", lo=0.0)
    # model
    model: str = _f("dendritic", "ep | dendritic | conv | dendritic_conv", choices=("ep", "dendritic") + CONV_MODELS)
    sizes: tuple = _f((784, 256, 10), "layer widths, input first (MLP models)")
    activation: str = _f("hard_sigmoid", "hidden activation", choices=tuple(activations.ACTIVATIONS))
    output_activation: str | None = _f(
        None, "output activation (default: as the hidden one with mse)", choices=tuple(activations.ACTIVATIONS)
    )
    loss: str = _f("mse", "mse | ce", choices=losses.LOSSES)
    basal_branches: int = _f(8, "dendritic: basal branches per soma", lo=1, hi=2**16)
    apical_branches: int = _f(2, "dendritic: apical branches per soma", lo=1, hi=2**16)
    sparsity: float = _f(0.5, "dendritic: fraction of inputs each branch sees", lo=0.0, lo_open=True, hi=1.0)
    apical_dense: bool = _f(False, "dendritic: apical maps without masks")
    alpha: float = _f(0.2, "dendritic: apical scale")
    gamma: float = _f(1.0, "standard model: feedback scale (1 = energy-based)")
    input_shape: tuple | None = _f(None, "conv models: (H, W, C) of the images (default: the dataset's)", later=True)
    channels: tuple = _f((), "conv models: output channels of each conv layer", later=True)
    kernels: tuple = _f((), "conv models: kernel size k (k x k) of each conv layer", later=True)
    strides: tuple = _f((), "conv models: stride of each conv layer (default 1 each)", later=True)
    paddings: tuple = _f((), "conv models: zero padding of each conv layer (default 0 each)", later=True)
    pools: tuple = _f(
        (), "conv models: max | avg | none after each conv layer (2x2, stride 2; default max each)", later=True
    )
    fc: tuple = _f(
        (), "conv models: widths of the fully connected layers after the convs, the classes last", later=True
    )
    readout: str = _f(
        "none",
        "conv models: none | softmax (cross-entropy readout outside the dynamics)",
        choices=("none", "softmax"),
        later=True,
    )
    # estimator
    estimator: str = _f(
        "symmetric", "symmetric | one_sided | chl | bptt | bptt_full | holomorphic | implicit", choices=KINDS
    )
    t_free: int = _f(60, "free-phase steps T1", lo=1, hi=MAX_STEPS)
    t_nudge: int = _f(12, "nudged-phase steps T2 (bptt: truncation)", lo=1, hi=MAX_STEPS)
    nudge: str = _f("fixed", "fixed | random_sign (one_sided, chl)", choices=NUDGES)
    n_points: int | None = _f(
        None, "holomorphic: points N on the circle of complex nudges (default 4)", lo=2, hi=4096, later=True
    )
    implicit_tol: float | None = _f(
        None, "implicit: largest free-phase relative residual accepted (default 1e-5)", lo=0.0, lo_open=True, later=True
    )
    solver: str = _f(
        "scan",
        "how the phases relax (ep_jax.solvers), FREE or FREE/NUDGE: scan (t_free / t_nudge "
        "synchronous steps, the papers') | adaptive:TOL (synchronous until the relative residual is "
        "<= TOL; the steps the most) | async (even/odd sweeps, same fixed points) | async:TOL (and "
        "stop at TOL) | pallas (the fused GPU kernel; symmetric, one_sided, chl); e.g. "
        "adaptive:1e-5/scan, async:1e-5; bptt, bptt_full: scan only",
        later=True,
    )
    # relaxation
    beta: float = _f(0.1, "nudging strength (nonzero for EP estimators)")
    dt: Any = _f(1.0, "time step in (0, 1]: one, or one per state layer")
    dt_dist: str | None = _f(
        None, "heterogeneous hidden time steps: normal | lognormal | gamma | scalar", choices=timesteps.DISTRIBUTIONS
    )
    dt_mean: float | None = _f(None, "HTS mean (default %g)" % timesteps.DtSpec.mean)
    dt_std: float | None = _f(None, "HTS std (default %g)" % timesteps.DtSpec.std)
    dt_min: float | None = _f(None, "HTS lower clip (default %g)" % timesteps.DtSpec.dt_min)
    dt_max: float | None = _f(None, "HTS upper clip (default %g)" % timesteps.DtSpec.dt_max)
    dt_out: float | None = _f(None, "output-layer time step with dt_dist (default: dt)")
    # optimiser
    optimizer: str = _f("sgd", "sgd (PyTorch momentum) | adam; one rate per synapse", choices=OPTIMIZERS)
    lr: Any = _f((0.4, 0.02), "learning rate >= 0: one, or one per synapse")
    momentum: float = _f(0.9, "sgd momentum in [0, 1)", lo=0.0, hi=1.0, hi_open=True)
    lr_schedule: str = _f(
        "constant", "constant | cosine (per epoch, from lr to lr_min over the epochs)", choices=LR_SCHEDULES, later=True
    )
    lr_min: float = _f(1e-5, "cosine schedule: the rate of the last epoch's end", lo=0.0, later=True)
    lr_epochs: int | None = _f(
        None,
        "cosine schedule: its period T_max in epochs (default: epochs; past it "
        "the rates rise again, as PyTorch's CosineAnnealingLR)",
        lo=1,
        hi=INT32_MAX,
        later=True,
    )
    weight_decay: float = _f(0.0, "added to the gradient: g + weight_decay * theta (PyTorch's)", lo=0.0, later=True)
    # loop
    batch_size: int = _f(64, "training batch size", lo=1, hi=INT32_MAX)
    epochs: int = _f(20, "epochs to train", lo=1, hi=INT32_MAX)
    seed: int = _f(0, "seed of init, masks, time steps, data order and nudge signs", lo=0, hi=2**32 - 1)
    eval_batch: int = _f(1000, "evaluation batch size", lo=1, hi=INT32_MAX)
    chunk: int = _f(100, "training steps per device-resident scan", lo=1, hi=INT32_MAX)
    max_state: float = _f(1e4, "a state magnitude above this counts as divergence", lo=0.0, lo_open=True)
    float64: bool = _f(False, "compute in float64")
    align_every: int = _f(0, "every N steps log EP-vs-BPTT alignment on a probe batch (0: off)", lo=0, hi=INT32_MAX)
    align_batch: int = _f(64, "probe batch size of the alignment log", lo=1, hi=INT32_MAX)
    align_reference: str = _f(
        "bptt",
        "what the alignment log compares with: bptt (truncated to t_nudge) | "
        "bptt_full | implicit (the equilibrium gradient)",
        choices=("bptt", "bptt_full", "implicit"),
        later=True,
    )
    augment: bool = _f(
        False,
        "training images: random crop (4-pixel edge padding) and horizontal flip, on "
        "the device, from the data key; never at evaluation",
        later=True,
    )

    # --- construction ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping, where: str = "") -> RunConfig:
        """Build from plain values (JSON/TOML/--set), coercing types; unknown fields raise."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}expected a table of config fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - set(LEGACY))
        if unknown:
            raise ConfigError(f"{where}unknown config field(s) {short(unknown)}; run with --list-fields to see them")
        d = _from_legacy(d, where)
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                kw[f.name] = _coerce(f, d[f.name], where)
        return cls(**kw)

    def replace(self, **changes) -> RunConfig:
        """A copy with `changes` (plain values, coerced like `from_dict`)."""
        return RunConfig.from_dict({**self.to_json(), **changes})

    def to_json(self) -> dict:
        """Plain JSON values; `RunConfig.from_dict(cfg.to_json()) == cfg`."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def model_options(self) -> dict:
        """The keyword arguments of `ep_jax.build_model(self.model, ...)`; conv models get
        the layers with the defaults filled (stride 1, padding 0, max pooling) and the
        image shape."""
        if self.model in CONV_MODELS:
            layers = self.conv_layers()
            kw = dict(
                input_shape=tuple(self.image_shape()),
                channels=tuple(self.channels),
                kernels=tuple(self.kernels),
                strides=tuple(c["stride"] for c in layers),
                paddings=tuple(c["padding"] for c in layers),
                pools=tuple(c["pool"] for c in layers),
                fc=tuple(self.fc),
                activation=self.activation,
                output_activation=self.output_activation,
                loss=self.loss,
                readout=self.readout,
            )
        else:
            kw = dict(
                sizes=tuple(self.sizes),
                activation=self.activation,
                output_activation=self.output_activation,
                loss=self.loss,
            )
        if self.model in ("dendritic", "dendritic_conv"):
            kw.update(
                basal_branches=self.basal_branches,
                apical_branches=self.apical_branches,
                sparsity=self.sparsity,
                apical_dense=self.apical_dense,
            )
        return kw

    def digest(self, exclude=("epochs",)) -> str:
        """Short hash of the config without `exclude` (what a checkpoint must match).

        Fields added after checkpoints existed (`later=True` in their metadata) count
        only when they differ from their default, so a run saved before the field
        existed keeps its digest and can be resumed."""
        later = {f.name: f.default for f in dataclasses.fields(self) if f.metadata.get("later")}
        d = {
            k: v
            for k, v in _to_legacy(self.to_json()).items()
            if k not in exclude and not (k in later and v == _plain(later[k]))
        }
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # --- derived --------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """State layers: widths minus one (conv models: conv layers + fc layers, less the
        last fc layer when it is the softmax readout, which is outside the dynamics)."""
        if self.model in CONV_MODELS:
            return len(self.channels) + len(self.fc) - (self.readout != "none")
        return len(self.sizes) - 1

    def n_synapses(self) -> int:
        """Weight layers, one learning rate each: the state layers' (and the readout)."""
        if self.model in CONV_MODELS:
            return len(self.channels) + len(self.fc)
        return self.n_layers

    def image_shape(self) -> tuple | None:
        """`(H, W, C)` of the inputs: `input_shape`, else the dataset's (None for synthetic)."""
        if self.input_shape is not None:
            return tuple(self.input_shape)
        from ep_jax.data import IMAGE_SHAPES

        return IMAGE_SHAPES.get(self.dataset)

    def n_inputs(self) -> int:
        """Input features per example (`sizes[0]`; conv models: H x W x C)."""
        if self.model in CONV_MODELS:
            h, w, c = self.image_shape() or (0, 0, 0)
            return h * w * c
        return self.sizes[0]

    def n_classes(self) -> int:
        """Output width (`sizes[-1]`; conv models: `fc[-1]`)."""
        if self.model in CONV_MODELS:
            return self.fc[-1] if self.fc else 0
        return self.sizes[-1]

    def layer_summary(self) -> str:
        """The widths in one word: `784-256-10`, conv models `28x28x1-c8-c16-10`
        (`...-512-r10` when the last width is the softmax readout)."""
        if self.model not in CONV_MODELS:
            return "-".join(str(n) for n in self.sizes)
        shape = self.image_shape()
        parts = ["x".join(map(str, shape)) if shape else "?"] + [f"c{c}" for c in self.channels]
        fc = [str(n) for n in self.fc]
        if self.readout != "none" and fc:
            fc[-1] = "r" + fc[-1]
        return "-".join(parts + fc)

    def conv_layers(self) -> list[dict]:
        """Per conv layer: channels, kernel, stride, padding, pool (defaults filled: stride
        1, padding 0, max pool) and the shapes `(h_in, w_in, c_in)`, `(h_conv, w_conv)`
        (before pooling) and `(h_out, w_out)` (the state). Pooling is 2x2 with stride 2
        (floor). Shapes that do not fit are left as they come (`validate` refuses them)."""
        n = len(self.channels)
        strides = self.strides or (1,) * n
        paddings = self.paddings or (0,) * n
        pools = self.pools or ("max",) * n
        h, w, c = self.image_shape() or (0, 0, 0)
        out = []
        for l in range(n):
            k, st, p = self.kernels[l], strides[l], paddings[l]
            hc, wc = (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1
            ho, wo = (hc // 2, wc // 2) if pools[l] != "none" else (hc, wc)
            out.append(
                dict(
                    channels=self.channels[l],
                    kernel=k,
                    stride=st,
                    padding=p,
                    pool=pools[l],
                    h_in=h,
                    w_in=w,
                    c_in=c,
                    h_conv=hc,
                    w_conv=wc,
                    h_out=ho,
                    w_out=wo,
                )
            )
            h, w, c = ho, wo, self.channels[l]
        return out

    def static_key(self) -> tuple:
        """What members must share to run as one vmapped group."""
        return tuple((k, json.dumps(v)) for k, v in sorted(self.to_json().items()) if k not in NUMERIC)

    def total_train(self) -> int:
        """Training examples in the dataset."""
        return self.synthetic_train if self.dataset == "synthetic" else TRAIN_SIZE[self.dataset]

    def total_test(self) -> int:
        """Test examples in the dataset."""
        return self.synthetic_test if self.dataset == "synthetic" else TEST_SIZE[self.dataset]

    def n_train(self) -> int:
        """Training examples the run uses (after the subset)."""
        return self.subset or self.total_train()

    def n_test(self) -> int:
        """Test examples the run uses (after the test subset)."""
        return self.test_subset or self.total_test()

    def steps_per_epoch(self) -> int:
        """Training steps of one epoch: every full batch, then the partial last one."""
        return -(-self.n_train() // self.batch_size)

    def dt_spec(self):
        """The HTS spec of the hidden layers, or None."""
        if self.dt_dist is None:
            return None
        given = {"mean": self.dt_mean, "std": self.dt_std, "dt_min": self.dt_min, "dt_max": self.dt_max}
        return timesteps.DtSpec(dist=self.dt_dist, **{k: v for k, v in given.items() if v is not None})


#: fields that are arrays in the compiled program (members may differ in them)
NUMERIC = (
    "seed",
    "beta",
    "lr",
    "momentum",
    "alpha",
    "gamma",
    "dt",
    "dt_dist",
    "dt_mean",
    "dt_std",
    "dt_min",
    "dt_max",
    "dt_out",
)

FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def describe() -> str:
    """One line per field: name, default, help."""
    return "\n".join(
        f"{f.name:18s} {json.dumps(RunConfig().to_json()[f.name]):>22s}  {f.metadata['help']}"
        for f in dataclasses.fields(RunConfig)
    )


# --- coercion ---------------------------------------------------------------------------


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    """`math.isfinite` that also takes integers beyond the float range (always finite)."""
    return _is_int(v) or math.isfinite(v)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 8, 8, 8, 60, 60


def short(v) -> str:
    """A value for a one-line message: long integers by their size, deep or long
    containers and strings cut (`[[[...]]]`, `'abc...'`)."""
    if _is_int(v) and abs(v) >= 10**18:
        return f"{'-' if v < 0 else ''}an integer of {len(str(abs(v)))} digits"
    try:
        return _REPR.repr(v)
    except RecursionError:
        return f"a {type(v).__name__} nested too deep"


def _non_holomorphic(cfg) -> list[str]:
    """What the holomorphic estimator cannot run in `cfg`'s model (the model's own list)."""
    from ep_jax.models import build_model

    try:
        model = build_model(cfg.model, **cfg.model_options())
    except Exception:  # noqa: BLE001 — a bad model is reported by its own field's check
        return []
    parts = getattr(model, "non_holomorphic", None)
    return parts() if callable(parts) else []


def _coerce(f: dataclasses.Field, v, where: str = ""):
    name = f.name
    default = f.default

    def bad(expected):
        return ConfigError(f"{where}{name}: expected {expected}, got {short(v)}")

    def to_float(u):
        try:
            return float(u)
        except OverflowError:
            raise ConfigError(f"{where}{name}: {short(u)} is beyond the float range") from None

    if name in ("lr", "dt"):
        if _is_number(v):
            return to_float(v)
        if isinstance(v, (list, tuple)) and v and all(_is_number(u) for u in v):
            return tuple(to_float(u) for u in v)
        raise bad("a number or a list of numbers (one per " + ("synapse" if name == "lr" else "state layer") + ")")
    if name == "sizes":
        if isinstance(v, (list, tuple)) and all(isinstance(u, int) and not isinstance(u, bool) for u in v):
            return tuple(v)
        raise bad("a list of integer widths")
    if name in ("channels", "kernels", "strides", "paddings", "fc") or (name == "input_shape" and v is not None):
        if _is_int(v) and name != "input_shape":
            v = [v]
        if isinstance(v, (list, tuple)) and all(_is_int(u) for u in v):
            return tuple(v)
        raise bad("a list of integers" + (" (H, W, C)" if name == "input_shape" else ""))
    if name == "pools":
        if isinstance(v, str):
            v = [v]
        if isinstance(v, (list, tuple)) and all(isinstance(u, str) for u in v):
            return tuple(v)
        raise bad(f"a list of {' | '.join(POOLS)}")
    if v is None:
        if default is None:
            return None
        raise bad(f"a value (the field has no 'none'; default {default!r})")
    if isinstance(default, bool):
        if isinstance(v, bool):
            return v
        raise bad("true or false")
    if isinstance(default, int) or name in ("subset", "test_subset", "n_points", "lr_epochs"):
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise bad("an integer")
        return int(v)
    if name == "solver":  # its canonical spelling (one part when both phases agree)
        if not isinstance(v, str):
            raise bad("a string such as scan, adaptive:1e-5/scan or async:1e-5")
        try:
            return solvers.spell_phases(*solvers.parse_phases(v))
        except ValueError as e:
            raise ConfigError(f"{where}{e}") from None
    if isinstance(default, float) or name in ("dt_mean", "dt_std", "dt_min", "dt_max", "dt_out", "implicit_tol"):
        if not _is_number(v):
            raise bad("a number")
        return to_float(v)
    if isinstance(default, str) or default is None:
        if not isinstance(v, str):
            raise bad("a string")
        return DATASET_ALIASES.get(v, v) if name == "dataset" else v
    return v


# --- validation -------------------------------------------------------------------------


def validate(cfg: RunConfig) -> RunConfig:
    """Check every field and every rule between fields; raise `ConfigError` on the first
    problem. Returns `cfg` (so `validate(RunConfig.from_dict(d))` reads well)."""

    def err(name, msg):
        raise ConfigError(f"{name}: {msg}")

    for f in dataclasses.fields(RunConfig):
        v, m = getattr(cfg, f.name), f.metadata
        if v is None:
            continue
        if "choices" in m and v not in m["choices"]:
            err(f.name, f"must be one of {list(m['choices'])}, got {short(v)}")
        if _is_number(v) and not _finite(v):
            err(f.name, f"must be finite, got {v}")
        if "lo" in m and (v <= m["lo"] if m.get("lo_open") else v < m["lo"]):
            err(f.name, f"must be {'>' if m.get('lo_open') else '>='} {m['lo']}, got {short(v)}")
        if "hi" in m and (v >= m["hi"] if m.get("hi_open") else v > m["hi"]):
            err(f.name, f"must be {'<' if m.get('hi_open') else '<='} {m['hi']}, got {short(v)}")
        if _is_int(v) and abs(v) > 2**63 - 1:  # subset, test_subset: no bound of their own
            err(f.name, f"must be an integer in the int64 range, got {short(v)}")

    L = cfg.n_layers
    if cfg.model in CONV_MODELS:
        _validate_conv(cfg, err)
    else:
        for name in CONV_FIELDS:
            if getattr(cfg, name) != FIELDS[name].default:
                err(name, f"applies to the conv models only ({' | '.join(CONV_MODELS)}; model = {cfg.model!r})")
    if cfg.model in CONV_MODELS:
        pass  # their widths are channels and fc (checked above)
    elif len(cfg.sizes) < 2 or any(n < 1 for n in cfg.sizes):
        err("sizes", f"must list >= 2 positive widths (input, ..., output), got {short(list(cfg.sizes))}")
    elif any(n > MAX_WIDTH for n in cfg.sizes):
        err("sizes", f"widths must be <= {MAX_WIDTH} (2^24), got {short(max(cfg.sizes))}")
    elif cfg.dataset != "synthetic":
        from ep_jax.data import IMAGE_SHAPES, N_CLASSES

        h, w, c = IMAGE_SHAPES[cfg.dataset]
        if cfg.sizes[0] != h * w * c:
            err(
                "sizes",
                f"the first width must be {h * w * c} ({h}x{w}x{c} images) for {cfg.dataset}, got {cfg.sizes[0]}",
            )
        if cfg.sizes[-1] != N_CLASSES[cfg.dataset]:
            err(
                "sizes",
                f"the last width must be {N_CLASSES[cfg.dataset]} (classes) for {cfg.dataset}, got {cfg.sizes[-1]}",
            )
    elif cfg.sizes[-1] < 2:
        err("sizes", "the synthetic dataset needs >= 2 classes (last width)")
    for name, total in (("subset", cfg.total_train()), ("test_subset", cfg.total_test())):
        v = getattr(cfg, name)
        if v is not None and not 1 <= v <= total:
            err(name, f"must lie in [1, {total}] ({cfg.dataset} has {total} examples), got {v}")
    if cfg.batch_size > cfg.n_train():
        err("batch_size", f"must not exceed the {cfg.n_train()} training examples, got {cfg.batch_size}")
    steps = cfg.epochs * cfg.steps_per_epoch()
    if steps > INT32_MAX:
        err(
            "epochs",
            f"{cfg.epochs} epochs of {cfg.steps_per_epoch()} steps make {steps} training steps, more "
            f"than the int32 step counter holds ({INT32_MAX}); at most "
            f"{INT32_MAX // cfg.steps_per_epoch()} epochs",
        )
    if cfg.t_nudge > cfg.t_free and cfg.estimator != "bptt_full":
        err("t_nudge", f"must be <= t_free, got t_nudge={cfg.t_nudge} > t_free={cfg.t_free}")
    if cfg.estimator in EP_KINDS and cfg.beta == 0:
        err("beta", f"must be nonzero for the {cfg.estimator!r} EP estimator (it divides by beta)")
    if not math.isfinite(cfg.beta):
        err("beta", f"must be finite, got {cfg.beta}")
    try:
        free, nudge = solvers.parse_phases(cfg.solver)
    except ValueError as e:
        err("solver", str(e).removeprefix("solver").lstrip(": "))
    if cfg.estimator in ("bptt", "bptt_full") and cfg.solver != "scan":
        err(
            "solver",
            f"the {cfg.estimator} estimator differentiates the synchronous scan: solver must be scan, "
            f"got {cfg.solver!r}",
        )
    if any(isinstance(v, solvers.Pallas) for v in (free, nudge)) and cfg.estimator not in (
        "symmetric",
        "one_sided",
        "chl",
    ):
        err("solver", f"pallas needs estimator symmetric, one_sided or chl, got {cfg.estimator!r}")
    if cfg.nudge == "random_sign" and cfg.estimator not in RANDOM_SIGN_KINDS:
        err("nudge", f"random_sign needs estimator one of {list(RANDOM_SIGN_KINDS)}, got {cfg.estimator!r}")
    if cfg.n_points is not None and cfg.estimator != "holomorphic":
        err("n_points", f"is a setting of the holomorphic estimator, not of {cfg.estimator!r}")
    if cfg.implicit_tol is not None and cfg.estimator != "implicit":
        err("implicit_tol", f"is a setting of the implicit estimator, not of {cfg.estimator!r}")
    if cfg.estimator == "holomorphic":
        bad = _non_holomorphic(cfg)
        if bad:
            err(
                "estimator",
                f"holomorphic needs holomorphic functions, and this model uses {', '.join(bad)}; "
                f"holomorphic activations: {', '.join(activations.HOLOMORPHIC)}",
            )
    lrs = cfg.lr if isinstance(cfg.lr, tuple) else (cfg.lr,)
    if isinstance(cfg.lr, tuple) and len(cfg.lr) != cfg.n_synapses():
        err(
            "lr",
            f"give one rate or one per synapse ({cfg.n_synapses()} for "
            + (
                f"{len(cfg.channels)} conv + {len(cfg.fc)} fc layers"
                if cfg.model in CONV_MODELS
                else f"sizes {list(cfg.sizes)}"
            )
            + f"), got {len(cfg.lr)}",
        )
    if any(not math.isfinite(r) or r < 0 for r in lrs):
        err("lr", f"rates must be finite and >= 0 (a negative rate trains uphill), got {list(lrs)}")
    dts = cfg.dt if isinstance(cfg.dt, tuple) else (cfg.dt,)
    if isinstance(cfg.dt, tuple) and len(cfg.dt) != L:
        err("dt", f"give one time step or one per state layer ({L}), got {len(cfg.dt)}")
    if any(not 0 < d <= 1 for d in dts):
        err("dt", f"time steps must lie in (0, 1], got {list(dts)}")
    if cfg.dt_dist is None:
        for name in ("dt_mean", "dt_std", "dt_min", "dt_max"):
            if getattr(cfg, name) is not None:
                err(name, "is used only with dt_dist (heterogeneous time steps); set dt_dist too")
    else:
        if L < 2:
            err("dt_dist", "heterogeneous time steps apply to hidden layers; the model has none")
        if isinstance(cfg.dt, tuple):
            err("dt", "with dt_dist give the output layer's step as dt_out, not a per-layer dt list")
        try:
            cfg.dt_spec()
        except ValueError as e:
            err("dt_dist", str(e))
    if cfg.dt_out is not None and not 0 < cfg.dt_out <= 1:
        err("dt_out", f"must lie in (0, 1], got {cfg.dt_out}")
    if cfg.model not in DENDRITIC_MODELS:
        for name in ("basal_branches", "apical_branches", "sparsity", "apical_dense", "alpha"):
            if getattr(cfg, name) != FIELDS[name].default:
                err(name, f"applies to the dendritic models only (model = {cfg.model!r})")
    if cfg.model != "ep" and cfg.gamma != FIELDS["gamma"].default:
        err(
            "gamma",
            f"applies to the standard model only (model = {cfg.model!r}"
            + ("; its apical scale is alpha)" if cfg.model in DENDRITIC_MODELS else ")"),
        )
    if cfg.lr_schedule != "cosine" and cfg.lr_min != FIELDS["lr_min"].default:
        err("lr_min", "is used only with lr_schedule = 'cosine'")
    if cfg.lr_schedule != "cosine" and cfg.lr_epochs is not None:
        err("lr_epochs", "is used only with lr_schedule = 'cosine'")
    if cfg.augment and cfg.image_shape() is None:
        err("augment", "needs images (the synthetic dataset has none; give input_shape with a conv model)")
    if cfg.align_every and cfg.t_nudge > cfg.t_free:
        err("align_every", "compares with BPTT truncated to t_nudge steps, which needs t_nudge <= t_free")
    return cfg


def _validate_conv(cfg: RunConfig, err):
    """The rules of the conv models' fields (`validate`): list lengths, ranges, the input
    shape against the dataset's images, and every layer's kernel and pooling against the
    map it gets."""
    if cfg.sizes != FIELDS["sizes"].default:
        err(
            "sizes",
            f"applies to the MLP models (ep, dendritic); model {cfg.model!r} takes input_shape, "
            "channels, kernels, strides, paddings, pools and fc",
        )
    n = len(cfg.channels)
    if n == 0 or any(c < 1 for c in cfg.channels):
        err("channels", f"must list >= 1 positive channel counts (one per conv layer), got {short(list(cfg.channels))}")
    if any(c > MAX_WIDTH for c in cfg.channels):
        err("channels", f"must be <= {MAX_WIDTH}, got {short(max(cfg.channels))}")
    if len(cfg.kernels) != n:
        err("kernels", f"give one kernel size per conv layer ({n} channels listed), got {len(cfg.kernels)}")
    for name in ("strides", "paddings", "pools"):
        v = getattr(cfg, name)
        if v and len(v) != n:
            err(name, f"give one per conv layer ({n} channels listed) or none (the default), got {len(v)}")
    if any(k < 1 for k in cfg.kernels):
        err("kernels", f"must be >= 1, got {short(list(cfg.kernels))}")
    if any(st < 1 for st in cfg.strides):
        err("strides", f"must be >= 1, got {short(list(cfg.strides))}")
    if any(p < 0 for p in cfg.paddings):
        err("paddings", f"must be >= 0, got {short(list(cfg.paddings))}")
    bad = [p for p in cfg.pools if p not in POOLS]
    if bad:
        err("pools", f"must each be one of {list(POOLS)}, got {short(bad[0])}")
    if not cfg.fc or any(w < 1 for w in cfg.fc):
        err("fc", f"must list >= 1 positive widths, the classes last, got {short(list(cfg.fc))}")
    if cfg.readout == "softmax":
        if cfg.loss != "ce":
            err("readout", f"softmax is the cross-entropy readout: set loss = 'ce' (got {cfg.loss!r})")
        if cfg.output_activation is not None:
            err("output_activation", "must be left out with readout = 'softmax' (the last state layer is hidden)")
        if cfg.n_layers < 1:
            err(
                "fc",
                "with readout = 'softmax' the last fc width is the readout's; the network needs a state layer below it",
            )
    if any(w > MAX_WIDTH for w in cfg.fc):
        err("fc", f"widths must be <= {MAX_WIDTH}, got {short(max(cfg.fc))}")
    if cfg.input_shape is not None and (len(cfg.input_shape) != 3 or any(d < 1 for d in cfg.input_shape)):
        err("input_shape", f"must be three positive integers (H, W, C), got {short(list(cfg.input_shape))}")
    if cfg.dataset == "synthetic":
        if cfg.input_shape is None:
            err("input_shape", "the synthetic dataset has no image shape: give input_shape (H, W, C)")
        if cfg.fc[-1] < 2:
            err("fc", "the synthetic dataset needs >= 2 classes (last width)")
    else:
        from ep_jax.data import IMAGE_SHAPES, N_CLASSES

        shape = IMAGE_SHAPES[cfg.dataset]
        if cfg.input_shape is not None and tuple(cfg.input_shape) != shape:
            err(
                "input_shape",
                f"{list(cfg.input_shape)} does not match {cfg.dataset}'s {shape[0]}x{shape[1]}x"
                f"{shape[2]} images (leave it out to take the dataset's)",
            )
        if cfg.fc[-1] != N_CLASSES[cfg.dataset]:
            err("fc", f"the last width must be {N_CLASSES[cfg.dataset]} (classes) for {cfg.dataset}, got {cfg.fc[-1]}")
    for l, c in enumerate(cfg.conv_layers(), 1):
        hp, wp = c["h_in"] + 2 * c["padding"], c["w_in"] + 2 * c["padding"]
        if c["kernel"] > min(hp, wp):
            err(
                "kernels",
                f"conv layer {l}: a {c['kernel']}x{c['kernel']} kernel is larger than its {hp}x{wp} input"
                f" ({c['h_in']}x{c['w_in']} with padding {c['padding']})",
            )
        if c["h_out"] < 1 or c["w_out"] < 1:
            err(
                "pools",
                f"conv layer {l}: 2x2 {c['pool']} pooling of its {c['h_conv']}x{c['w_conv']} map leaves a "
                "zero-sized map (fewer layers, more padding, or pool 'none')",
            )


def warnings_for(cfg: RunConfig) -> list[str]:
    """Legal but probably unintended settings, one line each."""
    out = []
    if cfg.model == "ep" and cfg.gamma != 1 and cfg.estimator in ("symmetric", "one_sided"):
        out.append(
            f"gamma={cfg.gamma} != 1 with the {cfg.estimator!r} estimator: not a gradient system, the "
            "estimate is not the loss gradient (the 'chl' rule is the one paired with gamma != 1)"
        )
    if cfg.optimizer == "adam" and cfg.momentum != FIELDS["momentum"].default:
        out.append("momentum is not used by adam")
    if cfg.estimator in EP_KINDS:
        b = abs(cfg.beta)
        if b > 10:
            out.append(
                f"|beta| = {b:g} > 10: the nudge swamps the network's own drive, the nudged state is "
                "pinned to the target and the estimate is far from the loss gradient (EP needs a small beta)"
            )
        elif b < 1e-6:
            out.append(
                f"|beta| = {b:g} < 1e-6: the nudged and free states differ by less than the floating-point "
                "resolution of the states, so the estimate (that difference divided by beta) is rounding "
                "noise and training stays at chance"
            )
    dts = [d for d in (cfg.dt if isinstance(cfg.dt, tuple) else (cfg.dt,))]
    dts += [d for d in (cfg.dt_out, cfg.dt_mean) if d is not None]
    if dts and min(dts) < 1e-4:
        d = min(dts)
        out.append(
            f"a time step of {d:g} < 1e-4: the relaxation barely moves (t_free x dt = {cfg.t_free * d:.2g} "
            "of the ~1 time constant it needs), the states stay near their start and training stays at "
            "chance"
        )
    per_step = cfg.t_free + 3 * cfg.t_nudge
    per_chunk = cfg.chunk * per_step
    if per_chunk > 2_000_000:
        # a round chunk well below the limit (a tenth of it), never the limit's edge (99 for 100)
        fit = max(1, 200_000 // per_step)
        nice = max(m * 10**k for k in range(10) for m in (1, 2, 5) if m * 10**k <= fit)
        how = (
            f"set a smaller chunk (--set chunk={nice})"
            if nice < cfg.chunk
            else "one training step alone is that long; fewer relaxation steps (t_free, t_nudge) shorten it"
        )
        out.append(
            f"a chunk of {cfg.chunk} step{'s' * (cfg.chunk != 1)} is about {per_chunk:.2g} relaxation "
            "steps: the progress bar moves, and Ctrl-C/SIGTERM take effect, only between chunks (after "
            f"minutes or more); {how}"
        )
    return out


# --- command-line values ----------------------------------------------------------------


def parse_value(text: str):
    """A `--set` value: JSON (numbers, true/false, null, [lists], "strings"), `none`,
    a comma-separated list of numbers (`0.5,0.2`), or else the bare string."""
    t = text.strip()
    if t.lower() in ("none", "null"):
        return None
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    try:
        return json.loads(t)
    except json.JSONDecodeError:
        pass
    if "," in t:
        parts = [p.strip() for p in t.strip("[]").split(",") if p.strip()]
        try:
            return [json.loads(p) for p in parts]
        except json.JSONDecodeError:
            return parts
    return t


def parse_sets(pairs) -> dict:
    """`["lr=0.5,0.2", "beta=0.3"]` -> `{"lr": [0.5, 0.2], "beta": 0.3}`."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, text = pair.split("=", 1)
        key = key.strip()
        if key not in FIELDS:
            raise ConfigError(f"--set: unknown config field {key!r}; run with --list-fields to see them")
        out[key] = parse_value(text)
    return out


# --- memory -----------------------------------------------------------------------------


def _conv_counts(cfg: RunConfig) -> tuple[int, int, int, int]:
    """Conv models: `(weights, biases, state elements, pre-activation elements)` per
    example — kernels k·k·C_in·C_out (dendritic: K_b basal copies, and K_a apical copies
    of the layer above's kernel or fc map), fc matrices; states are the pooled maps and
    the fc layers; the pre-activations are the maps before pooling (times the branches)."""
    layers = cfg.conv_layers()
    dend = cfg.model == "dendritic_conv"
    Kb, Ka = (cfg.basal_branches, cfg.apical_branches) if dend else (1, 1)
    conv_w = [c["kernel"] ** 2 * c["c_in"] * c["channels"] for c in layers]
    widths = [layers[-1]["h_out"] * layers[-1]["w_out"] * layers[-1]["channels"]] + list(cfg.fc)
    fc_w = [widths[i] * widths[i + 1] for i in range(len(cfg.fc))]
    syn = conv_w + fc_w  # per synapse, input side first
    W = Kb * sum(syn) + (Ka * sum(syn[1:]) if dend else 0)  # apical maps of hidden layers
    b = Kb * (sum(c["channels"] for c in layers) + sum(cfg.fc))
    states = [c["h_out"] * c["w_out"] * c["channels"] for c in layers] + list(cfg.fc)
    pre = [c["h_conv"] * c["w_conv"] * c["channels"] for c in layers] + list(cfg.fc)
    S = sum(states)
    Z = Kb * sum(pre) + (Ka * sum(states[:-1]) if dend else 0)
    return W, b, S, Z


def _weights(cfg: RunConfig) -> tuple[int, int]:
    """`(weights, biases)`: element counts of the kernels (dendritic: and of their masks,
    same shape) and of the bias vectors."""
    if cfg.model in CONV_MODELS:
        return _conv_counts(cfg)[:2]
    s, L = cfg.sizes, cfg.n_layers
    if cfg.model == "ep":
        return sum(s[l] * s[l + 1] for l in range(L)), sum(s[1:])
    Kb, Ka = cfg.basal_branches, cfg.apical_branches
    basal = sum(s[l] * Kb * s[l + 1] for l in range(L))  # (n_{l-1}, K_b n_l) per synapse
    apical = sum(s[l + 2] * Ka * s[l + 1] for l in range(L - 1))  # (n_{l+1}, K_a n_l) per hidden layer
    return basal + apical, sum(Kb * n for n in s[1:])


def memory_breakdown(cfg: RunConfig, members: int = 1) -> dict[str, int]:
    """Bytes a run needs at its peak, by part (rough, meant to be within 2x): parameters
    and masks, the optimiser's state, gradients and updated copies, the states of a batch
    over the relaxation (BPTT keeps every step it differentiates), evaluation, the
    alignment probe, and the dataset (on the device and its host copy). `members`
    vmapped members multiply everything but the dataset."""
    f = 8 if cfg.float64 else 4
    W, b = _weights(cfg)
    P = W + b  # parameter elements
    S = sum(cfg.sizes[1:])  # state elements per example
    if cfg.model in CONV_MODELS:  # pooled maps; the maps before pooling
        _, _, S, Z = _conv_counts(cfg)
    elif cfg.model == "dendritic":  # branch pre-activations per example
        Z = sum(cfg.basal_branches * n for n in cfg.sizes[1:]) + sum(cfg.apical_branches * n for n in cfg.sizes[1:-1])
    else:
        Z = S
    # a BPTT step's saved values (states, inputs, the ReLU pattern of the branches; calibrated
    # on XLA's memory analysis; conv models: also the maps before pooling, for the pool's argmax)
    residual = 2 * S + (Z // 4 if cfg.model == "dendritic" else Z if cfg.model in CONV_MODELS else 0)

    # states alive at once, in layer-state units: EP the free, nudged and anti-nudged ones and a
    # step's temporaries; holomorphic the free one and N complex ones (two floats each)
    n_states = 2 + 2 * (cfg.n_points or 4) if cfg.estimator == "holomorphic" else 4

    # one relaxation step's temporaries per pre-activation: conv models hold the patches of
    # their convolutions and the pooling's argmax besides the maps (calibrated on XLA's memory
    # analysis of the compiled CPU step: fmnist-conv-small 28.9 MB, cifar10-conv-ep 1641 MB,
    # cifar10-conv-dep 3947 MB, whose K_b branch maps share one convolution's patches)
    zt = {"conv": 12, "dendritic_conv": 3}.get(cfg.model, 2)

    def relaxation(batch, stored_steps):
        # EP: the states above and one step's temporaries;
        # BPTT: every differentiated step's residuals, plus one step's temporaries
        return batch * f * (n_states * S + zt * Z + stored_steps * residual)

    # implicit: the adjoint's VJP holds one step's residuals
    stored = {"bptt": cfg.t_nudge, "bptt_full": cfg.t_free, "implicit": 1}.get(cfg.estimator, 0)
    n_examples = cfg.n_train() + cfg.n_test()
    parts = {
        "parameters and masks": f * (P + (2 * W if cfg.model in DENDRITIC_MODELS else 0)),  # + masked kernels
        "optimiser state": f * P * (2 if cfg.optimizer == "adam" else 1),
        "gradients and updates": f * 2 * P,
        "relaxation states": relaxation(cfg.batch_size, stored),
        "evaluation": cfg.eval_batch * f * (2 * S + zt * Z),
        "alignment probe": (relaxation(cfg.align_batch, cfg.t_nudge) + f * 2 * P) if cfg.align_every else 0,
    }
    parts = {k: v * members for k, v in parts.items()}
    n_in = cfg.n_inputs()
    parts["dataset"] = n_examples * (n_in * f + 4) + (cfg.total_train() + cfg.total_test()) * n_in * 4
    return parts


def estimate_memory(cfg: RunConfig, members: int = 1) -> int:
    """Bytes a run needs at its peak (`memory_breakdown`, summed): parameters and masks,
    optimiser state, the batch's states over the relaxation, the dataset on the device."""
    return int(sum(memory_breakdown(cfg, members).values()))


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (None where the system does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n: float) -> str:
    """`1.5 GiB`-style."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_memory(cfg: RunConfig, available: int | None = None, members: int = 1) -> int:
    """Refuse (`ConfigError`, naming the need and what is available) a run whose
    `estimate_memory` exceeds `available` bytes (default: the physical memory,
    `os.sysconf` pages x page size). Returns the estimate."""
    need = estimate_memory(cfg, members)
    where = "given"
    if available is None:
        available, where = physical_memory(), "physical memory of this machine"
        if available is None:
            return need
    if need > available:
        parts = sorted(memory_breakdown(cfg, members).items(), key=lambda kv: -kv[1])[:2]
        detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts)
        raise ConfigError(
            f"the run needs about {format_bytes(need)} of memory (mostly {detail}), more than the "
            f"{format_bytes(available)} available ({where}); make the network (sizes, "
            "basal_branches), batch_size or eval_batch smaller"
        )
    return need
