"""Data-parallel scaling with the device count (ep_jax.parallel).

    python -m benchmarks.data_parallel [--devices 1,2,4,8] [--batch 256] [--steps 3] [--presets mnist-dep,mnist-ep]

For each device count N a subprocess is started with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (on a CPU; on a GPU machine N real
devices must exist, and N above the device count is skipped). It times
`data_parallel_step` on a global batch of `--batch` MNIST-shaped random examples (each
device relaxes `batch / N`), for the MNIST presets (784-256-10, T1 = 60, T2 = 12),
after a warm-up step, best of `--repeats` runs. Prints examples/s and the speed-up over
N = 1, writes `benchmarks/results/data_parallel_<platform>.json`.

Host "devices" made by the XLA flag share the same CPU cores, so on a CPU this measures
the cost of splitting, not a gain: expect at best the gain of using idle cores, and
collective overhead beyond the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import jax
import ep_jax
from benchmarks.run import machine, timed
from ep_jax import parallel
from ep_jax.experiments import engine
from ep_jax.experiments.presets import preset_config
n, batch, steps, repeats, preset = {n}, {batch}, {steps}, {repeats}, {preset!r}
if jax.device_count() < n:
    print(json.dumps({{"skipped": f"only {{jax.device_count()}} devices"}})); sys.exit()
cfg = preset_config(preset)
model, est = engine.build_model(cfg), engine.build_estimator(cfg)
opt = engine.build_optimizer(cfg, model)
rx = engine.build_relaxation(cfg, model)
key = jax.random.PRNGKey(0)
state = ep_jax.init_state(model, est, opt, key, **engine.model_settings(cfg))
kx, ky = jax.random.split(jax.random.PRNGKey(1))
mesh = parallel.make_mesh(jax.devices()[:n])
x, y = parallel.shard_batch(mesh, jax.random.uniform(kx, (batch, model.sizes[0])),
                            jax.random.randint(ky, (batch,), 0, model.sizes[-1]))
step = parallel.data_parallel_step(model, est, opt, mesh)
box = [state]
def run():
    box[0], info = step(key, box[0], x, y, rx)
    return info.loss
t = timed(run, 0.5, max_calls=steps)
print(json.dumps({{"devices": n, "preset": preset, "batch": batch, "s_per_step": t,
                  "examples_per_s": batch / t, "machine": machine()}}))
"""


def run_child(n, batch, steps, repeats, preset, host_devices=True):
    env = dict(os.environ)
    if host_devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    code = CHILD.format(root=str(ROOT), n=n, batch=batch, steps=steps, repeats=repeats, preset=preset)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"child with {n} devices failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    ap.add_argument("--batch", type=int, default=256, help="global batch (divisible by every count)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per timed run")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs; the best counts")
    ap.add_argument("--presets", default="mnist-dep,mnist-ep", help="comma-separated presets")
    ap.add_argument("--gpu", action="store_true", help="use the real devices (no host-device flag)")
    args = ap.parse_args(argv)
    rows, mach = [], None
    print(f"{'preset':<10} {'devices':>7} {'examples/s':>11} {'speed-up':>9}")
    for p in args.presets.split(","):
        base = None
        for n in (int(d) for d in args.devices.split(",")):
            if args.batch % n:
                raise SystemExit(f"--batch {args.batch} is not divisible by {n} devices")
            r = run_child(n, args.batch, args.steps, args.repeats, p, host_devices=not args.gpu)
            if "skipped" in r:
                print(f"{p:<10} {n:>7} skipped: {r['skipped']}")
                continue
            mach = r.pop("machine")
            base = base or r["examples_per_s"]
            r["speedup"] = r["examples_per_s"] / base
            rows.append(r)
            print(f"{p:<10} {n:>7} {r['examples_per_s']:>11.0f} {r['speedup']:>9.2f}", flush=True)
    if mach is None:
        raise SystemExit("nothing was measured")
    mach.pop("device_count", None)
    path = RESULTS / f"data_parallel_{mach['platform']}.json"
    path.write_text(json.dumps({"machine": mach, "args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
