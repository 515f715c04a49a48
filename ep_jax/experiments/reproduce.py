"""The papers' tables in one command, as seed sweeps through the experiment engine.

    python -m experiments.reproduce table2                 # Table 2: {EP, DEP, DBPTT} x datasets
    python -m experiments.reproduce table1                 # Table 1: HTS dt_out x distribution
    python -m experiments.reproduce table2 --budget 60     # stop cleanly after ~60 minutes
    python -m experiments.reproduce table2                 # ... and the same command continues
    python -m experiments.reproduce table2 --smoke         # the same path on tiny subsets, 1 epoch

Each cell whose dataset is available offline (or through --data-dir) runs `--seeds`
seeds; the seeds of one cell share their structure, so they train as one vmapped
program. Cells whose data is missing are listed and skipped. Output: one run folder per
cell and seed under `--out` (default `runs/reproduce-<table>`, with `--smoke`
`runs/reproduce-<table>-smoke`), and at the end the aggregated table against the paper
(`<out>/results.md`, `experiments.aggregate`; for Table 1 also the stability layout,
`experiments.stability`).

Re-running the same command continues from the checkpoints (finished cells stay as they
are; `--epochs` may grow); `--resume` says the same explicitly (and refuses an output
folder without any checkpoint). A run folder that holds files but no checkpoint is
refused (it cannot continue); `--overwrite` retrains the chosen cells from scratch,
removing only what ep_jax wrote in their run folders (only folders of a reproduce run:
the engine refuses others, and a folder holding anything else). `results.md` is never
written over a file ep_jax did not write (`check_outputs`; the folder's manifest).
Before training, every group's time per epoch is estimated, one line per group as it
goes: a chunk of `ESTIMATE_STEPS` steps of its own step function is compiled, run once,
then timed on a throwaway copy of the initial state (an extra compilation of seconds,
not the run's `chunk`-step scan). With `--budget MINUTES` the grid stops at the last
epoch boundary that fits, resumable.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from ep_jax.experiments import cli, runtime
from ep_jax.experiments.config import ConfigError, RunConfig, validate
from ep_jax.experiments.errors import Interrupted, RunError
from ep_jax.experiments.presets import HTS_DISTS, HTS_DT_OUT, PRESETS
from ep_jax.experiments.train import check_data_dir, check_int_flags

TABLE2_CELLS = [f"{d}-{m}" for d in ("mnist", "kmnist", "fmnist") for m in ("ep", "dep", "dbptt")]
TABLE1_DATASETS = ("mnist", "kmnist", "fmnist")
SMOKE = dict(subset=512, test_subset=256, epochs=1, chunk=4, eval_batch=256)
EPOCHS = 50  # default epochs (the papers' numbers need >= 50); --smoke: SMOKE's
ESTIMATE_STEPS = 3  # steps of the timed chunk of the time estimate
MAX_SEEDS = 1000


def default_out(table: str, smoke: bool = False) -> Path:
    """The default output folder: `runs/reproduce-<table>`, `runs/reproduce-<table>-smoke`."""
    return Path("runs") / (f"reproduce-{table}" + ("-smoke" if smoke else ""))


def out_of(a) -> Path:
    """The output folder of the parsed arguments `a` (`--out`, else `default_out`)."""
    return Path(a.out) if a.out else default_out(a.table, a.smoke)


def available(dataset: str, data_dir=None) -> bool:
    """Whether the dataset's files are found offline (no download is tried)."""
    from ep_jax import data

    return data.available_offline(dataset, data_dir)


def cells(table: str, only=None) -> list[tuple[str, dict]]:
    """`[(cell name, config values)]` of a table."""
    if table == "table2":
        out = [(c, dict(PRESETS[c])) for c in TABLE2_CELLS]
    elif table == "table1":
        out = [
            (f"{d}-hts-{dist}-dt{dt:.2f}", dict(PRESETS[f"{d}-hts-{dist}"], dt_out=dt))
            for d in TABLE1_DATASETS
            for dist in HTS_DISTS
            for dt in HTS_DT_OUT
        ]
    else:
        raise ConfigError(f"unknown table {table!r}; choose table1 or table2")
    if only:
        names = {c for c, _ in out}
        unknown = sorted(set(only) - names - {c.rsplit("-hts", 1)[0] for c in names})
        if unknown:
            raise ConfigError(f"--cells: unknown cell(s) {unknown}; {table} has {sorted(names)}")
        out = [(c, v) for c, v in out if c in only or c.split("-hts")[0] in only]
    return out


def members(a) -> tuple[list, list[str]]:
    """`(engine.Member per cell and seed, ["cell (why skipped)"])` of the parsed arguments."""
    from ep_jax.experiments import engine

    out, skipped = [], []
    root = out_of(a)
    for cell, values in cells(a.table, a.cells.split(",") if a.cells else None):
        values = dict(values)
        values["epochs"] = EPOCHS
        if a.data_dir:
            values["data_dir"] = a.data_dir
        if a.smoke:
            values.update(SMOKE)
        if a.epochs is not None:
            values["epochs"] = a.epochs
        if a.chunk:
            values["chunk"] = a.chunk
        solver = a.solver or {"xla": "scan", "pallas": "pallas", None: None}[a.impl]
        if solver and values.get("estimator") in ("symmetric", "one_sided", "chl"):
            values["solver"] = solver  # BPTT cells keep the scan (they differentiate through it)
        if not available(values["dataset"], a.data_dir):
            skipped.append(f"{cell} ({values['dataset']} not found offline)")
            continue
        for seed in range(a.seeds):
            cfg = validate(RunConfig.from_dict({**values, "seed": seed}, where=f"{cell}: "))
            out.append(engine.Member(cfg, f"{cell}-seed{seed}", root / cell / f"seed{seed}"))
    return out, skipped


def _cell_folder_ok(p: Path, known) -> bool:
    return (
        p.name in known
        and p.is_dir()
        and not p.is_symlink()
        and all(re.fullmatch(r"seed\d+", q.name) and q.is_dir() and not q.is_symlink() for q in p.iterdir())
    )


def results_is_ours(out: Path, table: str) -> bool:
    """Whether ep_jax wrote `<out>/results.md` (or may write it: there is none): the
    folder's manifest lists it, or — an output folder made before manifests existed — the
    folder holds only it and cell folders of `table`, at least one."""
    from ep_jax.experiments import runfolder

    p = out / "results.md"
    if not p.exists() and not p.is_symlink():
        return True
    if p.is_symlink() or not p.is_file():
        return False
    m = runfolder.read_manifest(out)
    if m is not None:
        return "results.md" in m["files"]
    known = {c for c, _ in cells(table)}
    others = [q for q in out.iterdir() if q.name != "results.md"]
    return bool(others) and all(_cell_folder_ok(q, known) for q in others)


def check_outputs(out: Path, table: str):
    """Refuse (RunError) an output folder whose `results.md` ep_jax did not write: the
    table is written there at the end, and never over a user's file."""
    if out.is_dir() and not results_is_ours(out, table):
        raise RunError(
            f"{out / 'results.md'} exists and ep_jax did not write it; reproduce writes its table "
            "there: move it away or choose another --out"
        )


def check_overwrite(out: Path, table: str):
    """Refuse (RunError) `--overwrite` on a folder that is not a reproduce run's output:
    it may hold only `results.md` (written by ep_jax), its manifest and cell folders of
    `table` holding `seed<N>` folders (each checked by the engine)."""
    from ep_jax.experiments import runfolder

    if not out.exists():
        return
    if not out.is_dir():
        raise RunError(f"{out} exists and is not a folder")
    known = {c for c, _ in cells(table)}
    for p in sorted(out.iterdir(), key=lambda q: q.name):
        if p.name == "results.md" and p.is_file() and not p.is_symlink():
            continue
        if p.name == runfolder.MANIFEST and p.is_file() and not p.is_symlink():
            continue
        if _cell_folder_ok(p, known):
            continue
        raise RunError(
            f"--overwrite replaces only the runs of a reproduce output folder; {out} holds {p.name!r}, "
            f"which is not one of {table}'s cells (choose another --out)"
        )
    check_outputs(out, table)


def estimate(groups, data_for, report=None, steps: int = ESTIMATE_STEPS) -> list[float]:
    """Seconds per epoch of each group: a chunk of `steps` steps of its compiled step
    (`ep_jax.sweep.sweep_steps_jit`) on a throwaway copy of its initial state is run once
    (compiling it), then timed; scaled to the epoch's steps, plus the evaluation.
    `report(group, seconds)` is called as each group's estimate is known."""
    from ep_jax import sweep as S
    from ep_jax.experiments import engine
    from ep_jax.models.base import default_float

    out = []
    for g in groups:
        with engine._x64(g.cfg):
            xtr, ytr, _, _ = data_for(g.cfg)
            n, B = len(ytr), g.cfg.batch_size
            n_full = n // B
            chunk = max(1, min(steps, g.cfg.chunk, n_full))
            state, rx = g.initial()
            x = jnp.asarray(xtr, default_float())
            y = jnp.asarray(ytr, jnp.int32)
            idx = jnp.asarray(np.random.default_rng(0).integers(0, n, (chunk, g.M, B)).astype(np.int32))
            ms = jnp.asarray(g.cfg.max_state, default_float())
            run = lambda: S.sweep_steps_jit(g.model, g.est, g.opt, state, x, y, idx, rx, ms)[1].loss
            run().block_until_ready()
            t0 = time.perf_counter()
            run().block_until_ready()
            per_step = (time.perf_counter() - t0) / chunk
        # + the partial batch and the evaluation (a free phase over the test set)
        eval_frac = g.cfg.n_test() / max(n, 1) * g.cfg.t_free / (g.cfg.t_free + 3 * g.cfg.t_nudge + 4)
        secs = per_step * (n_full + (n % B > 0)) * (1 + eval_frac)
        out.append(secs)
        if report is not None:
            report(g, secs)
    return out


def parser():
    """The command line's argument parser."""
    p = argparse.ArgumentParser(
        prog=cli.prog("reproduce"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("table", choices=("table1", "table2"))
    p.add_argument("--seeds", type=int, default=5, help=f"seeds per cell (default 5, at most {MAX_SEEDS})")
    p.add_argument(
        "--epochs",
        type=int,
        help=f"epochs per run (default {EPOCHS}: the papers' numbers need >= 50; with --smoke {SMOKE['epochs']})",
    )
    p.add_argument("--cells", help="comma-separated cells (default: every cell whose data is available)")
    p.add_argument("--budget", type=float, help="minutes; stop cleanly at the last epoch boundary that fits")
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE['subset']} training and {SMOKE['test_subset']} test examples, "
        f"{SMOKE['epochs']} epoch: the same path in minutes (default --out "
        "runs/reproduce-<table>-smoke)",
    )
    p.add_argument("--chunk", type=int, help="steps per device-resident scan")
    p.add_argument(
        "--solver",
        help="the relaxation solver of the EP cells (config field solver, e.g. async:1e-5; default: the presets' scan)",
    )
    p.add_argument(
        "--impl", choices=("xla", "pallas"), help="shorthand of the GPU lease: --solver scan (xla) or --solver pallas"
    )
    p.add_argument("--data-dir", help="folder with the datasets' files (the only place looked)")
    p.add_argument(
        "--out", help="output folder (default runs/reproduce-<table>, with --smoke runs/reproduce-<table>-smoke)"
    )
    p.add_argument("--no-estimate", action="store_true", help="skip the time estimate")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs in --out (what re-running the command does; refuses a folder without any checkpoint)",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="retrain the chosen cells from scratch, replacing their run folders"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_common(p)
    return p


def main(argv=None):
    """`python -m experiments.reproduce`: train what is left of a table, then write its
    `results.md`; returns the exit status."""
    from ep_jax.experiments import aggregate, engine, runfolder, stability
    from ep_jax.experiments import checkpoint as ckpt

    a = parser().parse_args(argv)
    t_start = time.time()
    check_int_flags({"--seeds": a.seeds, "--epochs": a.epochs, "--chunk": a.chunk})
    if not 1 <= a.seeds <= MAX_SEEDS:
        raise ConfigError(f"--seeds must be >= 1 and <= {MAX_SEEDS}, got {a.seeds}")
    if a.budget is not None and not (math.isfinite(a.budget) and a.budget > 0):
        raise ConfigError(f"--budget must be > 0 minutes (and finite), got {a.budget}")
    if a.solver and a.impl:
        raise ConfigError("give --solver or its shorthand --impl, not both")
    check_data_dir(a.data_dir)
    ms, skipped = members(a)
    for s in skipped:
        print(f"skipped: {s}")
    if not ms:
        raise ConfigError("no cell has its data available; pass --data-dir (see ep_jax.data for the layout)")
    out = out_of(a)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a folder")
    if a.overwrite:
        check_overwrite(out, a.table)
    check_outputs(out, a.table)
    if a.resume and not any((m.dir / engine.CHECKPOINT).exists() for m in ms):
        raise RunError(
            f"{out}: no run to resume (no checkpoint of the chosen cells); run the command without --resume to start"
        )
    # continue what exists, start the rest: a member folder with a checkpoint resumes
    todo, metas = [], {}
    for m in ms:
        meta = None
        if not a.overwrite and (m.dir / engine.CHECKPOINT).exists():
            meta = ckpt.read_meta(m.dir / engine.CHECKPOINT)
        if meta is not None and not engine.same_run(meta, m.cfg, engine.read_json(m.dir / "config.json")):
            raise RunError(
                f"{m.dir} holds a run of another config; choose another --out, or pass --overwrite to replace it"
            )
        if meta is None and not a.overwrite and runfolder.RunFolder(m.dir).busy():
            if not (m.dir / engine.CONFIG).exists():
                runfolder.RunFolder(m.dir).check_new()  # not a run: refused, naming what it holds
            raise RunError(
                f"{m.dir} holds files but no checkpoint ({engine.CHECKPOINT} is missing), so it cannot "
                "continue; pass --overwrite to retrain the chosen cells (it removes only what ep_jax "
                "wrote there)"
            )
        summary = (engine.read_json(m.dir / "summary.json") or {}) if meta is not None else {}
        if meta is not None and (meta["epoch"] >= m.cfg.epochs or summary.get("status") == "diverged"):
            continue  # finished (or diverged: a rerun would diverge again, bit for bit)
        metas[m.name] = meta
        todo.append(m)
    groups = engine.group_members(todo)
    # a group with a checkpoint continues; the others start in new (empty) folders, or with
    # --overwrite replace them (the engine removes only what ep_jax wrote there)
    modes = [
        "resume" if any(metas[m.name] is not None for m in g.members) else "overwrite" if a.overwrite else "new"
        for g in groups
    ]
    for g, mode in zip(groups, modes):  # every group's folders, read-only, before any is changed
        engine.check_folders(g.members, mode)
    print(
        f"{a.table}: {len(ms)} runs in {len({m.dir.parent for m in ms})} cells, {len(todo)} to train "
        f"in {len(groups)} vmapped group(s) -> {out}",
        flush=True,
    )
    if groups and not a.no_estimate:
        print(
            f"estimating the time of {len(groups)} group(s) ({ESTIMATE_STEPS} timed steps each, after "
            "compiling them) ...",
            flush=True,
        )
        total = 0.0

        def report(g, s):
            nonlocal total
            left = g.cfg.epochs - min((metas[m.name] or {}).get("epoch", 0) for m in g.members)
            total += s * left
            print(
                f"  {g.members[0].dir.parent.name}: {g.M} seeds, ~{s:.1f} s per epoch x {left} epochs "
                f"= ~{s * left / 60:.1f} min",
                flush=True,
            )

        estimate(groups, engine.load_data, report)
        print(
            f"estimated time: ~{total / 60:.1f} min" + (f" (budget {a.budget:g} min)" if a.budget else ""), flush=True
        )
    out.mkdir(parents=True, exist_ok=True)  # what it writes here, recorded before it is written
    runfolder.record(out, ["results.md"], sorted({m.dir.parent.name for m in ms if m.dir.parent.parent == out}))
    deadline = t_start + 60 * a.budget if a.budget else None
    stopped = False
    try:
        for g, mode in zip(groups, modes):
            # members with a checkpoint continue it; the others (no checkpoint yet) start afresh
            engine.run(g.members, mode, progress=not a.no_progress, deadline=deadline, runtime=runtime.LOCAL)
    except Interrupted:
        stopped = True
    text = aggregate.report([out]) if out.exists() else ""
    if a.table == "table1" and out.exists():
        text += "\n" + stability.report([out])
    if text:
        ckpt.atomic_write_text(out / "results.md", f"# {a.table}" + (" (smoke)" if a.smoke else "") + "\n\n" + text)
        print(text)
    if stopped:
        print(
            f"stopped by --budget after {(time.time() - t_start) / 60:.1f} min; run the same command again "
            "(or with --resume) to continue"
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_wrapper(main))
