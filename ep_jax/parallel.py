"""Data parallelism: one global batch split over devices (`jax.shard_map`).

Each device relaxes and estimates EP (or BPTT) gradients on its shard of the batch; the
gradients and the loss are averaged over devices with `lax.pmean`, the correct counts
summed with `lax.psum`, and every device applies the same optimizer update to its
replicated copy of the state. Every estimator returns the gradient of the *batch mean* of
its shard, so with equal shards the device average is exactly the gradient of the global
batch mean: the result equals one device running the whole batch, up to float rounding.
The global batch must therefore divide evenly by the number of devices.

    step = data_parallel_step(model, est, opt)             # all devices
    state, info = step(key, state, x, y, rx)               # x: (global_batch, n_0)

    step = data_parallel_step(model, est, opt, sweep=True) # a vmapped sweep on each device
    sstate, info = step(None, sstate, x, y, stacked_rx)    # member keys live in the SweepState

Testing on a CPU: `XLA_FLAGS=--xla_force_host_platform_device_count=8` set before jax is
imported gives 8 host devices.

Several processes (`jax.distributed`, tested with two local CPU processes and gloo
collectives): call `initialize()` (a thin wrapper of `jax.distributed.initialize` that
selects gloo CPU collectives) on every process before any other JAX use. `jax.devices()`
then lists the devices of all processes, so every mesh here spans all of them. Each
process loads only its part of a global batch (`process_rows`) and assembles the global
array with `global_batch` (`jax.make_array_from_process_local_data`); the state is created
identically on every process from the same key (replicated). Host-side code (logging,
checkpoints) should run on `jax.process_index() == 0` only.

Sweeps over several devices and processes (`sweep_mesh`, `sharded_sweep_steps`): a 2-D
mesh `("members", "data")`; the member axis of a `SweepState` is split over "members"
(members never communicate) and every member's batch over "data" (gradients averaged
with `pmean`, as above). `sweep_layout` picks the split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ep_jax.estimators import Estimator
from ep_jax.sweep import member_step, sweep_steps
from ep_jax.train import predict, train_step

MEMBERS, DATA = "members", "data"


def make_mesh(devices=None, axis_name: str = "data") -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices must name at least one device")
    return Mesh(np.asarray(devices), (axis_name,))


def shard_batch(mesh: Mesh, *arrays, axis_name: str = "data"):
    """Place arrays with their leading (batch) axis split over `axis_name`."""
    sharding = NamedSharding(mesh, P(axis_name))
    return tuple(jax.device_put(a, sharding) for a in arrays)


def data_parallel_step(
    model, est: Estimator, opt, mesh: Mesh | None = None, *, devices=None, axis_name: str = "data", sweep: bool = False
):
    """A jitted `step(key, state, x, y, rx) -> (state, StepInfo)` over a batch-sharded mesh.

    mesh: a `Mesh` with an axis `axis_name` (other axes, if any, replicate); or `devices`
    for a 1-D mesh (default all devices). sweep: `state`/`rx` are a `SweepState` / a
    stacked `Relaxation` (leading member axis), every member sees the same global batch,
    and `key` is ignored (each member's step key is in the `SweepState`). Metrics are
    global: loss the global-batch mean, correct the global count.
    """
    if mesh is None:
        mesh = make_mesh(devices, axis_name)
    elif devices is not None:
        raise ValueError("give either mesh or devices, not both")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis_name!r} (axis_name); its axes are {mesh.axis_names}")
    n_shards = mesh.shape[axis_name]

    if sweep:
        one = functools.partial(member_step, model, est, opt, axis_name=axis_name)
        vm = jax.vmap(one, in_axes=(0, None, None, 0))
        body = lambda key, state, x, y, rx: vm(state, x, y, rx)
    else:
        body = functools.partial(train_step, model, est, opt, axis_name=axis_name)
    # check_vma=False: the relaxation's scan carry starts from zeros made inside the body
    # (device-invariant) and becomes shard-dependent, which the varying-axes checker
    # rejects; the outputs are replicated by construction (pmean/psum in train_step).
    step = jax.jit(
        jax.shard_map(
            body, mesh=mesh, in_specs=(P(), P(), P(axis_name), P(axis_name), P()), out_specs=(P(), P()), check_vma=False
        )
    )

    def checked(key, state, x, y, rx):
        if x.ndim != 2 or x.shape[0] % n_shards:
            raise ValueError(
                f"x must have shape (global_batch, n_0) with global_batch divisible by the "
                f"{n_shards} devices of axis {axis_name!r}, got {tuple(x.shape)}"
            )
        if key is None:
            if not sweep and est.nudge == "random_sign":
                raise ValueError("nudge='random_sign' draws the sign of beta from the key: pass a jax.random key")
            key = jax.random.PRNGKey(0)  # unused (a sweep's keys are in its state)
        return step(key, state, x, y, rx)

    return checked


# --- several processes --------------------------------------------------------------------


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None, **kwargs
):
    """`jax.distributed.initialize` with gloo collectives for CPU devices (so that a
    multi-process CPU run, e.g. a test on one machine, can run collectives at all).

    Call it on every process before any other JAX use. Arguments left out come from the
    environment (`JAX_COORDINATOR_ADDRESS`; SLURM, Open MPI, ... are detected by JAX);
    `kwargs` go to `jax.distributed.initialize` (`initialization_timeout`,
    `heartbeat_timeout_seconds`, `local_device_ids`, ...)."""
    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # an older or newer JAX without this option
        pass
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **kwargs
    )


def put(tree, mesh: Mesh, spec=P()):
    """Global arrays on `mesh` (split as `spec`, default replicated) from host values that
    every process holds in full (numpy or process-local jax arrays; each process places
    only the blocks of its own devices). Leaves already placed so are kept, other global
    arrays are resharded (every process must call this then)."""
    sharding = NamedSharding(mesh, spec)

    def one(a):
        if isinstance(a, jax.Array):
            if a.sharding == sharding:
                return a
            if not a.is_fully_addressable:
                return jax.device_put(a, sharding)
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def process_rows(mesh: Mesh, n: int, axis_name: str = DATA) -> slice:
    """The rows of a global batch of `n` that this process's devices hold when the batch
    is split over `axis_name` (a contiguous block: JAX orders devices by process)."""
    sharding = NamedSharding(mesh, P(axis_name))
    if n % mesh.shape[axis_name]:
        raise ValueError(
            f"a global batch of {n} does not divide over the {mesh.shape[axis_name]} devices of axis {axis_name!r}"
        )
    idx = sharding.addressable_devices_indices_map((n,)).values()
    lo = min(i[0].start or 0 for i in idx)
    hi = max(n if i[0].stop is None else i[0].stop for i in idx)
    return slice(lo, hi)


def global_batch(mesh: Mesh, *local, axis_name: str = DATA):
    """Global arrays, split over `axis_name`, from each process's own rows
    (`x_global[process_rows(mesh, n)]`): `jax.make_array_from_process_local_data`."""
    sharding = NamedSharding(mesh, P(axis_name))
    return tuple(jax.make_array_from_process_local_data(sharding, np.asarray(a)) for a in local)


# --- sweeps over several devices and processes ----------------------------------------------


def sweep_mesh(member_shards: int = 1, devices=None) -> Mesh:
    """A 2-D mesh `("members", "data")` over `devices` (default: every device of every
    process): `member_shards` groups of devices, each running its share of the members
    with their batches split over the group."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices or len(devices) % member_shards:
        raise ValueError(f"{len(devices)} device(s) do not split into {member_shards} member shards")
    return Mesh(np.asarray(devices).reshape(member_shards, len(devices) // member_shards), (MEMBERS, DATA))


def sweep_layout(n_devices: int, members: int, batches, member_shards: int | None = None) -> tuple[int, int]:
    """`(member_shards, data_shards)` with product `n_devices` for `members` members whose
    batch sizes are `batches` (every batch size must divide by the data shards, the number
    of members by the member shards). Default: as many member shards as fit (members
    never communicate), the rest on data. ValueError, naming what does not divide."""
    batches = sorted({int(b) for b in batches if b})
    if member_shards is not None:
        if member_shards < 1 or n_devices % member_shards:
            raise ValueError(f"member shards {member_shards} must divide the {n_devices} devices")
        if members % member_shards:
            raise ValueError(f"the {members} member(s) do not divide over {member_shards} member shards")
        d = n_devices // member_shards
        bad = [b for b in batches if b % d]
        if bad:
            raise ValueError(
                f"batch size(s) {bad} do not divide over {d} data shards ({n_devices} devices = "
                f"{member_shards} member shard(s) x {d} data shards)"
            )
        return member_shards, d
    for m in sorted((k for k in range(1, n_devices + 1) if n_devices % k == 0), reverse=True):
        d = n_devices // m
        if members % m == 0 and all(b % d == 0 for b in batches):
            return m, d
    raise ValueError(
        f"{members} member(s) with batch size(s) {batches} do not fit {n_devices} devices: the "
        f"devices split into member shards (dividing the members) times data shards (dividing "
        f"every batch)"
    )


@functools.lru_cache(maxsize=32)
def sharded_sweep_steps(model, est: Estimator, opt, mesh: Mesh, augment=None):
    """`ep_jax.sweep.sweep_steps` over a `sweep_mesh`: a jitted
    `f(state, x_all, y_all, idx, rx, max_state) -> (state, StepInfo)`.

    The members (leading axis of `state`, `rx`, and axis 1 of the per-member batch
    indices `idx: (T, M, B)`) are split over "members", every batch over "data"; the
    dataset `(x_all, y_all)` is replicated. M must divide by the member shards, B by the
    data shards. The returned state and info (fields `(T, M)`) are replicated on every
    device (what process 0 writes to disk); `put` places host inputs. With `augment`
    (`ep_jax.augment.CropFlip`) the function takes the members' augmentation keys
    `(M, 2)` last: an example's draw depends on (member, step, example index) only, so
    every layout augments as one device does."""
    if augment is None:

        def body(state, x_all, y_all, idx, rx, max_state):
            return sweep_steps(model, est, opt, state, x_all, y_all, idx, rx, max_state, axis_name=DATA)

        specs = (P(MEMBERS), P(), P(), P(None, MEMBERS, DATA), P(MEMBERS), P())
    else:

        def body(state, x_all, y_all, idx, rx, max_state, aug_keys):
            return sweep_steps(
                model,
                est,
                opt,
                state,
                x_all,
                y_all,
                idx,
                rx,
                max_state,
                axis_name=DATA,
                augment=augment,
                aug_keys=aug_keys,
            )

        specs = (P(MEMBERS), P(), P(), P(None, MEMBERS, DATA), P(MEMBERS), P(), P(MEMBERS))

    # check_vma=False: see data_parallel_step
    sm = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(P(MEMBERS), P(None, MEMBERS)), check_vma=False)
    return jax.jit(sm, out_shardings=NamedSharding(mesh, P()))


@functools.lru_cache(maxsize=32)
def sharded_sweep_evaluate(model, est: Estimator, mesh: Mesh):
    """A jitted `f(state, x, y, mask, rx) -> (correct, loss_sum)`, each `(M,)` and
    replicated: members over "members", the batch `(x, y, mask)` over "data"; rows with
    `mask` False (padding) do not count."""

    def body(state, x, y, mask, rx):
        def one(tr, r):
            out = model.output(model.prepare(tr.params, tr.buffers), predict(model, est, tr.params, tr.buffers, x, r))
            ok = (jnp.argmax(out, axis=-1) == y) & mask
            cost = model.cost(out, model.one_hot(y, out.dtype))
            return jnp.sum(ok), jnp.sum(jnp.where(mask, cost, 0))

        return jax.lax.psum(jax.vmap(one)(state.train, rx), DATA)

    sm = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(MEMBERS), P(DATA), P(DATA), P(DATA), P(MEMBERS)),
        out_specs=P(MEMBERS),
        check_vma=False,
    )
    return jax.jit(sm, out_shardings=NamedSharding(mesh, P()))
