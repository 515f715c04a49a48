"""The lease command's dry run (benchmarks/lease.sh --dry-run) and experiments.import_lease."""

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import lease  # noqa: E402
from ep_jax.experiments import import_lease  # noqa: E402
from ep_jax.experiments.reproduce import available  # noqa: E402


def run_import(*argv, subprocess_=False):
    """`python -m experiments.import_lease ARGV` (in this process unless `subprocess_`)."""
    if subprocess_:
        return subprocess.run(
            [sys.executable, "-m", "experiments.import_lease", *map(str, argv)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    from ep_jax.experiments import cli

    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = cli.main_wrapper(import_lease.main, list(map(str, argv)))
    return subprocess.CompletedProcess(argv, rc, o.getvalue(), e.getvalue())


@pytest.mark.skipif(not available("fashion_mnist"), reason="no Fashion-MNIST offline (CI installs Debian's)")
def test_dry_run_then_import(tmp_path):
    out, runs, results, resume = (tmp_path / n for n in ("out", "runs", "results", "resume"))
    p = subprocess.run(
        [
            "bash",
            "benchmarks/lease.sh",
            str(out),
            "--dry-run",
            "--runs",
            str(runs),
            "--results",
            str(results),
            "--resume-dir",
            str(resume),
            "--data-dir",
            str(tmp_path / "no-such"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    names = sorted(f.name for f in out.iterdir())
    assert len(names) <= 8 and {"lease.log", "lease.json", "speed.json", "lease.tgz.00"} <= set(names), names
    assert all(f.stat().st_size <= 16 << 20 for f in out.iterdir())
    rows = json.loads((out / "speed.json").read_text())
    ok = {r["variant"] for r in rows if "error" not in r}
    assert {"xla", "pallas"} <= ok, rows
    # the kernel ran (emulated), no fallback, and trained the same parameters as the XLA path
    by = {(r["variant"], r["workload"]): r for r in rows if "error" not in r}
    for (v, w), r in by.items():
        if v == "pallas":
            assert "fallback" not in r, r
            ref = by[("xla", w)]["params_checksum"]
            assert abs(r["params_checksum"] - ref) <= 1e-4 * max(1.0, abs(ref)), (r, ref)
    manifest = json.loads((out / "lease.json").read_text())
    assert manifest["dry_run"] and manifest["steps"]["pack"]["parts"] >= 1
    assert "| variant |" in p.stdout.splitlines()[-4] or "| variant |" in p.stdout  # the table last

    r = run_import(out, "--dest", results, "--resume-dir", resume, subprocess_=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("imported ")
    summaries = sorted(results.rglob("summary.json"))
    assert summaries and all(import_lease.finished_summary(s) for s in summaries)
    assert (results / "table1" / "results.md").exists() and (results / "speed.json").exists()
    assert not list(results.rglob("checkpoint.msgpack"))  # checkpoints never go to the results
    before = {f: f.read_bytes() for f in results.rglob("*") if f.is_file()}
    assert run_import(out / "lease.tgz.00", "--dest", results, "--resume-dir", resume).returncode == 0
    assert {f: f.read_bytes() for f in results.rglob("*") if f.is_file()} == before

    # the next lease skips the finished cells
    a = lease.parser().parse_args(
        [
            "--out",
            str(tmp_path / "out2"),
            "--dry-run",
            "--results",
            str(results),
            "--seeds",
            "2",
            "--runs",
            str(tmp_path / "runs2"),
        ]
    )
    assert lease.table1_cells(lease.Lease(a)) == [c for c in lease.DRY_TABLE1 if not (results / "table1" / c).is_dir()]


def fake_run(folder: Path, status: str, epochs_done: int, epochs: int = 3, ckpt: bytes | None = None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"epochs": epochs, "relaxation_impl": "pallas"}))
    (folder / "summary.json").write_text(json.dumps({"status": status, "epochs_done": epochs_done}))
    (folder / "metrics.jsonl").write_text("{}\n" * epochs_done)
    if ckpt is not None:
        (folder / "checkpoint.msgpack").write_bytes(ckpt)


def test_pack_import_and_resume_round_trip(tmp_path):
    runs = tmp_path / "runs"
    a1 = os.urandom(2000)  # random bytes: they do not compress, as float32 weights hardly do
    fake_run(runs / "table1" / "cellA" / "seed0", "interrupted", 2, ckpt=os.urandom(2000))
    fake_run(runs / "table1" / "cellA" / "seed1", "interrupted", 2, ckpt=a1)
    fake_run(runs / "table1" / "cellB" / "seed0", "interrupted", 1, ckpt=os.urandom(2000))  # does not fit
    fake_run(runs / "table1" / "cellC" / "seed0", "ok", 3, ckpt=os.urandom(2000))  # finished: no ckpt
    out = tmp_path / "out"
    a = lease.parser().parse_args(["--out", str(out), "--runs", str(runs)])
    L = lease.Lease(a)
    info = lease.pack(L, resume_bytes=5000, part_bytes=2000)  # tiny parts: the split is exercised
    assert info["checkpoints"] == 2 and info["cells_without_checkpoint"] == ["table1/cellB"]
    assert info["parts"] > 1 and sorted(out.glob("lease.tgz.*"))[-1].name == f"lease.tgz.{info['parts'] - 1:02d}"

    results, resume = tmp_path / "results", tmp_path / "resume"
    r = run_import(out / "lease.tgz.01", "--dest", results, "--resume-dir", resume)  # any part will do
    assert r.returncode == 0, r.stderr
    assert sorted(str(p.relative_to(resume)) for p in resume.rglob("checkpoint.msgpack")) == [
        "table1/cellA/seed0/checkpoint.msgpack",
        "table1/cellA/seed1/checkpoint.msgpack",
    ]
    assert (results / "table1" / "cellB" / "seed0" / "summary.json").exists()

    # the next lease: the checkpointed runs go back into its run folder, with their impl pinned
    b = lease.parser().parse_args(
        [
            "--out",
            str(tmp_path / "out2"),
            "--runs",
            str(tmp_path / "runs2"),
            "--results",
            str(results),
            "--resume-dir",
            str(resume),
        ]
    )
    L2 = lease.Lease(b)
    assert lease.seed_runs(L2, "table1") == 2
    assert (tmp_path / "runs2" / "table1" / "cellA" / "seed1" / "checkpoint.msgpack").read_bytes() == a1
    assert lease.pinned_impl(L2, "table1") == "pallas"
    assert lease.finished_cells("table1", [results], 1) == {"cellC"}

    # once a later lease finished cellA, importing it removes the stale checkpoints
    (runs / "table1" / "cellA" / "seed0" / "summary.json").write_text(json.dumps({"status": "ok", "epochs_done": 3}))
    (runs / "table1" / "cellA" / "seed1" / "summary.json").write_text(json.dumps({"status": "ok", "epochs_done": 3}))
    lease.pack(L, resume_bytes=5000)
    r = run_import(out, "--dest", results, "--resume-dir", resume)
    assert r.returncode == 0 and "2 stale removed" in r.stdout, r.stdout + r.stderr
    # ... and cellB's checkpoint now fits beside the others
    assert [str(p.relative_to(resume)) for p in resume.rglob("checkpoint.msgpack")] == [
        "table1/cellB/seed0/checkpoint.msgpack"
    ]


@pytest.mark.parametrize(
    "name,kind", [("../evil.txt", "file"), ("/abs/evil.txt", "file"), ("a/../../evil.txt", "file"), ("link", "symlink")]
)
def test_import_refuses_unsafe_members(tmp_path, name, kind):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        ok = tarfile.TarInfo("table1/c/seed0/summary.json")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"{}"))
        m = tarfile.TarInfo(name)
        if kind == "symlink":
            m.type, m.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(m)
        else:
            m.size = 4
            tf.addfile(m, io.BytesIO(b"evil"))
    arc = tmp_path / "lease.tgz"
    arc.write_bytes(buf.getvalue())
    dest = tmp_path / "dest"
    r = run_import(arc, "--dest", dest, "--resume-dir", tmp_path / "resume")
    assert r.returncode == 2 and r.stderr.startswith("error: refusing archive member"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not dest.exists() and not (tmp_path / "evil.txt").exists()


def test_import_one_line_errors(tmp_path):
    r = run_import(tmp_path / "missing")
    assert r.returncode == 2 and "no such file or folder" in r.stderr and len(r.stderr.splitlines()) == 1
    (tmp_path / "lease.tgz.00").write_bytes(b"not a tar")
    r = run_import(tmp_path)
    assert r.returncode == 2 and "not a complete lease archive" in r.stderr and len(r.stderr.splitlines()) == 1


def test_fastest_library_option_ignores_fallbacks_and_benchmark_only_variants():
    rows = [
        {"variant": "xla", "workload": "hts-1", "ms_per_step": 1.0},
        {"variant": "pallas", "workload": "hts-1", "ms_per_step": 0.4, "fallback": "did not lower"},
        {"variant": "unroll8", "workload": "hts-1", "ms_per_step": 0.1},  # no library option
        {"variant": "cmdbuf", "workload": "hts-1", "ms_per_step": 0.7},
        {"variant": "pallas16", "workload": "hts-25", "error": "OOM"},
    ]
    impl, flags, why, best = lease.fastest(rows, ["hts-25", "hts-1"])
    assert (impl, best) == ("xla", "cmdbuf") and "WHILE" in flags and "hts-1" in why
    assert lease.fastest([], ["hts-1"])[:2] == ("xla", None)
    table = lease.speed_table(rows)
    assert "0.400 (xla fallback)" in table and "error" in table
