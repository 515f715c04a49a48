"""All speed and memory numbers in one command.

    python -m benchmarks.run            # every preset, sweeps of 1, 8, 32, 128 members (GPU-sized)
    python -m benchmarks.run --quick    # the CPU-sized subset (under 8 minutes on 2 cores)

For every preset architecture, in ONE process on ONE device:

- library: `ep_jax.train_steps` — loop invariants hoisted, ±β phases as one batched
  scan, the dataset resident on the device, a `lax.scan` over a chunk of steps;
- straightforward: `ep_jax.reference.Unhoisted` (masked kernels and input drive
  recomputed every relaxation step), ±β phases as two scans, one jitted call per batch
  fed from host memory;
- naive: a deliberately plain JAX step written in this file (the model's maths as one
  would first type it: masks multiplied in every step, `reshape(...).mean` branch
  averages, two nudged scans, `jax.grad` of the primitive), jitted with `lax.scan`.
  Symmetric-EP presets only.

Conv presets (`fmnist-conv-small`; with the full set also `cifar10-conv-ep`) get the library
and the straightforward rows (`Unhoisted`: the first conv and its pooling recomputed in every
relaxation step), their FLOPs counted by `conv_step_flops`, the dominant column a single
`relu(conv(x, w))` of the costliest layer.

Per path: ms per step, seconds per 60 000-example epoch (training steps only), the
achieved FLOP/s (the step's matmul FLOPs counted from the architecture, `step_flops`,
÷ time) against a matmul
roofline measured in the same run (a large square matmul, and `relu(x @ w)` of the
preset's dominant shape), and the compiled step's memory (`memory_analysis`: arguments,
outputs and temporaries; the device's peak bytes where it reports them).

Sweep throughput: model-epochs per second of M vmapped members (the experiment engine's
`sweep_steps`, per-member data order) for M in `--members`.

Writes `benchmarks/results/<device>.json` and `<device>.md` (table, machine, command).
`benchmarks/README.md` explains how to read them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ep_jax
from ep_jax import sweep as S
from ep_jax.experiments import engine
from ep_jax.experiments.config import CONV_MODELS
from ep_jax.experiments.presets import preset_config
from ep_jax.reference import Unhoisted

RESULTS = Path(__file__).resolve().parent / "results"
EPOCH = 60000

# one preset per distinct architecture (kmnist-* share fmnist-*'s shapes; fmnist-dep-1h mnist-dep's)
PRESETS_FULL = [
    "mnist-ep",
    "mnist-dep",
    "mnist-dbptt",
    "fmnist-ep",
    "fmnist-dep",
    "fmnist-dbptt",
    "mnist-hts-lognormal",
]
PRESETS_QUICK = ["mnist-ep", "mnist-dep", "fmnist-dep"]
# conv rows: the small Fashion-MNIST net everywhere, Laborieux et al.'s CIFAR-10 net where not --quick
CONV_FULL = ["fmnist-conv-small", "cifar10-conv-ep"]
CONV_QUICK = ["fmnist-conv-small"]
SWEEP_PRESETS = ["mnist-dep", "fmnist-dep"]


# --- machine ----------------------------------------------------------------------------


def device_name() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu-{os.cpu_count()}core"
    return d.device_kind.lower().replace(" ", "-")


def machine() -> dict:
    d = jax.devices()[0]
    return {
        "platform": d.platform,
        "device_kind": d.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_1min": os.getloadavg()[0],
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def sync(tree):
    for a in jax.tree.leaves(tree):
        if hasattr(a, "block_until_ready"):
            a.block_until_ready()
    return tree


def timed(fn, min_time: float, max_calls: int = 1000) -> float:
    """Seconds per call of `fn()` (called once to warm up): calls in a row until
    `min_time` has passed, best of two such runs."""
    sync(fn())
    best = float("inf")
    for _ in range(2):
        t0, k = time.perf_counter(), 0
        while True:
            out = fn()
            k += 1
            if k >= max_calls or time.perf_counter() - t0 >= min_time:
                break
        sync(out)
        best = min(best, (time.perf_counter() - t0) / k)
    return best


def compiled_stats(jitted, *args) -> dict:
    """XLA's FLOP estimate (it counts a loop body once, so it undercounts the relaxation:
    kept for reference as `xla_flops`) and memory analysis of `jitted(*args)`."""
    out = {"xla_flops": None, "memory_bytes": None}
    try:
        c = jitted.lower(*args).compile()
    except Exception:
        return out
    try:
        ca = c.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        out["xla_flops"] = float(ca.get("flops", 0.0)) or None
    except Exception:
        pass
    try:
        m = c.memory_analysis()
        out["memory_bytes"] = int(
            m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        )
    except Exception:
        pass
    return out


def synapse_flops(cfg) -> list[float]:
    """Conv models: the forward FLOPs per example of each synapse — a conv layer
    2·H'·W'·k²·C_in·C_out (H'×W' its map before pooling), an fc layer (the readout
    included) 2·n_in·n_out. Pooling is not counted (no multiply-adds)."""
    out = [2.0 * c["h_conv"] * c["w_conv"] * c["kernel"] ** 2 * c["c_in"] * c["channels"] for c in cfg.conv_layers()]
    last = cfg.conv_layers()[-1]
    widths = [last["h_out"] * last["w_out"] * last["channels"]] + list(cfg.fc)
    return out + [2.0 * widths[i] * widths[i + 1] for i in range(len(cfg.fc))]


def conv_step_flops(cfg) -> float:
    """`step_flops` of a conv model, counted the same way: the first synapse's forward
    (hoisted) and weight gradient once; per relaxation step every other synapse's forward
    and its transposed path into the layer below (the drive by `jax.grad` of Φ: same
    FLOPs as the forward), the ±β phases on a doubled batch; at each contrasted state the
    forward and weight gradient of every other synapse (dendritic: every map K_b times,
    apical maps K_a times more)."""
    f = synapse_flops(cfg)
    kb = cfg.basal_branches if cfg.model == "dendritic_conv" else 1
    ka = cfg.apical_branches if cfg.model == "dendritic_conv" else 0
    inp = cfg.batch_size * f[0] * kb
    rec = cfg.batch_size * sum(f[1:]) * (2 * kb + 2 * ka)
    steps = {
        "symmetric": cfg.t_free + 2 * cfg.t_nudge + 4,
        "one_sided": cfg.t_free + cfg.t_nudge + 4,
        "chl": cfg.t_free + cfg.t_nudge + 4,
    }.get(cfg.estimator, cfg.t_free + 2 * cfg.t_nudge)
    return 2 * inp + steps * rec


def step_flops(cfg) -> float:
    """The matmul FLOPs (2·m·n·k) the step's algorithm needs at least, counted from the
    architecture: the input map forward once and its weight gradient once (the phases'
    cotangents summed); every recurrent map (feedforward l >= 2, feedback / apical) once
    per relaxation step, the ±β phases on a doubled batch; for the EP estimators the
    recurrent maps' forward and weight gradient at each contrasted state (two phases);
    for truncated BPTT the backward pass through the last T2 steps (twice the forward).
    Conv models: `conv_step_flops`."""
    if cfg.model in CONV_MODELS:
        return conv_step_flops(cfg)
    n, B, L = cfg.sizes, cfg.batch_size, len(cfg.sizes) - 1
    dend = cfg.model == "dendritic"
    kb, ka = (cfg.basal_branches, cfg.apical_branches) if dend else (1, 1)
    inp = 2 * B * n[0] * n[1] * kb
    rec = sum(2 * B * n[l - 1] * n[l] * kb for l in range(2, L + 1))  # feedforward maps, l >= 2
    rec += sum(2 * B * n[l + 1] * n[l] * ka for l in range(1, L))  # feedback / apical maps
    if cfg.estimator == "symmetric":
        return 2 * inp + (cfg.t_free + 2 * cfg.t_nudge + 2 * 2) * rec
    if cfg.estimator in ("one_sided", "chl"):
        return 2 * inp + (cfg.t_free + cfg.t_nudge + 2 * 2) * rec
    return 2 * inp + (cfg.t_free + 2 * cfg.t_nudge) * rec


def peak_bytes():
    try:
        return jax.devices()[0].memory_stats().get("peak_bytes_in_use")
    except Exception:
        return None


def roofline(quick: bool) -> dict:
    """GFLOP/s of a large float32 matmul (the machine's practical ceiling)."""
    n = 2048 if jax.devices()[0].platform == "cpu" else 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    t = timed(lambda: f(a), 0.5 if quick else 1.0)
    return {"matmul_n": n, "gflops": 2 * n**3 / t / 1e9}


def dominant_conv(cfg, model, min_time) -> float:
    """GFLOP/s of `relu(conv(x, w))` for the conv model's costliest conv layer (one batch)."""
    from ep_jax.models.conv import conv2d

    f = synapse_flops(cfg)
    layers = cfg.conv_layers()
    i = int(np.argmax(f[: len(layers)]))
    c = layers[i]
    x = jax.random.uniform(jax.random.PRNGKey(0), (cfg.batch_size, c["h_in"], c["w_in"], c["c_in"]))
    w = jax.random.uniform(jax.random.PRNGKey(1), (c["kernel"], c["kernel"], c["c_in"], c["channels"]))
    g = jax.jit(lambda x, w: jax.nn.relu(conv2d(x, w, c["stride"], c["padding"])))
    t = timed(lambda: g(x, w), min_time)
    return cfg.batch_size * f[i] / t / 1e9


def dominant_matmul(cfg, model, min_time) -> float:
    """GFLOP/s of `relu(x @ w)` for the preset's largest per-batch matmul (the input map;
    conv models: `dominant_conv`)."""
    if cfg.model in CONV_MODELS:
        return dominant_conv(cfg, model, min_time)
    width = model.sizes[1] * (cfg.basal_branches if cfg.model == "dendritic" else 1)
    x = jax.random.uniform(jax.random.PRNGKey(0), (cfg.batch_size, model.sizes[0]))
    w = jax.random.uniform(jax.random.PRNGKey(1), (model.sizes[0], width))
    f = jax.jit(lambda x, w: jax.nn.relu(x @ w))
    t = timed(lambda: f(x, w), min_time)
    return 2 * cfg.batch_size * model.sizes[0] * width / t / 1e9


# --- the naive formulation --------------------------------------------------------------


def to_reference(cfg, tree):
    """Dendritic params/masks from the library's branch-major layout to the reference
    layout (branch (j, k) in column j·K + k) that the naive step works in;
    `from_reference` converts back."""
    return _relayout(cfg, tree, ep_jax.dendrites.to_reference_layout)


def from_reference(cfg, tree):
    return _relayout(cfg, tree, ep_jax.dendrites.from_reference_layout)


def _relayout(cfg, tree, f):
    if cfg.model != "dendritic":
        return tree
    out = dict(tree)
    for part, K, sizes in (
        ("basal", cfg.basal_branches, cfg.sizes[1:]),
        ("apical", cfg.apical_branches, cfg.sizes[1:-1]),
    ):
        out[part] = tuple(jax.tree.map(lambda a, n=n: f(a, n, K), leaf) for leaf, n in zip(tree[part], sizes))
    return out


def naive_step(cfg):
    """A plain jitted symmetric-EP training step for `cfg` (module docstring), in the
    reference layout of the dendritic maps."""
    L, B = len(cfg.sizes) - 1, cfg.batch_size
    lrs = np.broadcast_to(np.asarray(cfg.lr, np.float32), (L,))
    hs = lambda u: (1.0 + jnp.clip(2.0 * u - 1.0, -1.0, 1.0)) / 2.0
    act = {"hard_sigmoid": hs, "tanh": jnp.tanh}[cfg.activation]
    dend = cfg.model == "dendritic"

    def dmap(w, m, c, u, K):
        z = u @ (w * m) + (0.0 if c is None else c)
        return jax.nn.relu(z).reshape(u.shape[0], -1, K).mean(-1)

    def feedforward(p, b, x, s, l):
        u = x if l == 0 else s[l - 1]
        if dend:
            return dmap(p["basal"][l]["w"], b["masks"]["basal"][l], p["basal"][l]["c"], u, cfg.basal_branches)
        return u @ p[l]["w"] + p[l]["b"]

    def feedback(p, b, s, l):  # from the layer above; zero for the output layer
        if l == L - 1:
            return 0.0
        if dend:
            return cfg.alpha * dmap(p["apical"][l]["w"], b["masks"]["apical"][l], None, s[l + 1], cfg.apical_branches)
        return s[l + 1] @ p[l + 1]["w"].T

    def drives(p, b, x, s, y1h, beta):
        h = [feedforward(p, b, x, s, l) + feedback(p, b, s, l) for l in range(L)]
        h[-1] = h[-1] - beta * (s[-1] - y1h)
        return h

    def phi(p, b, x, s, y1h, beta):
        # the dendritic primitive holds its apical term; the energy's feedback is the W_{l+1} term
        tot = sum(
            jnp.sum(s[l] * (feedforward(p, b, x, s, l) + (feedback(p, b, s, l) if dend else 0.0))) for l in range(L)
        )
        return (tot - beta * 0.5 * jnp.sum((s[-1] - y1h) ** 2)) / B

    def relax(p, b, x, s, y1h, beta, T):
        def body(s, _):
            return [act(h) for h in drives(p, b, x, s, y1h, beta)], None

        return jax.lax.scan(body, s, None, length=T)[0]

    def step(p, b, v, x, y):
        y1h = jax.nn.one_hot(y, cfg.sizes[-1])
        s0 = relax(p, b, x, [jnp.zeros((B, n)) for n in cfg.sizes[1:]], y1h, 0.0, cfg.t_free)
        sp = relax(p, b, x, s0, y1h, cfg.beta, cfg.t_nudge)
        sm = relax(p, b, x, s0, y1h, -cfg.beta, cfg.t_nudge)
        g = jax.grad(
            lambda q: (
                -(
                    phi(q, b, x, jax.lax.stop_gradient(sp), y1h, cfg.beta)
                    - phi(q, b, x, jax.lax.stop_gradient(sm), y1h, -cfg.beta)
                )
                / (2 * cfg.beta)
            )
        )(p)
        v = jax.tree.map(lambda vv, gg: 0.9 * vv + gg, v, g)
        rates = engine.build_model(cfg).lr_tree(lrs)
        p = jax.tree.map(lambda pp, vv, r: pp - r * vv, p, v, rates)
        return p, v

    return jax.jit(step)


# --- per-preset timing ------------------------------------------------------------------


def bench_preset(name: str, min_time: float, chunk: int) -> dict:
    cfg = preset_config(name)
    g = engine.Group([engine.Member(cfg, name, Path("."))])
    model, est, opt = g.model, g.est, g.opt
    sstate, srx = g.initial()
    state, rx = S.take(sstate.train, 0), S.take(srx, 0)
    B = cfg.batch_size
    rng = np.random.default_rng(0)
    n = B * chunk
    x = rng.random((n, model.sizes[0]), dtype=np.float32)
    y = rng.integers(0, model.n_classes, n).astype(np.int32)
    key = jax.random.PRNGKey(0)
    sizes = (
        list(cfg.sizes)
        if cfg.model not in CONV_MODELS
        else [f"conv{c}" for c in cfg.channels] + [f"fc{n}" for n in cfg.fc]
    )
    row = {
        "preset": name,
        "model": cfg.model,
        "estimator": cfg.estimator,
        "sizes": sizes,
        "t_free": cfg.t_free,
        "t_nudge": cfg.t_nudge,
        "batch": B,
        "steps_per_epoch": -(-(cfg.total_train() if cfg.model in CONV_MODELS else EPOCH) // B),
    }

    # library: device-resident data, a scan over `chunk` steps
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    idx = jnp.arange(n).reshape(chunk, B)
    box = [state]

    def lib():
        box[0], info = ep_jax.train_steps_jit(model, est, opt, key, box[0], xd, yd, idx, rx)
        return info.loss

    t = timed(lib, min_time) / chunk
    one = compiled_stats(
        jax.jit(ep_jax.train_step, static_argnums=(0, 1, 2)), model, est, opt, key, state, xd[:B], yd[:B], rx
    )
    row["library"] = {"ms_per_step": 1e3 * t, **one}

    # straightforward: nothing hoisted, two nudged scans, host batches, one call per step
    ref = Unhoisted(model)
    est_ref = ep_jax.Estimator(est.kind, est.t_free, est.t_nudge, batched_nudge=False)
    box2, i2 = [state], [0]

    def straight():
        j = i2[0] % chunk
        i2[0] += 1
        box2[0], info = ep_jax.train_step_jit(
            ref, est_ref, opt, key, box2[0], x[j * B : (j + 1) * B], y[j * B : (j + 1) * B], rx
        )
        return info.loss

    t = timed(straight, min_time)
    one = compiled_stats(
        jax.jit(ep_jax.train_step, static_argnums=(0, 1, 2)), ref, est_ref, opt, key, state, xd[:B], yd[:B], rx
    )
    row["straightforward"] = {"ms_per_step": 1e3 * t, **one}
    # same numbers: one step from the same state, both paths
    a, _ = ep_jax.train_step_jit(model, est, opt, key, state, xd[:B], yd[:B], rx)
    b, _ = ep_jax.train_step_jit(ref, est_ref, opt, key, state, xd[:B], yd[:B], rx)
    row["max_param_diff_straightforward"] = max(
        float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params))
    )

    if (
        cfg.estimator == "symmetric"
        and cfg.dt == 1.0
        and cfg.activation in ("hard_sigmoid", "tanh")
        and cfg.model not in CONV_MODELS
    ):  # the naive step is written for the MLPs
        step = naive_step(cfg)
        p_ref = to_reference(cfg, state.params)
        b_ref = dict(state.buffers)
        if "masks" in b_ref:
            b_ref["masks"] = to_reference(cfg, b_ref["masks"])
        v0 = jax.tree.map(jnp.zeros_like, p_ref)
        box3, i3 = [(p_ref, v0)], [0]

        def naive():
            j = i3[0] % chunk
            i3[0] += 1
            box3[0] = step(box3[0][0], b_ref, box3[0][1], xd[j * B : (j + 1) * B], yd[j * B : (j + 1) * B])
            return box3[0]

        t = timed(naive, min_time)
        one = compiled_stats(step, p_ref, b_ref, v0, xd[:B], yd[:B])
        row["naive"] = {"ms_per_step": 1e3 * t, **one}
        p_naive = from_reference(cfg, step(p_ref, b_ref, v0, xd[:B], yd[:B])[0])
        row["max_param_diff_naive"] = max(
            float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(p_naive))
        )
    row["dominant_matmul_gflops"] = dominant_matmul(cfg, model, min_time / 2)
    row["step_flops"] = step_flops(cfg)
    for path in ("library", "straightforward", "naive"):
        r = row.get(path)
        if r:
            r["s_per_epoch"] = r["ms_per_step"] * row["steps_per_epoch"] / 1e3
            r["gflops"] = row["step_flops"] / (r["ms_per_step"] / 1e3) / 1e9
    return row


def bench_sweep(name: str, members: list[int], steps: int, min_time: float) -> list[dict]:
    cfg = preset_config(name)
    n = EPOCH
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((n, cfg.sizes[0]), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, cfg.sizes[-1], n).astype(np.int32))
    rows = []
    for M in members:
        ms = [engine.Member(cfg.replace(seed=s), f"s{s}", Path(".")) for s in range(M)]
        (g,) = engine.group_members(ms)
        state, rx = g.initial()
        idx = jnp.asarray(rng.integers(0, n, (steps, M, cfg.batch_size)).astype(np.int32))
        box = [state]
        max_state = jnp.asarray(cfg.max_state, jnp.float32)

        def run():
            box[0], info = S.sweep_steps_jit(g.model, g.est, g.opt, box[0], x, y, idx, rx, max_state)
            return info.loss

        try:
            t = timed(run, min_time) / steps
        except Exception as e:  # out of memory for the largest M, say
            rows.append({"preset": name, "members": M, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            break
        spe = -(-EPOCH // cfg.batch_size)
        rows.append(
            {
                "preset": name,
                "members": M,
                "ms_per_step": 1e3 * t,
                "model_epochs_per_s": M / (t * spe),
                "peak_bytes": peak_bytes(),
            }
        )
        print(f"  sweep {name} M={M}: {1e3 * t:.2f} ms/step, {M / (t * spe):.3f} model-epochs/s", flush=True)
    return rows


# --- report ------------------------------------------------------------------------------


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"# Benchmarks on {res['device']}",
        "",
        f"Command: `{res['command']}` ({res['date']}); {m['device_kind']}, jax {m['jax']}, "
        f"{m['cpu_count']} CPU cores, load {m['load_average_1min']:.2f} at the start.",
        "",
        f"Roofline: {res['roofline']['gflops']:.1f} GFLOP/s (float32 {res['roofline']['matmul_n']}² matmul at "
        "JAX's default precision, which on NVIDIA GPUs uses TF32 tensor cores).",
        "",
        "## Training step per preset (float32, one model)",
        "",
        "| preset | sizes | T1/T2 | batch | path | ms/step | s/epoch | GFLOP/s | % roofline | memory MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["presets"]:
        for path in ("library", "straightforward", "naive"):
            p = r.get(path)
            if not p:
                continue
            gf, mem, roof = p.get("gflops"), p.get("memory_bytes"), res["roofline"]["gflops"]
            gf_s = "–" if gf is None else f"{gf:.1f}"
            pct = "–" if gf is None else f"{100 * gf / roof:.1f}"
            mem_s = "–" if mem is None else f"{mem / 2**20:.1f}"
            sizes = "-".join(map(str, r["sizes"]))
            lines.append(
                f"| {r['preset']} | {sizes} | {r['t_free']}/{r['t_nudge']} | {r['batch']} | {path} | "
                f"{p['ms_per_step']:.2f} | {p['s_per_epoch']:.2f} | {gf_s} | {pct} | {mem_s} |"
            )
    lines += [
        "",
        "Ratios (time of the other path ÷ library time; > 1: the library is faster):",
        "",
        "| preset | straightforward | naive | dominant `relu(x@w)` GFLOP/s | max |Δθ| vs straightforward | vs naive |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["presets"]:
        lib = r["library"]["ms_per_step"]
        nv = r.get("naive")
        nv_ratio = "–" if not nv else f"{nv['ms_per_step'] / lib:.2f}"
        nv_diff = "–" if not nv else f"{r['max_param_diff_naive']:.1e}"
        lines.append(
            f"| {r['preset']} | {r['straightforward']['ms_per_step'] / lib:.2f} | {nv_ratio} | "
            f"{r['dominant_matmul_gflops']:.1f} | {r['max_param_diff_straightforward']:.1e} | {nv_diff} |"
        )
    if res["sweeps"]:
        lines += [
            "",
            "## Sweep throughput (vmapped members, per-member data order)",
            "",
            "| preset | members | ms/step | model-epochs/s | process peak device MB so far |",
            "|---|---|---|---|---|",
        ]
        for r in res["sweeps"]:
            if "error" in r:
                lines.append(f"| {r['preset']} | {r['members']} | {r['error']} | | |")
                continue
            pk = r.get("peak_bytes")
            pk_s = "–" if pk is None else f"{pk / 2**20:.0f}"
            lines.append(
                f"| {r['preset']} | {r['members']} | {r['ms_per_step']:.2f} | {r['model_epochs_per_s']:.3f} | {pk_s} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="CPU-sized: 3 presets, sweeps of 1, 4, 8")
    p.add_argument("--presets", help="comma-separated presets (default: every architecture)")
    p.add_argument("--members", help="comma-separated sweep sizes (default 1,8,32,128; quick 1,4,8)")
    p.add_argument("--min-time", type=float, help="seconds of timing per measurement")
    p.add_argument("--out", help="folder for <device>.json/.md (default benchmarks/results)")
    a = p.parse_args(argv)
    presets = (
        a.presets.split(",") if a.presets else ((PRESETS_QUICK + CONV_QUICK) if a.quick else (PRESETS_FULL + CONV_FULL))
    )
    members = [int(m) for m in (a.members or ("1,4,8" if a.quick else "1,8,32,128")).split(",")]
    min_time = a.min_time or (1.0 if a.quick else 2.0)
    chunk = 10 if a.quick else 50
    res = {
        "device": device_name(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "roofline": roofline(a.quick),
        "presets": [],
        "sweeps": [],
    }
    print(f"{res['device']}: roofline {res['roofline']['gflops']:.1f} GFLOP/s", flush=True)
    for name in presets:
        r = bench_preset(name, min_time, chunk)
        res["presets"].append(r)
        print(
            f"  {name}: library {r['library']['ms_per_step']:.2f} ms/step "
            f"({r['library']['s_per_epoch']:.2f} s/epoch), straightforward "
            f"{r['straightforward']['ms_per_step']:.2f}"
            + (f", naive {r['naive']['ms_per_step']:.2f}" if r.get("naive") else ""),
            flush=True,
        )
    for name in SWEEP_PRESETS[:1] if a.quick else SWEEP_PRESETS:
        res["sweeps"] += bench_sweep(name, members, 5 if a.quick else 10, min_time)
    out = Path(a.out) if a.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{res['device']}.json").write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    (out / f"{res['device']}.md").write_text(text)
    print(text)
    print(f"wrote {out / (res['device'] + '.json')} and .md")


if __name__ == "__main__":
    main()
