"""A fused relaxation kernel in Pallas: all steps of one phase in one launch.

The XLA path (`ep_jax.dynamics`) runs a phase as a `lax.scan` of `T` steps; on a GPU each
step is a few small kernels (one matmul of 64 rows per synapse and direction, and the
elementwise update), so one MNIST DEP training step of 72 relaxation steps is a chain of
hundreds of launches and waits on latency, not on arithmetic. Here one program per
(member, batch tile) loads its rows of the state once, runs every step of the phase with
the state held on chip, and writes the final state once:

    for t in 1..T:   h_l = drive_l(s)                     (the model's `drives`)
                     s_l ← (1 − dt_l) ⊙ s_l + dt_l ⊙ σ_l(h_l)

with the same drives as the models (`ep_jax.models.ep`, `ep_jax.models.dendritic`):

The kernel asks the model what it needs (`model.kernel_drive()`, a `KernelDrive`, and
`model.kernel_weights(eff)`: the arrays in the kernel's terms); `_layout` is the one place
that orders the kernel's operands. The two kinds of drives:

- standard / HTS network (`EPModel`, kind "linear"): `h_l = W_l s_{l−1} + b_l + γ W_{l+1}ᵀ s_{l+1}`
  (`h_1`'s feedforward part is the input drive `ctx`; the output gets no feedback and,
  nudged, the force `−β ∂ℓ/∂s_L`); γ ≠ 1, leaky-ReLU hidden and sigmoid output layers and
  per-neuron `dt` (the heterogeneous-time-step network) are the same kernel;
- dendritic (`DendriticModel`, kind "dendritic"): `h_l = B_l(s_{l−1}) + α A_l(s_{l+1})`, each map the soma
  average of ReLU branches of the masked kernels (`ep_jax.dendrites`: branch-major, the K
  slices added as the same halving tree, one matmul per branch).

What stays in XLA: the loop invariants (`model.prepare`: masked kernels; the input drive
`model.input_drive`, computed once per batch) and the gradient (`primitive_grad` at the
relaxed states). The weights, loop-invariant, are read by every program (per tile) from
device memory (on a GPU mostly from L2).

Shapes. The GPU backend wants power-of-2 block shapes and matmul dimensions >= 16; the
wrapper pads every width to the next power of 2 (at least 16: the 10 outputs become 16)
and the batch to a multiple of the tile. Padding does not change the numbers: padded
neurons have zero weights in and out and a time step of 0, so they stay at their initial
0 and add exact zeros to every real drive (the cross-entropy softmax masks them out);
padded rows are independent examples, sliced off. `check_blocks` asserts the constraints
before any call, so a CPU test catches a violation that only the GPU would reject.

Backend: Triton (`jax.experimental.pallas.triton`). Mosaic GPU (`pallas.mosaic_gpu`) is
the future path on Hopper, but it is a different programming model (explicit shared-memory
references, warpgroup matrix instructions, hand-written pipelining) whose API changed
between jax 0.10 and 0.11; the Triton lowering takes the plain `jnp` kernel body written
here (dots, elementwise maps, `fori_loop`) unchanged on both versions (deprecated in 0.11,
still present). Where the kernel cannot run — a jax without the Triton compiler parameters
(`BackendUnavailable`), no GPU and no interpret mode, a Triton lowering or compile error, a
model without a kernel — `relax` warns once with one line saying why and runs the XLA path.
Only a block shape the wrapper was told to use and the backend would reject
(`KernelShapeError`, e.g. `block_b=24`) is an error.

Precision: the kernel's dots use jax's default matmul precision, as the XLA path does (on
NVIDIA GPUs that is TF32 for float32, about 3e-4 relative per dot; `jax.default_matmul_
precision("highest")` gives IEEE float32 in both paths). On a CPU the kernel runs only in
Pallas interpret mode (`interpret=True`), which emulates the program with XLA ops, one
grid point after the other: a test tool, slower than the XLA path (2 CPU cores: a 60-step
free phase of 784-256-10 at batch 64, one tile, 1.1× (EP) and 1.2× (dendritic); the HTS
network's 125 steps at batch 256, 16 tiles, 1.5×).

Rows per program: `block_b`, else `EP_JAX_PALLAS_BLOCK_B` (a benchmark knob, read at
trace time), else up to 64 rows while a program's state stays under 96 KiB.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ep_jax import activations, dynamics
from ep_jax.models.base import OutputGrad

MIN_DIM = 16  # smallest matmul dimension the Triton dot takes
STATE_BYTES = 96 * 1024  # the tile heuristic keeps a program's state under this


class KernelShapeError(ValueError):
    """A block shape or matmul dimension the Pallas GPU backend would reject."""


class BackendUnavailable(RuntimeError):
    """This jax has no Pallas Triton backend (no `pallas.triton.CompilerParams`)."""


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def padded(n: int) -> int:
    """A width as the kernel holds it: the next power of 2, at least `MIN_DIM`."""
    return max(MIN_DIM, _next_pow2(n))


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static structure of one kernel call (hashable: the lowering cache's key)."""

    kind: str  # the model's `KernelDrive.kind`: "linear" | "dendritic"
    widths: tuple  # real widths n_1..n_L
    padded: tuple  # kernel widths N_1..N_L
    acts: tuple  # activation names per layer
    loss: str
    nudged: str | None  # None (free), "onehot" or "grad"
    n_out: int  # real output width (softmax mask)
    tile: int
    rows: int  # padded batch
    steps: int
    dtype: str
    basal: int = 1
    apical: int = 1
    prev: bool = False  # also write the state before the last step (the residual's)


def check_blocks(plan: Plan):
    """Raise `KernelShapeError` (one line) unless every block shape of `plan` is a power
    of 2 and every matmul dimension is >= 16 (the Triton backend's constraints)."""
    if not _is_pow2(plan.tile) or plan.tile < MIN_DIM:
        raise KernelShapeError(f"batch tile {plan.tile} must be a power of 2 >= {MIN_DIM}")
    if plan.rows % plan.tile:
        raise KernelShapeError(f"padded batch {plan.rows} is not a multiple of the tile {plan.tile}")
    for l, n in enumerate(plan.padded, start=1):
        if not _is_pow2(n) or n < MIN_DIM:
            raise KernelShapeError(
                f"layer {l}: kernel width {n} must be a power of 2 >= {MIN_DIM} "
                f"(pad {plan.widths[l - 1]} to {padded(plan.widths[l - 1])})"
            )


# --- the kernel body ----------------------------------------------------------------------


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=a.dtype)


def _soma_parts(parts, branches):
    # the halving tree of `ep_jax.dendrites.soma`, on already ReLU-ed branch slices
    while len(parts) > 1:
        h = len(parts) // 2
        parts = [parts[i] + parts[i + h] for i in range(h)] + parts[2 * h :]
    return parts[0] / branches


def _dendritic_map(u, k_ref, c_ref, n, branches):
    """Soma average of ReLU branches `u @ k_ref[:, k·n:(k+1)·n] (+ c)`: one dot per branch."""
    parts = []
    for k in range(branches):
        z = _dot(u, k_ref[:, pl.ds(k * n, n)])
        if c_ref is not None:
            z = z + c_ref[:, pl.ds(k * n, n)]
        parts.append(jnp.maximum(z, 0))
    return _soma_parts(parts, branches)


def _make_kernel(plan: Plan):
    L = len(plan.padded)
    N = plan.padded
    acts = [activations.get_activation(a) for a in plan.acts]

    layout = _layout(plan)

    def kernel(*refs):
        group = {}
        for (name, _, _), r in zip(layout, refs):
            group.setdefault(name, []).append(r)
        out_refs = list(refs[len(layout) :])
        (ctx_ref,), s_refs, dt_refs = group["ctx"], group["s"], group["dt"]
        if plan.nudged:
            (tgt_ref,), (beta_ref,) = group["target"], group["beta"]
        w_refs, b_refs, back_refs, c_refs = group["w"], group["b"], group["back"], group["scale"]

        ctx = ctx_ref[...]
        dts = [r[...] for r in dt_refs]
        if plan.nudged:
            tgt, beta = tgt_ref[...], beta_ref[...]
            if plan.loss == "ce":
                col = lax.broadcasted_iota(jnp.int32, tgt.shape, 1)
                real = col < plan.n_out

        def force(s_out):
            if plan.nudged == "grad":
                g = tgt
            elif plan.loss == "mse":
                g = s_out - tgt
            else:  # softmax over the real outputs only
                z = jnp.where(real, s_out, -jnp.inf)
                e = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))
                g = e / jnp.sum(e, axis=-1, keepdims=True) - tgt
            return -beta * g

        def drives(s):
            h = []
            for l in range(L):
                if plan.kind == "linear":
                    hl = ctx if l == 0 else _dot(s[l - 1], w_refs[l - 1][...]) + b_refs[l - 1][...]
                    if l < L - 1:
                        hl = hl + c_refs[l][...] * _dot(s[l + 1], back_refs[l][...])
                else:
                    hl = ctx if l == 0 else _dendritic_map(s[l - 1], w_refs[l - 1], b_refs[l - 1], N[l], plan.basal)
                    if l < L - 1:
                        hl = hl + c_refs[l][...] * _dendritic_map(s[l + 1], back_refs[l], None, N[l], plan.apical)
                if l == L - 1 and plan.nudged:
                    hl = hl + force(s[l])
                h.append(hl)
            return h

        def body(_, s):
            h = drives(s)
            return tuple((1 - d) * sl + d * act(hl) for sl, hl, d, act in zip(s, h, dts, acts))

        s = tuple(r[...] for r in s_refs)
        if plan.prev:
            s = lax.fori_loop(0, plan.steps - 1, body, s)
            for r, sl in zip(out_refs[L:], s):
                r[...] = sl
            s = body(plan.steps - 1, s)
        else:
            s = lax.fori_loop(0, plan.steps, body, s)
        for r, sl in zip(out_refs, s):
            r[...] = sl

    return kernel


# --- the call ---------------------------------------------------------------------------


def _layout(plan: Plan) -> list:
    """The kernel's operands, in their one order: `(group, shape, row-blocked)` each
    (row-blocked: the batch rows, `shape[0]` the padded batch, a tile per program; the
    rest whole). `_call`'s block specs, the kernel body, `_operands` and
    `_abstract_operands` all follow this list. Groups: `ctx`; `s` (one per layer);
    `target`, `beta` (nudged phases); `dt` (one per layer); for synapses 2..L `w`
    (F_l's kernel), `b` (its bias); for the hidden layers `back` (G_l's kernel) and
    `scale` (c broadcast over the layer) — `KernelDrive`'s terms."""
    L, N, R = len(plan.padded), plan.padded, plan.rows
    out = [("ctx", (R, N[0]), True)] + [("s", (R, n), True) for n in N]
    if plan.nudged:
        out += [("target", (R, N[-1]), True), ("beta", (R, N[-1]), True)]
    out += [("dt", (1, n), False) for n in N]
    kb, ka = (1, 1) if plan.kind == "linear" else (plan.basal, plan.apical)
    out += [("w", (N[l], kb * N[l + 1]), False) for l in range(L - 1)]
    out += [("b", (1, kb * N[l + 1]), False) for l in range(L - 1)]
    out += [("back", (N[l + 1], ka * N[l]), False) for l in range(L - 1)]
    out += [("scale", (1, N[l]), False) for l in range(L - 1)]
    return out


def _compiler_params(interp: bool):
    if interp:
        return None
    from jax.experimental.pallas import triton as plt

    cls = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams", None)
    if cls is None:
        raise BackendUnavailable(
            f"jax {jax.__version__} has no Pallas Triton backend "
            "(pallas.triton.CompilerParams): use the default solver (scan)"
        )
    return cls(num_warps=4, num_stages=1)


def _call(plan: Plan, interp: bool):
    """The `pallas_call` of a plan: inputs as `_operands` orders them."""
    check_blocks(plan)
    N, t = plan.padded, plan.tile
    dtype = jnp.dtype(plan.dtype)
    row = lambda n: pl.BlockSpec((t, n), lambda i: (i, 0))
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
    specs = [row(shape[1]) if rows else whole(shape) for _, shape, rows in _layout(plan)]
    for shape in [s.block_shape for s in specs]:
        for d in shape:
            if not _is_pow2(d):
                raise KernelShapeError(f"block shape {tuple(shape)} is not made of powers of 2")
    outs = N + N if plan.prev else N
    out_shape = tuple(jax.ShapeDtypeStruct((plan.rows, n), dtype) for n in outs)
    return pl.pallas_call(
        _make_kernel(plan),
        out_shape=out_shape,
        grid=(plan.rows // t,),
        in_specs=specs,
        out_specs=tuple(row(n) for n in outs),
        interpret=interp,
        compiler_params=_compiler_params(interp),
        name=f"ep_relax_{plan.kind}",
    )


def _pad2(a, rows, cols):
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def _pad_branches(k, n, N, branches, rows=None):
    """A branch-major `(m, K·n)` kernel (or `(K·n,)` bias) padded to `(M, K·N)`."""
    if k.ndim == 1:
        return jnp.pad(k.reshape(branches, n), ((0, 0), (0, N - n))).reshape(1, branches * N)
    m = k.shape[0]
    k = jnp.pad(k.reshape(m, branches, n), ((0, rows - m), (0, 0), (0, N - n)))
    return k.reshape(rows, branches * N)


def _operands(plan: Plan, model, eff, ctx, s, target, beta, dt):
    L, N, R = len(plan.padded), plan.padded, plan.rows
    dtype = ctx.dtype
    ops = [_pad2(ctx, R, N[0])] + [_pad2(sl, R, n) for sl, n in zip(s, N)]
    B = ctx.shape[0]
    if plan.nudged:
        g = target.g if isinstance(target, OutputGrad) else target
        ops.append(_pad2(g.astype(dtype), R, N[-1]))
        b = jnp.broadcast_to(
            jnp.asarray(beta, dtype).reshape(-1, 1) if jnp.ndim(beta) else beta, (B, plan.n_out)
        ).astype(dtype)
        ops.append(_pad2(b, R, N[-1]))
    for d, n, Np in zip(dt, plan.widths, N):
        ops.append(jnp.pad(jnp.broadcast_to(jnp.asarray(d, dtype), (n,)), (0, Np - n)).reshape(1, Np))
    row = lambda v, l: jnp.full((1, N[l]), v, dtype)
    k, n = model.kernel_weights(eff), plan.widths
    kb, ka = (1, 1) if plan.kind == "linear" else (plan.basal, plan.apical)
    ops += [_pad_branches(k["w"][l], n[l + 1], N[l + 1], kb, N[l]) for l in range(L - 1)]
    ops += [_pad_branches(k["b"][l], n[l + 1], N[l + 1], kb) for l in range(L - 1)]
    ops += [_pad_branches(k["back"][l], n[l], N[l], ka, N[l + 1]) for l in range(L - 1)]
    ops += [row(k["scale"], l) for l in range(L - 1)]
    layout = _layout(plan)
    assert [tuple(o.shape) for o in ops] == [shape for _, shape, _ in layout], "operands out of the layout's order"
    return [o.astype(dtype) for o in ops]


def supported(model) -> str | None:
    """None when `model` has a kernel, else the reason (one line)."""
    describe = getattr(model, "kernel_drive", None)
    drive = describe() if callable(describe) else None
    if drive is None:
        return (
            f"no Pallas relaxation kernel for {type(model).__name__} (its kernel_drive() describes none; "
            "EPModel and DendriticModel have one)"
        )
    if drive.kind not in ("linear", "dendritic"):
        return f"no Pallas relaxation kernel for drives of kind {drive.kind!r}"
    if not (_is_pow2(drive.basal) and _is_pow2(drive.apical)):
        return (
            f"the Pallas relaxation kernel needs power-of-2 branch counts, got basal {drive.basal}, "
            f"apical {drive.apical}"
        )
    return None


def _tile(batch: int, widths, itemsize: int) -> int:
    env = os.environ.get("EP_JAX_PALLAS_BLOCK_B")
    if env:
        return int(env)
    t = max(MIN_DIM, min(64, _next_pow2(batch)))
    while t > MIN_DIM and t * sum(widths) * itemsize > STATE_BYTES:
        t //= 2
    return t


def plan_of(model, ctx, s, target, steps: int, block_b: int | None = None, prev: bool = False) -> Plan:
    """The `Plan` of a call (static: shapes and the model's structure)."""
    widths = tuple(int(n) for n in model.state_sizes)
    N = tuple(padded(n) for n in widths)
    B = ctx.shape[0]
    t = block_b if block_b is not None else _tile(B, N, jnp.dtype(ctx.dtype).itemsize)
    nudged = None if target is None else ("grad" if isinstance(target, OutputGrad) else "onehot")
    acts = (model.activation,) * (model.n_layers - 1) + (model.out_activation_name,)
    drive = model.kernel_drive()
    rows = -(-B // t) * t if t > 0 else B
    return Plan(
        drive.kind,
        widths,
        N,
        acts,
        model.loss,
        nudged,
        widths[-1],
        int(t),
        rows,
        int(steps),
        jnp.dtype(ctx.dtype).name,
        basal=drive.basal,
        apical=drive.apical,
        prev=bool(prev),
    )


@functools.cache
def _lowers(plan: Plan, interp: bool, backend: str) -> bool:
    """Whether the plan's kernel compiles here; warns once (one line) when it does not."""
    why = None
    if interp:
        return True
    if backend != "gpu":
        why = f"it needs a GPU (backend here: {backend}; interpret=True runs it emulated)"
    else:
        try:
            jax.jit(_call(plan, interp)).lower(*_abstract_operands(plan)).compile()
        except KernelShapeError:
            raise
        except BackendUnavailable as e:
            why = str(e)
        except Exception as e:  # noqa: BLE001 - any lowering failure: fall back to XLA
            first = (str(e).strip().splitlines() or [""])[0][:200]
            why = f"it does not lower ({type(e).__name__}: {first})"
    if why:
        warnings.warn(
            f"ep_jax.kernels: the Pallas relaxation kernel is not used: {why}; running the XLA path",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _abstract_operands(plan: Plan):
    return [jax.ShapeDtypeStruct(shape, jnp.dtype(plan.dtype)) for _, shape, _ in _layout(plan)]


def _xla(model, eff, ctx, s, target, beta, dt, steps, record, residual):
    if residual:
        return dynamics.relax(model, eff, ctx, s, target, beta, dt, steps, record, residual=True)
    return dynamics.relax(model, eff, ctx, s, target, beta, dt, steps, record)


def _relax2(model, eff, ctx, s, target, beta, dt, steps, residual, block_b, interp):
    """`(final, state before the last step or None)` by the kernel, or None where the
    kernel is not used (the caller then runs the XLA path)."""
    why = supported(model)
    if why:
        warnings.warn(f"ep_jax.kernels: {why}; running the XLA path", RuntimeWarning, stacklevel=3)
        return None
    plan = plan_of(model, ctx, s, target, steps, block_b, prev=residual)
    check_blocks(plan)
    interp = bool(interp)
    if not _lowers(plan, interp, jax.default_backend()):
        return None
    out = _call(plan, interp)(*_operands(plan, model, eff, ctx, s, target, beta, dt))
    B, L = ctx.shape[0], len(plan.widths)
    cut = lambda arrs: tuple(o[:B, :n] for o, n in zip(arrs, plan.widths))
    return cut(out[:L]), (cut(out[L:]) if residual else None)


def relax(
    model,
    eff,
    ctx,
    s,
    target,
    beta,
    dt,
    steps: int,
    record: bool = False,
    residual: bool = False,
    *,
    block_b: int | None = None,
    interpret: bool = False,
):
    """`steps` updates from state `s`, as `ep_jax.dynamics.relax` (same arguments, same
    states; with `residual` also the relative residual of the last step), in one kernel
    launch. `record=True` (the trajectory) runs the XLA path, as do models without a
    kernel and backends where it does not lower (one warning line). `block_b`: rows per
    program (a power of 2 >= 16; default: up to 64, fewer for wide states). `interpret`:
    run the kernel in Pallas interpret mode (any backend, emulated; the CPU tests' mode).
    `ep_jax.solvers.Pallas` is the solver that calls it."""
    if record or steps == 0:
        return _xla(model, eff, ctx, s, target, beta, dt, steps, record, residual)
    got = _relax2(model, eff, ctx, s, target, beta, dt, steps, residual, block_b, interpret)
    if got is None:
        return _xla(model, eff, ctx, s, target, beta, dt, steps, record, residual)
    final, prev = got
    return (final, dynamics.relative_residual(final, prev)) if residual else final


def free_phase(
    model,
    eff,
    ctx,
    dt,
    steps: int,
    record: bool = False,
    residual: bool = False,
    *,
    block_b: int | None = None,
    interpret: bool = False,
):
    """`steps` free steps (β = 0) from the zero state (`ep_jax.dynamics.free_phase`)."""
    s0 = model.zero_state(ctx.shape[0], ctx.dtype)
    return relax(model, eff, ctx, s0, None, 0.0, dt, steps, record, residual, block_b=block_b, interpret=interpret)


def nudged_phases(
    model,
    eff,
    ctx,
    s_free,
    target,
    betas,
    dt,
    steps: int,
    batched: bool = True,
    record: bool = False,
    residual: bool = False,
    *,
    block_b: int | None = None,
    interpret: bool = False,
):
    """Nudged phases from the free state, one per β (`ep_jax.dynamics.nudged_phases`:
    a list of states; with `residual`, `(list, r)`). The phases are always stacked along
    the batch axis into one launch (`batched` is accepted for the signature: both give
    the same numbers)."""

    def xla():
        kw = dict(residual=True) if residual else {}
        return dynamics.nudged_phases(model, eff, ctx, s_free, target, betas, dt, steps, batched, record, **kw)

    if record or steps == 0:
        return xla()
    n, B = len(betas), ctx.shape[0]
    tile = lambda a: jnp.concatenate([a] * n, axis=0)
    beta_col = jnp.concatenate([jnp.full((B, 1), b, ctx.dtype) for b in betas], axis=0)
    got = _relax2(
        model,
        eff,
        tile(ctx),
        tuple(tile(sl) for sl in s_free),
        jax.tree.map(tile, target),
        beta_col,
        dt,
        steps,
        residual,
        block_b,
        interpret,
    )
    if got is None:
        return xla()
    split = lambda st: [tuple(lax.slice_in_dim(sl, i * B, (i + 1) * B, axis=0) for sl in st) for i in range(n)]
    finals = split(got[0])
    if not residual:
        return finals
    prevs = split(got[1])
    return finals, dynamics.relative_residual(sum(map(tuple, finals), ()), sum(map(tuple, prevs), ()))
