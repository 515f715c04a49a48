"""The lease command: as much of the missing GPU work as one ~9-minute call can do.

    bash benchmarks/lease.sh OUT              # on the GPU machine (benchmarks/README.md: the `run` call)
    bash benchmarks/lease.sh OUT --dry-run    # the same path on the CPU, tiny sizes, a few minutes

In priority order, each step with its own time budget, each writing as it goes:

(a) speed A/B of the relaxation implementations (`benchmarks/lease_speed.py`): XLA scan,
    scan unroll k in {2, 4, 8, full}, XLA command buffers with WHILE, the Pallas kernel; on
    MNIST DEP (one model, 128 members) and the HTS network (one model, 25 members). Rows
    go to `OUT/speed.json`; the table is printed last.
(b) Table 1 of paper 003 (HTS) on MNIST and Fashion-MNIST, 5 seeds per cell, through
    `experiments.reproduce table1` (cells sharing their structure train as one vmapped
    group) with the fastest library option of (a) (`--impl`, plus the command-buffer
    flags if they won), under `--budget`.
(c) Table 2's unfinished cells (`experiments.reproduce table2`).

Resumable across leases. Before (b) and (c) the run folders are seeded from the results
of earlier leases (`experiments/results/gpu-lease`, committed after
`python -m experiments.import_lease`) and their checkpoints (`.lease/resume`, carried);
cells whose every seed is finished there (or, for Table 2, in the earlier
`experiments/results/gpu-h200/table2`) are not trained again.

What comes back is at most 8 files: `lease.log` (written by lease.sh), `lease.json` (the
steps, their times and choices), `speed.json`, and the run folders packed as one gzip'd
tar in parts of at most 15 MiB (`lease.tgz.00` ...): every file except checkpoints, then
the checkpoints of unfinished cells (all seeds of a cell or none, most advanced first)
while they fit under `--resume-mb` (16 MiB: the next call carries them beside the 41 MB of
data, 64 MiB in all). `lease.json`'s step `pack` holds the archive's manifest (format
`ep_jax-lease` version 2: every part's name, size and SHA-256, the whole archive's, and
every packed file's), written after the parts; `experiments.import_lease` checks all of it
before writing anything. An HTS cell's five checkpoints are 33 MB and a Fashion-MNIST DEP
cell's 88 MB, so those cells resume across calls only on the same, still-warm machine: a
second call within its 30 s keeps `runs/lease` (git-ignored build outputs stay) and
continues there, e.g. `bash benchmarks/lease.sh $OUT --skip speed --budget 4`, with the
first call's choice of implementation (`runs/lease/choice.json`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20

#: (variant, XLA_FLAGS or None): run in this order until the speed budget is spent
VARIANTS = [
    ("xla", None),
    ("pallas", None),
    ("pallas16", None),
    ("cmdbuf", "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1"),
    ("unroll4", None),
    ("unroll8", None),
    ("unroll2", None),
    ("unrollfull", None),
]
#: variants the library can train with: (relaxation_impl, XLA_FLAGS)
LIBRARY = {
    "xla": ("xla", None),
    "pallas": ("pallas", None),
    "pallas16": ("pallas", None),
    "cmdbuf": ("xla", VARIANTS[3][1]),
}
BUDGETS = {"speed": 170, "table1": 230, "pack": 25}  # seconds; table2 gets the rest
DRY_BUDGETS = {"speed": 60, "table1": 60, "pack": 10}
DRY_VARIANTS = ["xla", "pallas", "unroll2"]  # cmdbuf: a GPU flag the CPU build rejects
DRY_WORKLOADS = "mnist-dep-1,hts-1"
TABLE1_DATASETS = ("mnist", "fmnist")
DRY_TABLE1 = ["mnist-hts-lognormal-dt0.25", "fmnist-hts-scalar-dt0.25"]


class Lease:
    """The state of one call: output folder, deadline, the manifest written as it goes."""

    def __init__(self, a):
        if a.budget is None:
            a.budget = 4.0 if a.dry_run else 9.0
        if a.seeds is None:
            a.seeds = 2 if a.dry_run else 5
        self.a = a
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.deadline = self.t0 + 60 * a.budget
        self.budgets = DRY_BUDGETS if a.dry_run else BUDGETS
        self.runs = Path(a.runs)
        self.manifest = {
            "dry_run": a.dry_run,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "budget_min": a.budget,
            "steps": {},
        }
        self.save()

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self):
        (self.out / "lease.json").write_text(json.dumps(self.manifest, indent=1))

    def step(self, name: str, **info):
        self.manifest["steps"].setdefault(name, {}).update(info)
        self.save()

    def sub(self, argv: list[str], timeout: float, flags: str | None = None) -> int:
        """Run `argv` with this Python, its output into ours (lease.sh tees it); killed at
        `timeout` seconds (what it wrote so far stays)."""
        env = dict(
            os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        )
        if flags:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        print(
            f"lease: $ {' '.join(argv)}  (timeout {timeout:.0f} s{', XLA_FLAGS=' + flags if flags else ''})", flush=True
        )
        try:
            return subprocess.run([sys.executable] + argv, env=env, timeout=max(1.0, timeout), cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            print(f"lease: stopped after {timeout:.0f} s (its budget)", flush=True)
            return 124


# --- what is finished ---------------------------------------------------------------------


def finished(run: Path) -> bool:
    from ep_jax.experiments.import_lease import finished_summary

    return finished_summary(run / "summary.json")


def finished_cells(table: str, roots: list[Path], seeds: int) -> set[str]:
    """Cells of `table` whose seeds 0..seeds-1 are all finished in one of `roots`."""
    out = set()
    for root in roots:
        base = root / table
        if not base.is_dir():
            continue
        for cell in base.iterdir():
            if cell.is_dir() and all(finished(cell / f"seed{s}") for s in range(seeds)):
                out.add(cell.name)
    return out


def seed_runs(L: Lease, table: str) -> int:
    """Copy the unfinished runs that have a carried checkpoint into the run folder: their
    files from the earlier lease's results, the checkpoint from `.lease/resume`."""
    resume, results, n = Path(L.a.resume_dir) / table, Path(L.a.results) / table, 0
    for ck in sorted(resume.rglob("checkpoint.msgpack")) if resume.is_dir() else []:
        rel = ck.parent.relative_to(resume)
        src, dst = results / rel, L.runs / table / rel
        if not src.is_dir() or finished(src):
            continue
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, dst / f.name)
        shutil.copy2(ck, dst / ck.name)
        n += 1
    return n


def pinned_impl(L: Lease, table: str) -> str | None:
    """The relaxation_impl of the resumed runs of `table` (a checkpoint resumes only under
    the config it was saved with)."""
    from ep_jax.experiments import files
    from ep_jax.experiments.errors import RunError

    for cfg in sorted((L.runs / table).rglob("config.json")):
        try:  # a regular file of bounded size (files.read_json), as every reader of run files
            d = files.read_json(cfg, "table") or {}
            # config.json files before the `solver` field name relaxation_impl
            solver = d.get("solver") if isinstance(d.get("solver"), str) else ""
            return "pallas" if solver.startswith("pallas") else d.get("relaxation_impl", "xla")
        except (OSError, RunError):
            continue
    return None


# --- (a) speed ------------------------------------------------------------------------------


def speed(L: Lease) -> list[dict]:
    rows_file = L.out / "speed.jsonl"
    rows_file.unlink(missing_ok=True)
    end = time.time() + min(L.budgets["speed"], L.left() - L.budgets["pack"])
    variants = [(v, f) for v, f in VARIANTS if not L.a.dry_run or v in DRY_VARIANTS]
    # variants without flags share a process (imports, data and init once); flags need their own
    plain = [v for v, f in variants if f is None]
    flagged = [(v, f) for v, f in variants if f is not None]
    groups = [(plain[:3], None)] + [([v], f) for v, f in flagged] + [(plain[3:], None)]
    if L.a.dry_run:  # one process: the dry run checks the path, not the numbers
        groups = [(plain, None)]
    shares = [0.5, 0.25, 0.25][: len(groups)] if not L.a.dry_run else [1.0]
    for i, (names, flags) in enumerate(groups):
        if not names or time.time() >= end - 5:
            continue
        # each process its share of what is left (an unused share rolls over to the next)
        stop = time.time() + (end - time.time()) * shares[i] / sum(shares[i:])
        argv = [
            "-m",
            "benchmarks.lease_speed",
            "--variants",
            ",".join(names),
            "--rows",
            str(rows_file),
            "--deadline",
            str(stop),
        ]
        if L.a.data_dir:
            argv += ["--data-dir", L.a.data_dir]
        if L.a.dry_run:
            argv += ["--dry-run", "--workloads", DRY_WORKLOADS]
        L.sub(argv, stop - time.time() + 20, flags)
    rows = [json.loads(l) for l in rows_file.read_text().splitlines()] if rows_file.exists() else []
    (L.out / "speed.json").write_text(json.dumps(rows, indent=1))
    rows_file.unlink(missing_ok=True)
    L.step("speed", seconds=round(time.time() - L.t0, 1), rows=len(rows))
    return rows


def fastest(rows: list[dict], workloads: list[str]) -> tuple[str, str | None, str, str]:
    """`(relaxation_impl, XLA_FLAGS, why, variant)`: the library option with the least time
    per step on the first of `workloads` that xla was measured on (xla when none was)."""
    ok = [r for r in rows if "error" not in r and "fallback" not in r and r["variant"] in LIBRARY]
    for w in workloads:
        cand = {r["variant"]: r["ms_per_step"] for r in ok if r["workload"] == w}
        if "xla" in cand:
            best = min(cand, key=cand.get)
            impl, flags = LIBRARY[best]
            return impl, flags, f"{best} on {w}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(cand.items())), best
    return "xla", None, "no speed rows: the default", "xla"


def speed_table(rows: list[dict]) -> str:
    works = list(dict.fromkeys(r["workload"] for r in rows))
    lines = ["| variant | " + " | ".join(f"{w} ms/step" for w in works) + " |", "|---|" + "---|" * len(works)]
    for v in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for w in works:
            r = next((r for r in rows if r["variant"] == v and r["workload"] == w), None)
            cells.append(
                "–"
                if r is None
                else "error"
                if "error" in r
                else f"{r['ms_per_step']:.3f}" + (" (xla fallback)" if "fallback" in r else "")
            )
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- (b), (c) tables -------------------------------------------------------------------------


def table(L: Lease, name: str, cells: list[str], impl: str, flags: str | None, seconds: float) -> int:
    if not cells:
        print(f"lease: {name}: every cell is finished", flush=True)
        L.step(name, cells=[], skipped="all finished")
        return 0
    seconds = min(seconds, L.left() - L.budgets["pack"])
    if seconds < 30:
        print(f"lease: {name}: no time left ({seconds:.0f} s)", flush=True)
        L.step(name, cells=cells, skipped="no time left")
        return 0
    argv = [
        "-m",
        "experiments.reproduce",
        name,
        "--seeds",
        str(L.a.seeds),
        "--cells",
        ",".join(cells),
        "--budget",
        f"{max(0.2, (seconds - 20) / 60):.2f}",
        "--out",
        str(L.runs / name),
        "--impl",
        impl,
        "--no-progress",
        "--no-estimate",
    ]
    if L.a.data_dir:
        argv += ["--data-dir", L.a.data_dir]
    if L.a.dry_run:
        argv += ["--smoke"]
    t = time.time()
    rc = L.sub(argv, seconds, flags)
    L.step(name, cells=cells, impl=impl, xla_flags=flags, rc=rc, seconds=round(time.time() - t, 1))
    return rc


def table1_cells(L: Lease) -> list[str]:
    from ep_jax.experiments.reproduce import cells

    done = finished_cells("table1", [Path(L.a.results)], L.a.seeds)
    names = [c for c, _ in cells("table1") if c.split("-hts")[0] in TABLE1_DATASETS and c not in done]
    return [c for c in names if c in DRY_TABLE1] if L.a.dry_run else names


def table2_cells(L: Lease) -> list[str]:
    from ep_jax.experiments.presets import PRESETS
    from ep_jax.experiments.reproduce import TABLE2_CELLS, available

    done = finished_cells("table2", [Path(L.a.results)] + [Path(p) for p in L.a.prior], L.a.seeds)
    names = [c for c in TABLE2_CELLS if c not in done and available(PRESETS[c]["dataset"], L.a.data_dir)]
    return names[:1] if L.a.dry_run else names


# --- packing ---------------------------------------------------------------------------------


def pack(L: Lease, resume_bytes: int, part_bytes: int = 15 * MIB, max_parts: int = 5) -> dict:
    """The run folders as `lease.tgz.NN` parts (module docstring)."""
    files, ckpts = [], {}
    if L.runs.is_dir():
        for f in sorted(L.runs.rglob("*")):
            if not f.is_file() or f.is_symlink() or f.name.endswith((".tmp", ".lock")):
                continue
            if f.name == "checkpoint.msgpack":
                if not finished(f.parent):
                    ckpts.setdefault(f.parent.parent, []).append(f)
            else:
                files.append(f)

    def progress(cell):
        eps = []
        from ep_jax.experiments import files
        from ep_jax.experiments.errors import RunError

        for ck in ckpts[cell]:
            try:
                eps.append(len((files.read_text(ck.parent / "metrics.jsonl") or "").splitlines()))
            except (OSError, RunError):
                eps.append(0)
        return min(eps)

    chosen, total = [], 0
    for cell in sorted(ckpts, key=progress, reverse=True):
        size = sum(f.stat().st_size for f in ckpts[cell])
        if total + size <= resume_bytes:
            chosen += ckpts[cell]
            total += size
    left_out = sorted(str(c.relative_to(L.runs)) for c in ckpts if ckpts[c][0] not in chosen)
    extra = [L.out / "speed.json", L.out / "lease.json"]

    def build(with_ckpts):
        """`(archive bytes, {name: {"bytes", "sha256"}} of what went in)`: each file read
        once, so its digest is that of the bytes packed."""
        buf, digests = io.BytesIO(), {}
        with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tf:
            for f, name in [(f, str(f.relative_to(L.runs))) for f in files + (with_ckpts or [])] + [
                (f, f.name) for f in extra if f.exists()
            ]:
                data = f.read_bytes()
                ti = tf.gettarinfo(f, arcname=name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
                digests[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return buf.getvalue(), digests

    blob, digests = build(chosen)
    if len(blob) > part_bytes * max_parts:  # checkpoints compress little: drop them
        left_out += sorted({str(c.parent.parent.relative_to(L.runs)) for c in chosen})
        chosen = []
        blob, digests = build([])
    too_big = len(blob) > part_bytes * max_parts
    if too_big:  # never a cut archive (the importer refuses one): lease.json and lease.log say why
        print(
            f"lease: the run files alone take {len(blob) / MIB:.1f} MiB, more than {max_parts} parts: nothing packed",
            flush=True,
        )
        blob, digests = b"", {}
    for old in L.out.glob("lease.tgz.*"):
        old.unlink()
    parts = [blob[i : i + part_bytes] for i in range(0, len(blob), part_bytes)]
    for i, p in enumerate(parts):
        (L.out / f"lease.tgz.{i:02d}").write_bytes(p)
    # the manifest experiments.import_lease checks every part and file against
    archive = {
        "format": "ep_jax-lease",
        "version": 2,
        "bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "parts": [
            {"name": f"lease.tgz.{i:02d}", "bytes": len(p), "sha256": hashlib.sha256(p).hexdigest()}
            for i, p in enumerate(parts)
        ],
        "files": digests,
    }
    info = {
        "files": len(files),
        "checkpoints": len(chosen),
        "bytes": len(blob),
        "parts": len(parts),
        "cells_without_checkpoint": left_out,
    }
    if too_big:
        info["error"] = "the run files alone exceed the parts' room: nothing packed"
    L.step("pack", **info, archive=archive if parts else None)
    return info


def parser():
    p = argparse.ArgumentParser(
        prog="bash benchmarks/lease.sh OUT", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="the folder whose files come back ($OUT on the GPU machine)")
    p.add_argument("--dry-run", action="store_true", help="the same path on the CPU, tiny sizes")
    p.add_argument("--budget", type=float, help="minutes of wall time in all (default 9; dry run 4)")
    p.add_argument("--seeds", type=int, help="seeds per cell (default 5; dry run 2)")
    p.add_argument("--data-dir", default=".lease/data", help="the carried datasets (benchmarks/prepare_lease.sh)")
    p.add_argument("--runs", default="runs/lease", help="where this call trains (git-ignored)")
    p.add_argument("--results", default="experiments/results/gpu-lease", help="earlier leases' imported results")
    p.add_argument("--resume-dir", default=".lease/resume", help="earlier leases' checkpoints (carried)")
    p.add_argument(
        "--prior",
        action="append",
        default=["experiments/results/gpu-h200"],
        help="older result folders whose finished Table-2 cells are skipped",
    )
    p.add_argument(
        "--resume-mb",
        type=float,
        default=16.0,
        help="checkpoint MiB to bring back (the next call carries them beside 41 MB of data; default 16)",
    )
    p.add_argument("--skip", default="", help="comma-separated steps to skip: speed, table1, table2")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.data_dir and not Path(a.data_dir).is_dir():
        a.data_dir = None  # the default search (the dry run in CI: Debian's Fashion-MNIST)
    os.chdir(ROOT)
    L = Lease(a)
    skip = set(filter(None, a.skip.split(",")))
    import jax

    L.step("machine", jax=jax.__version__, devices=[str(d) for d in jax.devices()], backend=jax.default_backend())
    print(f"lease: {'dry run, ' if a.dry_run else ''}budget {a.budget:g} min, {jax.devices()}", flush=True)
    try:
        rows = run_steps(L, skip)
    finally:  # whatever happened, bring back what there is
        L.manifest["seconds"] = round(time.time() - L.t0, 1)
        info = pack(L, int(a.resume_mb * MIB))
    print(
        f"lease: packed {info['files']} files and {info['checkpoints']} checkpoints into {info['parts']} "
        f"part(s), {info['bytes'] / MIB:.1f} MiB; cells without checkpoint: {info['cells_without_checkpoint'] or 'none'}"
    )
    print(f"lease: done in {time.time() - L.t0:.0f} s; import with: python -m experiments.import_lease <files folder>")
    print()
    print(speed_table(rows) if rows else "(no speed rows)")
    return 0


def block_rows(variant: str):
    """`pallasN` won: the table's subprocess runs the kernel with N rows per program."""
    os.environ.pop("EP_JAX_PALLAS_BLOCK_B", None)
    if variant.startswith("pallas") and variant[len("pallas") :]:
        os.environ["EP_JAX_PALLAS_BLOCK_B"] = variant[len("pallas") :]


def run_steps(L: Lease, skip: set) -> list[dict]:
    """Steps (a), (b), (c) in order; returns the speed rows."""
    rows = speed(L) if "speed" not in skip else []
    impl1, flags1, why1, best1 = fastest(rows, ["hts-25", "hts-1"])
    impl2, flags2, why2, best2 = fastest(rows, ["mnist-dep-128", "mnist-dep-1"])
    choice = L.runs / "choice.json"  # a second call on the still-warm machine keeps the first's choice
    if not rows and choice.exists():
        impl1, flags1, why1, best1, impl2, flags2, why2, best2 = json.loads(choice.read_text())
        why1, why2 = f"kept from the previous call ({why1})", f"kept from the previous call ({why2})"
    elif rows:
        L.runs.mkdir(parents=True, exist_ok=True)
        choice.write_text(json.dumps([impl1, flags1, why1, best1, impl2, flags2, why2, best2]))
    L.step("choice", table1=[impl1, flags1, why1], table2=[impl2, flags2, why2])
    if "table1" not in skip:
        n = seed_runs(L, "table1")
        pinned = pinned_impl(L, "table1")
        if pinned and pinned != impl1:
            why1, impl1 = f"{pinned}: the resumed runs' ({why1} would pick {impl1})", pinned
        print(f"lease: Table 1 trains with {impl1}{' + ' + flags1 if flags1 else ''} ({why1})", flush=True)
        L.step("table1", resumed_runs=n)
        block_rows(best1)
        table(L, "table1", table1_cells(L), impl1, flags1, L.budgets["table1"])
    if "table2" not in skip:
        n = seed_runs(L, "table2")
        impl2 = pinned_impl(L, "table2") or impl2
        print(f"lease: Table 2 trains with {impl2}{' + ' + flags2 if flags2 else ''} ({why2})", flush=True)
        L.step("table2", resumed_runs=n)
        block_rows(best2)
        table(L, "table2", table2_cells(L), impl2, flags2, L.left() - L.budgets["pack"])
    return rows


if __name__ == "__main__":
    sys.exit(main())
