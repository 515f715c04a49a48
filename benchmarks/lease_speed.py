"""Step (a) of the lease: speed A/B of the relaxation implementations, one process.

    python -m benchmarks.lease_speed --variants xla,pallas,unroll4 --rows OUT/speed.jsonl [--dry-run]

For every workload (`WORKLOADS`, in priority order), every variant: the experiment
engine's vmapped training step (`ep_jax.sweep.sweep_steps_jit`, what the tables train
with) on real data, one chunk of `CHUNK` steps compiled, then timed (median of repeats,
synchronised). One JSON row per (variant, workload) is appended to `--rows` as soon as it
is measured, so a kill loses only the row in progress.

Variants: `xla` (lax.scan, the default), `pallas` (`solver="pallas"`, the fused
kernel; `pallasN`: N rows per program, `EP_JAX_PALLAS_BLOCK_B`), `unrollK` / `unrollfull` (the XLA path with `lax.scan(..., unroll=K)`: a
benchmark-only substitution of `ep_jax.dynamics`' `lax` by a shim, this process only;
the library has no unroll option), and any variant run under `XLA_FLAGS` (the caller
sets the flags; the variant name says which, e.g. `cmdbuf`).

Each row also holds a checksum of the parameters after the timed chunks (the sum of
every leaf), so variants can be compared for computing the same thing (TF32 rounding
moves it in the 4th digit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

#: (name, preset, members): what the issue's targets are about, most important first
WORKLOADS = [
    ("mnist-dep-1", "mnist-dep", 1),
    ("mnist-dep-128", "mnist-dep", 128),
    ("hts-1", "mnist-hts-lognormal", 1),
    ("hts-25", "mnist-hts-lognormal", 25),
]
CHUNK = 20  # steps per timed call (a device-resident scan, as the engine runs)
MIN_TIME = 1.0  # seconds of timed calls per row
DRY = dict(subset=512, test_subset=256, t_free=4, t_nudge=2, chunk=2)
DRY_MEMBERS = {1: 1, 128: 4, 25: 2}
_INITIAL: dict = {}  # workload -> (initial state, data, batch indices, chunk)


def unroll_shim(k):
    """`jax.lax` with `scan` unrolled `k` times (`True`: fully)."""
    shim = types.SimpleNamespace(**{n: getattr(jax.lax, n) for n in dir(jax.lax) if not n.startswith("__")})
    shim.scan = lambda *a, **kw: jax.lax.scan(*a, **{**kw, "unroll": k})
    return shim


def measure(variant: str, work: tuple, dry: bool, data_dir: str | None) -> dict:
    from ep_jax import dynamics
    from ep_jax import sweep as S
    from ep_jax.experiments import build, engine
    from ep_jax.experiments.config import RunConfig, validate
    from ep_jax.experiments.presets import PRESETS

    name, preset, M = work
    values = dict(PRESETS[preset])
    if data_dir:
        values["data_dir"] = data_dir
    if dry:
        values.update(DRY)
        M = DRY_MEMBERS[M]
        from ep_jax.experiments.reproduce import available

        if not available(values["dataset"], data_dir):  # CI has Debian's Fashion-MNIST only
            values["dataset"] = "fashion_mnist"
    os.environ.pop("EP_JAX_PALLAS_BLOCK_B", None)
    if variant.startswith("pallas"):
        # on the CPU (the dry run) the kernel can only run emulated
        values["solver"] = "pallas:interpret" if dry and jax.default_backend() == "cpu" else "pallas"
        if variant[len("pallas") :]:  # pallasN: N rows per program
            os.environ["EP_JAX_PALLAS_BLOCK_B"] = variant[len("pallas") :]
    dynamics.lax = jax.lax
    if variant.startswith("unroll"):
        k = variant[len("unroll") :]
        dynamics.lax = unroll_shim(True if k == "full" else int(k))
    jax.clear_caches()  # the unroll shim acts at trace time: no compiled step may be reused
    cfg = validate(RunConfig.from_dict(values))
    members = [engine.Member(cfg.replace(seed=s), f"s{s}", Path(".")) for s in range(M)]
    (g,) = engine.group_members(members)
    if name not in _INITIAL:  # the members' init and data do not depend on the variant: once per workload
        xtr, ytr, _, _ = build.load_data(cfg)
        chunk = min(CHUNK, len(ytr) // cfg.batch_size) if not dry else 2
        idx = np.random.default_rng(0).integers(0, len(ytr), (chunk, M, cfg.batch_size)).astype(np.int32)
        _INITIAL.clear()
        _INITIAL[name] = (
            g.initial(),
            jnp.asarray(xtr, jnp.float32),
            jnp.asarray(ytr, jnp.int32),
            jnp.asarray(idx),
            chunk,
        )
    (state, rx), x, y, idx, chunk = _INITIAL[name]
    ms = jnp.asarray(cfg.max_state, jnp.float32)
    box = [state]

    def call():
        box[0], info = S.sweep_steps_jit(g.model, g.est, g.opt, box[0], x, y, idx, rx, ms)
        return info.loss.block_until_ready()

    t0 = time.perf_counter()
    call()
    compile_s = time.perf_counter() - t0
    times, t_end = [], time.perf_counter() + (0.0 if dry else MIN_TIME)
    while True:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() >= t_end or len(times) >= 200:
            break
    per_step = statistics.median(times) / chunk
    steps_per_epoch = -(-60000 // cfg.batch_size)
    checksum = float(sum(jnp.sum(a) for a in jax.tree.leaves(box[0].train.params)))
    return {
        "variant": variant,
        "workload": name,
        "preset": preset,
        "members": M,
        "chunk": chunk,
        "compile_s": round(compile_s, 3),
        "ms_per_step": 1e3 * per_step,
        "s_per_epoch": per_step * steps_per_epoch,
        "model_epochs_per_s": M / (per_step * steps_per_epoch),
        "repeats": len(times),
        "spread": (max(times) - min(times)) / statistics.median(times),
        "params_checksum": checksum,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "dry_run": dry,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.lease_speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--variants", required=True, help="comma-separated variants")
    p.add_argument("--workloads", default=",".join(w[0] for w in WORKLOADS))
    p.add_argument("--rows", required=True, help="JSON-lines file the rows are appended to")
    p.add_argument("--data-dir")
    p.add_argument("--deadline", type=float, help="unix time: start no row after it")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    works = {w[0]: w for w in WORKLOADS}
    # workload-major: every variant of the most important workload first
    for wname in a.workloads.split(","):
        for variant in a.variants.split(","):
            if a.deadline and time.time() > a.deadline:
                print(f"speed: budget spent, {variant}/{wname} not run", flush=True)
                return 0
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    row = measure(variant, works[wname], a.dry_run, a.data_dir)
                fell_back = [str(w.message) for w in caught if "ep_jax.kernels" in str(w.message)]
                if fell_back:  # the kernel did not lower: the row timed the XLA path
                    row["fallback"] = fell_back[0][:300]
            except Exception as e:  # noqa: BLE001 - a variant that fails is a result, not a stop
                row = {"variant": variant, "workload": wname, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            with open(a.rows, "a") as f:
                f.write(json.dumps(row) + "\n")
            shown = (
                f"{row['ms_per_step']:.3f} ms/step, {row['s_per_epoch']:.3f} s/epoch, "
                f"{row['model_epochs_per_s']:.2f} model-epochs/s (compile {row['compile_s']:.1f} s)"
                + (" [FELL BACK TO XLA]" if "fallback" in row else "")
                if "error" not in row
                else row["error"]
            )
            print(f"speed {variant:10s} {wname:14s} {shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
