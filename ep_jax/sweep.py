"""Hyperparameter sweeps as one vmapped computation.

A sweep is a list of member configs (`MemberConfig`). Members that share their *static*
structure — model kind, widths, activation and other model options, estimator kind and
step counts, batch size — form a group (`group_members`); a group is compiled once and
trained as one `jax.vmap` over a leading member axis `M`. Members of a group may differ in
every *numeric* setting: seed, β, per-synapse learning rates, α, γ, momentum, per-layer or
per-neuron `dt`, and the nudging sign schedule.

Seeds and keys. A member's seed gives `init_key, dt_key, sign_key = split(PRNGKey(seed), 3)`
(`member_keys`): the init params (and dendritic masks) come from `init_key`, sampled time
steps from `dt_key`, random nudging signs from `sign_key`. Members with different seeds
therefore start from different params but see the SAME data stream: `sweep_step` takes one
batch shared by all members. A batch with a leading member axis, `x: (M, batch, n_0)`,
`y: (M, batch)`, gives every member its own data instead (per-member data order); the
command line does not use it.

Time steps. A member's `dt` is a float, or one entry per state layer (float or `(n_l,)`
array). Sampled heterogeneous time steps (HTS, SPEC §4) are asked for with `dt_dist` (a
mapping describing the hidden-layer distribution) and `dt_out` (the output layer's
scalar); they are drawn by the `dt_sampler` hook, `dt_sampler(dt_key, model, dt_dist,
dt_out) -> tuple of per-layer dt`. The default hook `hts_dt_sampler` hands them to
`ep_jax.timesteps` (`DtSpec(**dt_dist)`, `layer_dts`). Members whose dt shapes differ
(scalar in one, per-neuron in another) are stacked by broadcasting to `(n_l,)`, which
gives the same numbers.

Nudging sign. `nudge="fixed"` nudges with `+β` (and `−β` for the symmetric estimator)
every step. `nudge="random_sign"` draws the sign of β afresh each step,
`β_t = β · rademacher(fold_in(sign_key, t))` (t the member's step counter), which makes
the one-sided estimate unbiased on average (Scellier & Bengio; Laborieux et al. 2021). It
needs no estimator change (the one-sided and CHL estimates are finite differences valid
for either sign), and is refused for the other estimators, where it would change nothing
(symmetric) or mean nothing (BPTT).

Divergence. The core step refuses a non-finite update (`metrics["finite"]`). A sweep
member whose step is not finite is marked dead (`SweepState.alive`, `diverged_step`) and
frozen from then on; members never interact, so the others are unaffected.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ep_jax.estimators import KINDS, Estimator
from ep_jax.hyper import Hyper, check_values, default_float, make_hyper
from ep_jax.models import build_model
from ep_jax.train import TrainState, evaluate, init_state, train_step

NUDGE_SCHEDULES = ("fixed", "random_sign")
RANDOM_SIGN_KINDS = ("one_sided", "chl")

DtSampler = Callable[[jax.Array, Any, Mapping, Any], Sequence]


# --- member configs and groups ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MemberConfig:
    """One member of a sweep. Fields above `seed` are static (they decide the group)."""
    name: str = ""
    # static structure
    model: str = "ep"
    sizes: tuple = (784, 256, 10)
    activation: str = "hard_sigmoid"
    model_options: tuple = ()          # (key, value) pairs for build_model: loss, output_activation, basal_branches, ...
    estimator: str = "symmetric"
    t_free: int = 60
    t_nudge: int = 12
    batch_size: int = 64
    # numeric settings
    seed: int = 0
    beta: float = 0.1
    lr: Any = 0.05                     # float or one per synapse
    dt: Any = 1.0                      # float or one per layer (float or (n_l,) array)
    dt_dist: Any = None                # hidden-layer HTS distribution, for dt_sampler
    dt_out: Any = None                 # output-layer dt when dt_dist is given
    alpha: float = 0.2
    gamma: float = 1.0
    momentum: float = 0.9
    nudge: str = "fixed"

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        set_("sizes", tuple(int(n) for n in self.sizes))
        opts = self.model_options
        set_("model_options", tuple(sorted((dict(opts) if not isinstance(opts, dict) else opts).items())))
        if isinstance(self.lr, (list, tuple)):
            set_("lr", tuple(float(v) for v in self.lr))
        if isinstance(self.dt, list):
            set_("dt", tuple(self.dt))
        if self.dt_dist is not None and not isinstance(self.dt_dist, Mapping):
            raise ValueError(f"member {self.name!r}: dt_dist must be a mapping (a TOML table), got {self.dt_dist!r}")
        if self.dt_dist is not None and self.dt_out is None:
            raise ValueError(f"member {self.name!r}: dt_dist needs dt_out (the output layer's scalar dt)")
        if self.nudge not in NUDGE_SCHEDULES:
            raise ValueError(f"member {self.name!r}: nudge must be one of {list(NUDGE_SCHEDULES)}, got {self.nudge!r}")
        if self.nudge == "random_sign" and self.estimator not in RANDOM_SIGN_KINDS:
            raise ValueError(f"member {self.name!r}: nudge='random_sign' needs estimator one of "
                             f"{list(RANDOM_SIGN_KINDS)}, got {self.estimator!r}")
        if self.estimator not in KINDS:
            raise ValueError(f"member {self.name!r}: unknown estimator {self.estimator!r}; choose one of {list(KINDS)}")
        if int(self.batch_size) < 1:
            raise ValueError(f"member {self.name!r}: batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def from_dict(cls, d: Mapping) -> "MemberConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown member setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        """JSON-friendly dict (arrays become lists); `from_dict(to_dict())` round-trips."""
        d = dataclasses.asdict(self)
        d["model_options"] = dict(self.model_options)
        return _jsonable(d)

    def static_key(self) -> tuple:
        """What must agree for members to share one compiled step."""
        return (self.model, self.sizes, self.activation, self.model_options,
                self.estimator, int(self.t_free), int(self.t_nudge), int(self.batch_size))

    def build_model(self):
        try:
            return build_model(self.model, sizes=self.sizes, activation=self.activation,
                               **dict(self.model_options))
        except TypeError as e:
            raise ValueError(f"member {self.name!r}: bad model_options {dict(self.model_options)} "
                             f"for model {self.model!r}: {e}") from None

    def build_estimator(self) -> Estimator:
        return Estimator(kind=self.estimator, t_free=int(self.t_free), t_nudge=int(self.t_nudge))


def _jsonable(x):
    if isinstance(x, Mapping):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


class Group(NamedTuple):
    """Members sharing static structure: one model, one estimator, one batch size."""
    model: Any
    estimator: Estimator
    batch_size: int
    members: tuple          # MemberConfig, in sweep order
    indices: tuple          # their positions in the list given to group_members


def group_members(configs: Sequence[MemberConfig]) -> list[Group]:
    """Split `configs` by `static_key`, groups in order of first appearance."""
    if not configs:
        raise ValueError("configs must hold at least one member")
    names = [c.name for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"member names must be unique, repeated: {dup}")
    buckets: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        buckets.setdefault(c.static_key(), []).append(i)
    groups = []
    for idx in buckets.values():
        first = configs[idx[0]]
        groups.append(Group(first.build_model(), first.build_estimator(), int(first.batch_size),
                            tuple(configs[i] for i in idx), tuple(idx)))
    return groups


def _label(v) -> str:
    if isinstance(v, Mapping):
        return "-".join(_label(u) for u in v.values())
    if isinstance(v, (list, tuple)):
        return "-".join(_label(u) for u in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def expand_grid(base: Mapping | None = None, grid: Mapping | None = None,
                members: Sequence[Mapping] = (), prefix: str = "") -> list[MemberConfig]:
    """Member configs from shared settings `base`, the cartesian product of `grid`
    (`setting -> list of alternatives`, in the given key order) and explicit `members`
    (each merged over `base`). Grid members are named from their grid values, e.g.
    `lr=0.1-0.05_seed=3`; explicit members by their `name` or `member<i>`. With neither
    grid nor members the sweep is the single member `base`.
    """
    base, grid = dict(base or {}), dict(grid or {})
    for k, alts in grid.items():
        if not isinstance(alts, (list, tuple)) or not alts:
            raise ValueError(f"grid.{k} must be a non-empty list of alternatives, got {alts!r}")
    out = []
    if grid:
        for combo in itertools.product(*grid.values()):
            settings = dict(zip(grid, combo))
            name = "_".join(f"{k}={_label(v)}" for k, v in settings.items())
            name = prefix + re.sub(r"[^A-Za-z0-9._=+-]", "-", name)
            out.append(MemberConfig.from_dict({**base, **settings, "name": name}))
    for i, m in enumerate(members):
        out.append(MemberConfig.from_dict({**base, "name": f"{prefix}member{i}", **m}))
    if not out:
        out.append(MemberConfig.from_dict({"name": f"{prefix}member0", **base}))
    return out


# --- numeric settings -> Hyper --------------------------------------------------------------

def member_keys(seed: int):
    """`(init_key, dt_key, sign_key)` of a member (see module docstring)."""
    return tuple(jax.random.split(jax.random.PRNGKey(int(seed)), 3))


def hts_dt_sampler(key, model, dt_dist: Mapping, dt_out):
    """Default `dt_sampler`: heterogeneous hidden time steps from `ep_jax.timesteps`."""
    try:
        from ep_jax import timesteps
    except ImportError:
        raise RuntimeError("members with dt_dist need ep_jax.timesteps (the HTS dt samplers), which "
                           "is not in this tree; give dt explicitly or pass another dt_sampler") from None
    return timesteps.layer_dts(key, model, timesteps.DtSpec(**dict(dt_dist)), dt_out)


def member_hyper(cfg: MemberConfig, model, dt_sampler: DtSampler | None = hts_dt_sampler,
                 dtype=None) -> Hyper:
    """The member's `Hyper`; `dt` sampled with `dt_sampler(dt_key, ...)` when `cfg.dt_dist`."""
    dt = cfg.dt
    if cfg.dt_dist is not None:
        if dt_sampler is None:
            raise ValueError(f"member {cfg.name!r} asks for dt_dist but no dt_sampler was given")
        dt = tuple(dt_sampler(member_keys(cfg.seed)[1], model, cfg.dt_dist, cfg.dt_out))
    try:
        return make_hyper(model, beta=cfg.beta, lr=cfg.lr, dt=dt, alpha=cfg.alpha, gamma=cfg.gamma,
                          momentum=cfg.momentum, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"member {cfg.name!r}: {e}") from None


def stack(trees: Sequence):
    """Stack pytrees of equal structure along a new leading axis."""
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def take(tree, i: int):
    """Member `i` of a stacked pytree."""
    return jax.tree.map(lambda a: a[i], tree)


def stack_hypers(model, hypers: Sequence[Hyper]) -> Hyper:
    """Stack member `Hyper`s; a layer's dt is broadcast to `(n_l,)` where members differ."""
    dts = []
    for l, n in enumerate(model.state_sizes):
        layer = [h.dt[l] for h in hypers]
        if len({jnp.shape(d) for d in layer}) > 1:
            layer = [jnp.broadcast_to(d, (n,)) for d in layer]
        dts.append(layer)
    hypers = [h._replace(dt=tuple(d[i] for d in dts)) for i, h in enumerate(hypers)]
    return stack(hypers)


# --- stacked state and the vmapped step -------------------------------------------------------

class SweepHyper(NamedTuple):
    hyper: Hyper                # leaves with a leading member axis M
    random_sign: jax.Array      # (M,) bool: draw the sign of β each step


class SweepState(NamedTuple):
    train: TrainState           # leaves with a leading member axis M
    key: jax.Array              # (M, 2) uint32: sign keys
    alive: jax.Array            # (M,) bool: False once a step was not finite
    diverged_step: jax.Array    # (M,) int32: step counter at divergence, −1 while alive


def init_sweep(model, est: Estimator, keys, hypers, random_sign=None, sign_keys=None,
               dtype=None) -> tuple[SweepState, SweepHyper]:
    """Stacked initial state of M members.

    keys: M init keys (`(M, 2)` or a list); hypers: a list of M `Hyper` or one stacked
    `Hyper`; random_sign: M bools (default all False); sign_keys: M keys for the random
    nudging sign (default: derived from `keys`). Init is vmapped, so member `i` gets exactly
    `init_state(model, keys[i], hypers[i], est)`.
    """
    keys = jnp.asarray(jnp.stack(list(keys)) if isinstance(keys, (list, tuple)) else keys)
    M = keys.shape[0]
    if isinstance(hypers, Hyper):
        hyper = hypers
        hypers = [take(hyper, i) for i in range(M)]
    else:
        if len(hypers) != M:
            raise ValueError(f"hypers must hold one Hyper per key ({M}), got {len(hypers)}")
        hyper = stack_hypers(model, hypers)
    if jnp.shape(hyper.beta) != (M,):
        raise ValueError(f"hypers must be stacked along a member axis of {M} (one per key), "
                         f"got beta of shape {jnp.shape(hyper.beta)}")
    for i, h in enumerate(hypers):
        try:
            check_values(model, h, est.kind)
        except ValueError as e:
            raise ValueError(f"member {i}: {e}") from None
    random_sign = jnp.zeros((M,), bool) if random_sign is None else jnp.asarray(random_sign, bool)
    if random_sign.shape != (M,):
        raise ValueError(f"random_sign must hold {M} bools, got shape {random_sign.shape}")
    if bool(jnp.any(random_sign)) and est.kind not in RANDOM_SIGN_KINDS:
        raise ValueError(f"random_sign needs estimator one of {list(RANDOM_SIGN_KINDS)}, got {est.kind!r}")
    if sign_keys is None:
        sign_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    dtype = dtype or default_float()
    train = jax.vmap(lambda k, h: init_state(model, k, h, est, dtype))(keys, hyper)
    state = SweepState(train, jnp.asarray(sign_keys), jnp.ones((M,), bool), jnp.full((M,), -1, jnp.int32))
    return state, SweepHyper(hyper, random_sign)


def build_sweep(group: Group, dt_sampler: DtSampler | None = hts_dt_sampler, dtype=None):
    """`init_sweep` for a `Group`, keys and hypers from each member's config."""
    hypers = [member_hyper(c, group.model, dt_sampler, dtype) for c in group.members]
    keys = [member_keys(c.seed) for c in group.members]
    return init_sweep(group.model, group.estimator, [k[0] for k in keys], hypers,
                      random_sign=[c.nudge == "random_sign" for c in group.members],
                      sign_keys=[k[2] for k in keys], dtype=dtype)


def member_step(model, est: Estimator, state: SweepState, x, y, sh: SweepHyper,
                axis_name: str | None = None):
    """One training step of ONE member (`state`, `sh` without the member axis)."""
    hyper = sh.hyper
    sign = jax.random.rademacher(jax.random.fold_in(state.key, state.train.step), (), hyper.beta.dtype)
    hyper = hyper._replace(beta=jnp.where(sh.random_sign, sign, 1) * hyper.beta)
    train, metrics = train_step(model, est, state.train, x, y, hyper, axis_name=axis_name)
    ok = state.alive & metrics["finite"]
    train = jax.tree.map(lambda a, b: jnp.where(ok, a, b), train, state.train)
    diverged = jnp.where(state.alive & ~ok, state.train.step, state.diverged_step)
    metrics = dict(metrics, alive=ok, beta=hyper.beta)
    return SweepState(train, state.key, ok, diverged), metrics


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def sweep_step(model, est: Estimator, state: SweepState, x, y, sh: SweepHyper, chunk: int | None = None):
    """All members one step on a shared batch `x: (batch, n_0)`, or per-member batches
    `x: (M, batch, n_0)`. Returns `(state, metrics)`, every metric of shape `(M,)`.

    chunk: None vmaps over all M members at once; an int runs chunks of `chunk` vmapped
    members one after another (`lax.map`) inside the same compiled step: the same numbers
    with a peak memory of `chunk` members.
    """
    one = functools.partial(member_step, model, est)
    if chunk is None:
        data_axis = 0 if x.ndim == 3 else None
        return jax.vmap(one, in_axes=(0, data_axis, data_axis, 0))(state, x, y, sh)
    if x.ndim == 3:
        return jax.lax.map(lambda a: one(*a), (state, x, y, sh), batch_size=chunk)
    return jax.lax.map(lambda a: one(a[0], x, y, a[1]), (state, sh), batch_size=chunk)


@functools.partial(jax.jit, static_argnums=(0, 5))
def sweep_evaluate(model, state: SweepState, x, y, hyper, t_free: int):
    """`(n_correct, mean_loss)` per member, each `(M,)`; `hyper`: stacked Hyper or SweepHyper."""
    hyper = hyper.hyper if isinstance(hyper, SweepHyper) else hyper
    return jax.vmap(lambda tr, h: evaluate(model, tr.params, tr.buffers, x, y, h, t_free))(state.train, hyper)
