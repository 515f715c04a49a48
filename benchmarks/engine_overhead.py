"""What the experiment engine costs on top of its compiled steps, per chunk.

    python -m benchmarks.engine_overhead [--members 16] [--subset 4096] [--repeats 3]

Trains one epoch of the Fashion-MNIST DEP preset (`fmnist-dep-1h`: 784-256-10, T1 = 60,
T2 = 12, batch 64) on `--subset` examples for `--members` vmapped members in chunks of
`--chunk` steps, twice: (a) the bare chunk loop — `ep_jax.sweep.sweep_steps_jit` over the
epoch's chunks, one host read at the end; (b) `engine.run` into a fresh run folder (init,
chunks, hooks, the per-epoch evaluation, checkpoints, metrics, summary, figures). Both
after a warm-up epoch that compiles, best of `--repeats`. The engine's extra time is
`(b) − init − (a) − evaluation` (init and evaluation timed alone), shown in total and per
chunk: it holds the per-chunk costs and the per-epoch writes. Prints a table,
writes `benchmarks/results/engine_overhead_<platform>.json`.

The same script runs against an older checkout (it uses only `engine.run`, `engine.Group`,
`engine.epoch_batches`, `engine.load_data`), which is how the before/after numbers in
benchmarks/README.md were taken.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.engine_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--members", type=int, default=16)
    p.add_argument("--subset", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=8, help="steps per chunk (small: many chunks, the overhead shows)")
    p.add_argument("--no-save", action="store_true", help="print only, write no JSON")
    a = p.parse_args(argv)
    from ep_jax import sweep as S
    from ep_jax.models.base import default_float
    from experiments import engine
    from experiments.config import RunConfig, validate
    from experiments.presets import PRESETS

    cfgs = [
        validate(
            RunConfig.from_dict(
                {
                    **PRESETS["fmnist-dep-1h"],
                    "epochs": 1,
                    "subset": a.subset,
                    "test_subset": 2000,
                    "chunk": a.chunk,
                    "seed": s,
                }
            )
        )
        for s in range(a.members)
    ]
    tmp = Path(tempfile.mkdtemp())
    members = lambda tag: [engine.Member(c, f"s{c.seed}", tmp / tag / f"s{c.seed}") for c in cfgs]
    g = engine.Group(members("bare"))
    xtr, ytr, xte, yte = engine.load_data(cfgs[0])
    x, y = jnp.asarray(xtr, default_float()), jnp.asarray(ytr, jnp.int32)
    xt, yt = jnp.asarray(xte, default_float()), jnp.asarray(yte, jnp.int32)
    n, chunk = len(ytr), cfgs[0].chunk
    orders = [engine.epoch_batches(c, 1, n) for c in cfgs]
    full = np.stack([o[0] for o in orders], axis=1)
    rest = np.stack([o[1] for o in orders], axis=0)
    chunks = [full[c0 : c0 + chunk] for c0 in range(0, len(full), chunk)] + ([rest[None]] if rest.shape[1] else [])
    ms = jnp.asarray(cfgs[0].max_state, default_float())

    init = g.initial()

    def bare():
        state, rx = jax.tree.map(jnp.copy, init)
        infos = []
        for idx in chunks:
            state, info = S.sweep_steps_jit(g.model, g.est, g.opt, state, x, y, jnp.asarray(idx), rx, ms)
            infos.append(info)
        jax.block_until_ready(state)
        return [np.asarray(i.correct) for i in infos]

    def evaluation():
        state, rx = init
        e = cfgs[0].eval_batch
        for i in range(0, len(yt), e):
            ev = S.sweep_evaluate(g.model, g.est, state, xt[i : i + e], yt[i : i + e], rx)
            np.asarray(ev.correct)

    def through_engine(k):
        tag = f"engine{k}"
        engine.run(members(tag), "new", progress=False, print_fn=lambda *a: None)
        shutil.rmtree(tmp / tag)

    def best(fn, *args):
        out = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            fn(*args)
            out.append(time.perf_counter() - t)
        return min(out)

    bare(), evaluation(), through_engine("warm")  # compile everything once
    t_bare, t_eval, t_init = best(bare), best(evaluation), best(g.initial)
    t_engine = best(through_engine, "timed")
    extra = t_engine - t_init - t_bare - t_eval
    per_chunk = extra / len(chunks)
    res = {
        "members": a.members,
        "subset": a.subset,
        "chunks": len(chunks),
        "bare_s": t_bare,
        "eval_s": t_eval,
        "init_s": t_init,
        "engine_s": t_engine,
        "extra_s": extra,
        "extra_per_chunk_ms": 1e3 * per_chunk,
        "machine": f"{platform.node()} {jax.default_backend()} {jax.device_count()} device(s)",
        "jax": jax.__version__,
    }
    print(
        "| members | chunks | init (s) | bare chunk loop (s) | evaluation (s) | engine.run (s) | engine extra (s) "
        "| per chunk (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {a.members} | {len(chunks)} | {t_init:.2f} | {t_bare:.2f} | {t_eval:.2f} | {t_engine:.2f} | {extra:.2f} "
        f"| {1e3 * per_chunk:.1f} |"
    )
    if not a.no_save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"engine_overhead_{jax.default_backend()}.json").write_text(json.dumps(res, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
