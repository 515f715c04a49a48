"""FLOP and byte floors of one training step per preset, and the predicted H200 times.

    python -m benchmarks.floors            # the markdown table of benchmarks/README.md

Counted from the architecture, for the EP estimators' step as the library runs it
(`ep_jax.train_step`): masked kernels, input drive, free phase (T1 steps, B rows), nudged
phases (symmetric: ±β stacked, T2 steps on 2B rows; chl / one-sided: T2 steps on B rows),
the gradient at the contrasted states, the SGD-momentum update.

FLOPs (multiply-adds count 2):
- input drive `x W_1` (dendritic: the K_b-branch basal map of x): 2·B·n_0·K_b·n_1, once;
- per relaxation row-step, every synapse l ≥ 2 forward (2·n_{l−1}·K_b·n_l) and every
  hidden layer's feedback (EP: 2·n_{l+1}·n_l; dendritic apical: 2·n_{l+1}·K_a·n_l);
- gradient: the first synapse once on B rows (x is the same at every contrasted state,
  so the coefficients combine before the matmul; dendritic: the branch mask of the input
  drive is reused), every other synapse on all contrasted rows (dendritic: forward for the
  branch masks plus the weight gradient, 2×);
- optimiser: 4 per parameter (negligible).

Bytes (the floor: every input read once, every output written once; intermediates such as
the gradient fused away): parameters and momentum read and written (16 B per float32
parameter), the masks read (dendritic, float32: 4 B per masked weight), the batch read
(B·n_0·4). The states stay on chip in the floor.

Predictions (`predict`), written before any GPU measurement of these variants:

    t = max(FLOP floor / PEAK_FLOPS, (bytes + re-read bytes) / bandwidth)
        + (T1 + T2) · (O_v + L · C_v) + REST_US

- bytes: the XLA path's, not the floor: the masked kernels are written and read twice
  more (input drive, gradient), the gradient written and read (`practical_bytes`);
- re-read bytes: the recurrent weights (every synapse but the first) are read again in
  every relaxation step by every variant (they do not fit on chip across steps for a
  sweep): from L2 (L2_BW) while all members' recurrent weights fit in L2_BYTES, else HBM;
- O_v: per-iteration overhead of the loop (XLA's while loop reads its predicate back to
  the host every iteration: ~3 µs; unroll k divides it by k; command buffers keep the
  loop on the device; the fused kernel has no loop launches), C_v: per layer and step
  (XLA: ~2 kernels of ~1.5 µs; command buffers: graph-replayed launches, ~0.75 µs each;
  the fused kernel: a tile's dots on chip and the weights from L2, ~0.7 µs);
- calibrated on the one H200 measurement: MNIST DEP, one model, XLA scan, 0.73 ms per
  step (72 steps × (3 + 2 · 3) µs + 60 µs = 0.71 ms).
"""

from __future__ import annotations

import sys

from ep_jax.experiments.presets import preset_config

PEAK_FLOPS = 400e12  # TF32 tensor cores, dense: 494 TFLOP/s datasheet (H200 SXM), ~80 % reachable
PEAK_BW = 4.0e12  # HBM3e: 4.8 TB/s datasheet, ~4.0 TB/s in a large device copy
L2_BW, L2_BYTES = 10e12, 40e6  # H200 L2: 50 MB (assumed usable 40 MB), ~10 TB/s (assumed)
EPOCH = 60000
#: (O_v, C_v) in µs: per-iteration loop overhead, per layer and relaxation step
ITER_US = {
    "xla": (3.0, 3.0),
    "unroll2": (1.5, 3.0),
    "unroll4": (0.75, 3.0),
    "unroll8": (0.4, 3.0),
    "unrollfull": (0.0, 3.0),
    "cmdbuf": (0.5, 1.5),
    "pallas": (0.0, 0.7),
}
REST_US = 60.0  # input drive, gradient, optimiser, checks: ~15 kernels of a few µs
LAUNCH_US = 5.0  # the fused kernel: one launch per phase (two per step)
PRESETS = ["mnist-ep", "mnist-dep", "fmnist-ep", "fmnist-dep", "mnist-hts-lognormal"]


def counts(name: str) -> dict:
    """FLOPs, bytes, sequential steps and parameters of one training step of one model."""
    cfg = preset_config(name)
    n, B = list(cfg.sizes), cfg.batch_size
    L = len(n) - 1
    dend = cfg.model == "dendritic"
    kb, ka = (cfg.basal_branches, cfg.apical_branches) if dend else (1, 1)
    two = cfg.estimator == "symmetric"
    rows = B * cfg.t_free + (2 * B if two else B) * cfg.t_nudge
    contrasted = 2 * B if two else B  # rows at which the gradient is taken (beside x)
    per_row = sum(2 * n[l - 1] * kb * n[l] for l in range(2, L + 1))
    per_row += sum(2 * n[l + 1] * (ka if dend else 1) * n[l] for l in range(1, L))
    inp = 2 * B * n[0] * kb * n[1]
    grad = inp + sum((2 if dend else 1) * 2 * contrasted * n[l - 1] * kb * n[l] for l in range(2, L + 1))
    if dend:
        grad += sum(2 * 2 * contrasted * n[l + 1] * ka * n[l] for l in range(1, L))
    weights = sum(n[l - 1] * kb * n[l] for l in range(1, L + 1)) + (
        sum(n[l + 1] * ka * n[l] for l in range(1, L)) if dend else 0
    )
    params = weights + sum(kb * n[l] for l in range(1, L + 1))
    flops = inp + rows * per_row + grad + 4 * params
    byts = 16 * params + (4 * weights if dend else 0) + 4 * B * n[0]
    practical = byts + 8 * params + (8 * weights if dend else 0)
    recurrent = 4 * (weights - n[0] * kb * n[1])
    return {
        "preset": name,
        "B": B,
        "L": L,
        "params": params,
        "flops": flops,
        "bytes": byts,
        "practical_bytes": practical,
        "recurrent_bytes": recurrent,
        "seq_steps": cfg.t_free + cfg.t_nudge,
        "steps_per_epoch": -(-EPOCH // B),
    }


def predict(c: dict, variant: str, members: int = 1) -> float:
    """Predicted seconds per training step of `members` vmapped models (module docstring)."""
    M = members
    reread = c["seq_steps"] * M * c["recurrent_bytes"]
    t_bytes = M * c["practical_bytes"] / PEAK_BW + reread / (L2_BW if M * c["recurrent_bytes"] <= L2_BYTES else PEAK_BW)
    o, per_layer = ITER_US[variant]
    latency = c["seq_steps"] * (o + c["L"] * per_layer) + REST_US + (2 * LAUNCH_US if variant == "pallas" else 0)
    return max(M * c["flops"] / PEAK_FLOPS, t_bytes) + 1e-6 * latency


def targets() -> str:
    """The issue's targets against the predictions."""
    dep, hts = counts("mnist-dep"), counts("mnist-hts-lognormal")
    rows = [
        ("MNIST DEP, one model", "≤ 0.1 s/epoch", lambda v: f"{predict(dep, v) * dep['steps_per_epoch']:.2f} s"),
        (
            "MNIST DEP, 128 members",
            "≥ 80 model-epochs/s",
            lambda v: f"{128 / (predict(dep, v, 128) * dep['steps_per_epoch']):.0f}",
        ),
        ("HTS network, one model", "≤ 0.1 s/epoch", lambda v: f"{predict(hts, v) * hts['steps_per_epoch']:.2f} s"),
    ]
    lines = ["| target | goal | " + " | ".join(ITER_US) + " |", "|---|---|" + "---|" * len(ITER_US)]
    lines += [f"| {n} | {g} | " + " | ".join(f(v) for v in ITER_US) + " |" for n, g, f in rows]
    return "\n".join(lines)


def table() -> str:
    lines = [
        "| preset | members | GFLOP/step | MB/step | FLOP floor (µs) | byte floor (µs) | "
        + " | ".join(f"{v} (ms)" for v in ITER_US)
        + " | measured (ms) |",
        "|---|---|---|---|---|---|" + "---|" * len(ITER_US) + "---|",
    ]
    for name in PRESETS:
        c = counts(name)
        for M in (1, 128):
            lines.append(
                f"| {name} | {M} | {M * c['flops'] / 1e9:.2f} | {M * c['bytes'] / 1e6:.1f} | "
                f"{1e6 * M * c['flops'] / PEAK_FLOPS:.1f} | {1e6 * M * c['bytes'] / PEAK_BW:.1f} | "
                + " | ".join(f"{1e3 * predict(c, v, M):.2f}" for v in ITER_US)
                + " | |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
    print()
    print(targets())
    sys.exit(0)
