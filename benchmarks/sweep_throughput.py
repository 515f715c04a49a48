"""Throughput of a vmapped sweep against the same members run one after another.

    python benchmarks/sweep_throughput.py [--members 1,4,16,64] [--steps 2] [--repeats 2] [--presets dep,ep]

For each preset (SPEC §6 MNIST cell, 784-256-10, T1 = 60, T2 = 12, batch 64; `dep` the
dendritic model, `ep` the standard one) and each member count M: M members with different
seeds, on MNIST-shaped random data. "vmapped" times `sweep_step` on all M at once;
"sequential" times `train_step_jit` of each member in turn (one compiled function, M
calls per round, each waited for with `block_until_ready`, so they do not overlap). Both
after a warm-up call; the best of `--repeats` timed runs (the CPU may be shared). Throughput
is member·examples per second. Prints a table, writes
`benchmarks/results/sweep_throughput_<platform>.json`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import PRESETS, machine, timeit, write  # noqa: E402
import ep_jax  # noqa: E402
from ep_jax import sweep as S  # noqa: E402


def bench(preset: str, M: int, steps: int, repeats: int) -> dict:
    cfgs = [S.MemberConfig(name=f"s{i}", seed=i, **PRESETS[preset]) for i in range(M)]
    (group,) = S.group_members(cfgs)
    model, est, B = group.model, group.estimator, group.batch_size
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.uniform(kx, (B, model.sizes[0]))
    y = jax.random.randint(ky, (B,), 0, model.sizes[-1])

    state, sh = S.build_sweep(group)
    box = [state]

    def vmapped():
        box[0], m = S.sweep_step(model, est, box[0], x, y, sh)
        return m["loss"]

    t_vmap = timeit(vmapped, steps, repeats)

    singles = [S.take(state, i).train for i in range(M)]
    hypers = [S.take(sh.hyper, i) for i in range(M)]

    def sequential():
        out = []
        for i in range(M):
            singles[i], m = ep_jax.train_step_jit(model, est, singles[i], x, y, hypers[i])
            out.append(m["loss"].block_until_ready())
        return out

    t_seq = timeit(sequential, steps, repeats)
    return {"preset": preset, "members": M, "batch": B, "steps": steps,
            "vmapped_s_per_step": t_vmap, "sequential_s_per_round": t_seq,
            "vmapped_throughput": M * B / t_vmap, "sequential_throughput": M * B / t_seq,
            "speedup": t_seq / t_vmap}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", default="1,4,16", help="comma-separated member counts (the full table: 1,4,16,64)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps (rounds) per timed run")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs; the best counts")
    ap.add_argument("--presets", default="dep,ep", help=f"comma-separated, of {sorted(PRESETS)}")
    args = ap.parse_args(argv)
    rows = []
    print(f"{'preset':<6} {'M':>4} {'vmapped ex/s':>14} {'sequential ex/s':>16} {'speedup':>8}")
    for p in args.presets.split(","):
        for M in (int(m) for m in args.members.split(",")):
            r = bench(p, M, args.steps, args.repeats)
            rows.append(r)
            print(f"{p:<6} {M:>4} {r['vmapped_throughput']:>14.0f} {r['sequential_throughput']:>16.0f} "
                  f"{r['speedup']:>8.2f}", flush=True)
    path = write("sweep_throughput", {"machine": machine(), "args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
