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

Several hosts (not tested here): call `jax.distributed.initialize()` first on every
process (arguments or the cluster's environment give the coordinator address, the number
of processes and this process's id). `jax.devices()` then lists the devices of all hosts,
so `data_parallel_step(model, est)` builds a mesh over all of them. Each process loads
only its own part of the global batch and assembles the global array with
`jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local_x)`; the
state is created identically on every process from the same key (replicated). Host-side
code (logging, checkpoints) should run on `jax.process_index() == 0` only.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ep_jax.estimators import Estimator
from ep_jax.sweep import member_step
from ep_jax.train import train_step


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


def data_parallel_step(model, est: Estimator, opt, mesh: Mesh | None = None, *, devices=None,
                       axis_name: str = "data", sweep: bool = False):
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
    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(axis_name), P(axis_name), P()),
                                 out_specs=(P(), P()), check_vma=False))

    def checked(key, state, x, y, rx):
        if x.ndim != 2 or x.shape[0] % n_shards:
            raise ValueError(f"x must have shape (global_batch, n_0) with global_batch divisible by the "
                             f"{n_shards} devices of axis {axis_name!r}, got {tuple(x.shape)}")
        if key is None:
            if not sweep and est.nudge == "random_sign":
                raise ValueError("nudge='random_sign' draws the sign of beta from the key: pass a jax.random key")
            key = jax.random.PRNGKey(0)  # unused (a sweep's keys are in its state)
        return step(key, state, x, y, rx)

    return checked
