"""Shared by the benchmark scripts: presets, machine description, timing, JSON output."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"

# SPEC §6, MNIST cell: 784-256-10, T1 = 60, T2 = 12, batch 64.
PRESETS = {
    "dep": dict(model="dendritic", sizes=(784, 256, 10), estimator="symmetric", t_free=60, t_nudge=12,
                batch_size=64, beta=0.1, lr=(0.4, 0.02)),
    "ep": dict(model="ep", sizes=(784, 256, 10), estimator="symmetric", t_free=60, t_nudge=12,
               batch_size=64, beta=0.1, lr=(0.4, 0.02)),
}


def machine() -> dict:
    d = jax.devices()[0]
    return {
        "platform": jax.default_backend(),
        "device_kind": d.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_1min": os.getloadavg()[0],
        "jax_version": jax.__version__,
        "python": platform.python_version(),
    }


def timeit(fn, steps: int, repeats: int = 3) -> float:
    """Seconds per call of `fn()` (which returns arrays): two warm-up calls (a step fed its
    own output may compile again for the output's placement), then the best of `repeats`
    runs of `steps` calls (the best, because other processes may share the machine)."""
    for _ in range(2):
        jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn()
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}_{payload['machine']['platform']}.json"
    path.write_text(json.dumps(payload, indent=1))
    return path
