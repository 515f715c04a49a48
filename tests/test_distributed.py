"""Multi-process training and sweeps on `jax.distributed` (experiments.distributed,
ep_jax.parallel), with real processes on this machine.

Two local processes, each with two CPU devices (`--xla_force_host_platform_device_count=2`),
join one `jax.distributed` job (gloo collectives): 4 devices in all, so a single run's
batch is split over devices of both processes, and a sweep's members over the processes
with each member's batch over the process's two devices. Every process is started with a
timeout, in its own process group, and killed on any failure. The references (one
process, one device) are computed in this process.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import numpy as np
import pytest

import ep_jax
from ep_jax import parallel
from experiments import engine
from experiments.config import RunConfig, validate

ROOT = Path(__file__).resolve().parents[1]
PEER_TIMEOUT = 10

# one small dendritic run: 192 examples in 12 batches of 16 (divisible by 4 devices, no
# partial batch), two chunks of 6 steps, 64 test examples
BASE = dict(
    dataset="synthetic",
    sizes=[16, 12, 4],
    synthetic_train=192,
    synthetic_test=64,
    synthetic_noise=0.3,
    t_free=10,
    t_nudge=4,
    batch_size=16,
    chunk=6,
    eval_batch=64,
    lr=[0.3, 0.1],
    beta=0.3,
    epochs=2,
    model="ep",
)
A = dict(BASE, seed=0)
B = dict(BASE, seed=1, lr=[0.2, 0.05], beta=0.2)


def cfg(d, **kw):
    return validate(RunConfig.from_dict({**d, **kw}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices=2):
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        PYTHONUNBUFFERED="1",
        JAX_PLATFORMS="cpu",
    )
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    for k in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "EP_JAX_DISTRIBUTED",
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        "SLURM_PROCID",
    ):
        env.pop(k, None)
    return env


@contextmanager
def processes(cmds, logs, env):
    """Start `cmds` (one per process; `env` one dict or one per process), each in its own
    process group with stdout/stderr in `logs`; kill whatever is still running on the way out."""
    procs = []
    envs = env if isinstance(env, list) else [env] * len(cmds)
    try:
        for cmd, log, e in zip(cmds, logs, envs):
            procs.append(
                subprocess.Popen(
                    cmd, cwd=ROOT, env=e, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)


def wait_all(procs, timeout):
    """Exit codes, or None for a process still running after `timeout` seconds."""
    end = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            out.append(p.wait(max(0.1, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            out.append(None)
    return out


def tail(log, n=3000):
    return Path(log).read_text()[-n:] if Path(log).exists() else "(no log)"


def params_of(run_dir):
    return engine.load_run(run_dir)[3]


def metrics_of(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def assert_params_close(a, b, rtol=2e-4, atol=2e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


# --- the two-process job --------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys, time
    from argparse import Namespace
    from pathlib import Path
    args = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    from experiments import distributed as dist
    dist.setup(Namespace(distributed=True, coordinator=args["coordinator"], num_processes=2,
                         process_id=args["pid"], member_shards=None, peer_timeout=args["peer_timeout"]))
    import jax, numpy as np
    import ep_jax
    from ep_jax import parallel
    from experiments import checkpoint as ckpt, engine
    from experiments.config import RunConfig, validate
    t_init = time.perf_counter() - t0
    writes = []
    real_write = ckpt.atomic_write
    ckpt.atomic_write = lambda path, data: (writes.append(str(path)), real_write(path, data))[1]
    out = Path(args["out"])
    A = validate(RunConfig.from_dict(args["A"]))
    B = validate(RunConfig.from_dict(args["B"]))
    rep = {"pid": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
           "local_devices": jax.local_device_count(), "init_s": t_init}

    # the library: each process loads only its rows of every global batch
    model = ep_jax.build_model("ep", sizes=(16, 12, 4))
    est = ep_jax.Estimator("symmetric", t_free=10, t_nudge=4)
    opt = ep_jax.optim.sgd(model, lr=[0.2, 0.1], momentum=0.9)
    mesh = parallel.make_mesh()
    step = parallel.data_parallel_step(model, est, opt, mesh)
    state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0))
    rx = ep_jax.make_relaxation(model, beta=0.2)
    state, rx = parallel.put((state, rx), mesh)
    rows = parallel.process_rows(mesh, 16)
    rep["rows"] = [rows.start, rows.stop]
    for t in range(3):
        kx, ky = jax.random.split(jax.random.PRNGKey(100 + t))
        x = np.asarray(jax.random.uniform(kx, (16, 16)))
        y = np.asarray(jax.random.randint(ky, (16,), 0, 4))
        xg, yg = parallel.global_batch(mesh, x[rows], y[rows])
        state, info = step(parallel.put(jax.random.fold_in(jax.random.PRNGKey(9), t), mesh), state, xg, yg, rx)
    np.savez(out / f"lib{rep['pid']}.npz", *[np.asarray(l) for l in jax.tree.leaves(state.params)],
             loss=np.asarray(info.loss), correct=np.asarray(info.correct))

    # the engine: one run (its batch over all 4 devices), one epoch then --resume to two
    rep["layout_run"] = dist.layout(1, A.batch_size, A.n_train())
    t = time.perf_counter()
    engine.run([engine.Member(A.replace(epochs=1), "A", out / "run" / "A")], "new", progress=False)
    engine.run([engine.Member(A, "A", out / "run" / "A")], "resume", progress=False)
    rep["run_s"] = time.perf_counter() - t
    # a sweep of two members: one per process, each member's batch over its process's devices
    rep["layout_sweep"] = dist.layout(2, A.batch_size, A.n_train())
    t = time.perf_counter()
    engine.run([engine.Member(A, "A", out / "sweep" / "A"), engine.Member(B, "B", out / "sweep" / "B")], "new",
               progress=False)
    rep["sweep_s"] = time.perf_counter() - t
    rep["writes"] = len(writes)
    (out / f"report{rep['pid']}.json").write_text(json.dumps(rep))
    sys.exit(dist.finish(0))
""")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    port = free_port()
    cmds = [
        [
            sys.executable,
            "-c",
            CHILD,
            json.dumps(dict(coordinator=f"127.0.0.1:{port}", pid=i, out=str(out), A=A, B=B, peer_timeout=PEER_TIMEOUT)),
        ]
        for i in range(2)
    ]
    logs = [out / f"log{i}.txt" for i in range(2)]
    t0 = time.perf_counter()
    with processes(cmds, logs, child_env(2)) as procs:
        codes = wait_all(procs, 240)
    wall = time.perf_counter() - t0
    assert codes == [0, 0], f"exit codes {codes}\n--- process 0:\n{tail(logs[0])}\n--- process 1:\n{tail(logs[1])}"
    reports = [json.loads((out / f"report{i}.json").read_text()) for i in range(2)]
    print(
        f"\n2 processes x 2 CPU devices: wall {wall:.1f} s; "
        + "; ".join(
            f"process {r['pid']}: init {r['init_s']:.1f} s, run (1+1 epochs) {r['run_s']:.1f} s, sweep of 2 "
            f"{r['sweep_s']:.1f} s"
            for r in reports
        )
    )
    return out, reports


def test_two_processes_form_one_job(two_processes):
    _, reports = two_processes
    for i, r in enumerate(reports):
        assert (r["pid"], r["processes"], r["devices"], r["local_devices"]) == (i, 2, 4, 2)
    # one run: its batch over the 4 devices; the sweep: a member per process, its batch over 2
    assert [tuple(r["layout_run"]) for r in reports] == [(1, 4)] * 2
    assert [tuple(r["layout_sweep"]) for r in reports] == [(2, 2)] * 2
    assert [r["rows"] for r in reports] == [[0, 8], [8, 16]]


def test_process_local_batches_equal_one_process_on_the_global_batch(two_processes):
    out, _ = two_processes
    model = ep_jax.build_model("ep", sizes=(16, 12, 4))
    est = ep_jax.Estimator("symmetric", t_free=10, t_nudge=4)
    opt = ep_jax.optim.sgd(model, lr=[0.2, 0.1], momentum=0.9)
    state = ep_jax.init_state(model, est, opt, jax.random.PRNGKey(0))
    rx = ep_jax.make_relaxation(model, beta=0.2)
    init = jax.tree.leaves(state.params)
    for t in range(3):
        kx, ky = jax.random.split(jax.random.PRNGKey(100 + t))
        x, y = jax.random.uniform(kx, (16, 16)), jax.random.randint(ky, (16,), 0, 4)
        state, info = ep_jax.train_step_jit(
            model, est, opt, jax.random.fold_in(jax.random.PRNGKey(9), t), state, x, y, rx
        )
    got = [np.load(out / f"lib{i}.npz") for i in range(2)]
    for i, leaf in enumerate(jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(got[0][f"arr_{i}"], got[1][f"arr_{i}"])  # replicated on both
        np.testing.assert_allclose(got[0][f"arr_{i}"], leaf, rtol=1e-5, atol=1e-6)
        assert not np.allclose(leaf, init[i])
    np.testing.assert_allclose(got[0]["loss"], info.loss, rtol=1e-5)
    assert int(got[0]["correct"]) == int(info.correct)


@pytest.fixture(scope="module")
def solo(tmp_path_factory):
    """Each member trained alone, in this process (one device)."""
    out = tmp_path_factory.mktemp("solo")
    t0 = time.perf_counter()
    for name, d in (("A", A), ("B", B)):
        engine.run([engine.Member(cfg(d), name, out / name)], "new", progress=False, print_fn=lambda *a: None)
    print(f"\n1 process x 1 CPU device: runs A and B (2 epochs each) {time.perf_counter() - t0:.1f} s")
    return out


def test_run_on_two_processes_equals_one_process(two_processes, solo):
    out, reports = two_processes
    run = out / "run" / "A"
    assert_params_close(params_of(run), params_of(solo / "A"))
    got, ref = metrics_of(run), metrics_of(solo / "A")
    assert [m["epoch"] for m in got] == [1, 2] and [m["steps"] for m in got] == [12, 24]
    for g, r in zip(got, ref):
        assert g["train_acc"] == r["train_acc"] and g["test_acc"] == r["test_acc"]
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5)
    assert json.loads((run / "summary.json").read_text())["status"] == "ok"
    # process 0 alone wrote the run files
    assert reports[0]["writes"] > 0 and reports[1]["writes"] == 0


def test_sweep_over_two_processes_gives_each_members_solo_result(two_processes, solo):
    out, _ = two_processes
    for name in ("A", "B"):
        assert_params_close(params_of(out / "sweep" / name), params_of(solo / name))
        got, ref = metrics_of(out / "sweep" / name), metrics_of(solo / name)
        assert [g["test_acc"] for g in got] == [r["test_acc"] for r in ref]
    # the members differ (else the comparison proves little)
    assert not np.allclose(jax.tree.leaves(params_of(solo / "A"))[0], jax.tree.leaves(params_of(solo / "B"))[0])


def test_two_processes_refuse_together(two_processes, tmp_path):
    """Both processes find the run folder taken: each says so in one line, exit 2, no hang."""
    out, _ = two_processes
    run = out / "run" / "A"
    before = (run / "metrics.jsonl").read_text()
    logs = [tmp_path / f"log{i}.txt" for i in range(2)]
    with processes(_train_cmds(free_port(), [*_sets(A), "--out", str(run)]), logs, child_env(1)) as procs:
        codes = wait_all(procs, 120)
    assert codes == [2, 2], f"{tail(logs[0])}\n{tail(logs[1])}"
    for log in logs:
        errors = [l for l in Path(log).read_text().splitlines() if l.startswith("error:")]
        assert len(errors) == 1 and "already holds a run: pass --resume" in errors[0], tail(log)
    assert (run / "metrics.jsonl").read_text() == before


# --- without other processes: layout, refusals -----------------------------------------------


def test_sweep_layout():
    assert parallel.sweep_layout(4, 2, [16]) == (2, 2)
    assert parallel.sweep_layout(4, 1, [16, 8]) == (1, 4)
    assert parallel.sweep_layout(4, 3, [16]) == (1, 4)
    assert parallel.sweep_layout(4, 8, [6]) == (4, 1)
    assert parallel.sweep_layout(4, 4, [6], member_shards=2) == (2, 2)
    with pytest.raises(ValueError, match="do not divide over 2 data shards"):
        parallel.sweep_layout(4, 4, [16, 5], member_shards=2)
    with pytest.raises(ValueError, match="3 member.s. do not divide over 2 member shards"):
        parallel.sweep_layout(4, 3, [16], member_shards=2)
    with pytest.raises(ValueError, match="do not fit 4 devices"):
        parallel.sweep_layout(4, 3, [6])


def test_one_process_mesh_path_equals_plain_engine(tmp_path):
    """`--distributed` with one process and one device: the mesh code path gives the
    plain engine's numbers (the layout (1, 1): no collective changes anything)."""
    from argparse import Namespace

    from experiments import distributed as dist

    c = cfg(A, epochs=1)
    engine.run([engine.Member(c, "plain", tmp_path / "plain")], "new", progress=False, print_fn=lambda *a: None)
    assert not dist.active()
    try:
        assert dist.setup(
            Namespace(
                distributed=True,
                coordinator=None,
                num_processes=1,
                process_id=None,
                member_shards=None,
                peer_timeout=None,
            )
        )
        assert dist.active() and dist.is_main() and not dist.multi()
        engine.run([engine.Member(c, "mesh", tmp_path / "mesh")], "new", progress=False, print_fn=lambda *a: None)
    finally:
        dist._STATE.update(on=False, member_shards=None)
    assert_params_close(params_of(tmp_path / "mesh"), params_of(tmp_path / "plain"), rtol=1e-6, atol=1e-7)
    assert [m["test_acc"] for m in metrics_of(tmp_path / "mesh")] == [
        m["test_acc"] for m in metrics_of(tmp_path / "plain")
    ]


def _cli(args, devices=2, timeout=120):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=child_env(devices), capture_output=True, text=True, timeout=timeout
    )


def _sets(d):
    return [a for k, v in d.items() for a in ("--set", f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}")]


def test_commands_refuse_what_does_not_divide(tmp_path):
    """One process with 2 devices: a batch of 15 does not split over them; a sweep of 3
    members does not split over --member-shards 2. One error line, exit 2, nothing written."""
    r = _cli(
        [
            "-m",
            "experiments.train",
            *_sets(dict(A, batch_size=15)),
            "--out",
            str(tmp_path / "run"),
            "--distributed",
            "--num-processes",
            "1",
            "--no-progress",
        ]
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("error: --distributed") and "[12, 15] do not fit 2 devices" in lines[0]
    ), r.stderr
    assert not (tmp_path / "run").exists()

    spec = tmp_path / "three.toml"
    spec.write_text("\n".join([f"{k} = {json.dumps(v)}" for k, v in A.items()] + ["[grid]", "seed = [0, 1, 2]"]) + "\n")
    r = _cli(
        [
            "-m",
            "experiments.sweep",
            str(spec),
            "--out",
            str(tmp_path / "sweep"),
            "--distributed",
            "--num-processes",
            "1",
            "--member-shards",
            "2",
            "--no-progress",
        ]
    )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "the 3 member(s) do not divide over 2 member shards" in lines[0], r.stderr
    assert not (tmp_path / "sweep").exists()


def test_distributed_without_a_coordinator_says_what_to_give(tmp_path):
    env = dict(child_env(1), EP_JAX_DISTRIBUTED="1")
    r = subprocess.run(
        [sys.executable, "-m", "experiments.train", *_sets(A), "--out", str(tmp_path / "run"), "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: --distributed: coordinator_address should be defined: give --coordinator HOST:PORT"
    ), r.stderr
    assert not (tmp_path / "run").exists()


# --- a process dies mid-run ------------------------------------------------------------------


def _train_cmds(port, args):
    return [
        [
            sys.executable,
            "-m",
            "experiments.train",
            *args,
            "--distributed",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
            "--peer-timeout",
            str(PEER_TIMEOUT),
            "--no-progress",
        ]
        for i in range(2)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_killed_process_stops_the_other_and_resume_continues(tmp_path, victim):
    """SIGKILL one of two processes after its first checkpointed epoch: the other stops
    within a bounded time with an error (no hang); both restarted with --resume finish the
    run with the numbers of an uninterrupted one."""
    epochs = 40
    d = dict(A, epochs=epochs, synthetic_train=384, model="dendritic", basal_branches=4, apical_branches=2)
    run = tmp_path / "run"
    args = [*_sets(d), "--out", str(run)]
    logs = [tmp_path / f"log{i}.txt" for i in range(2)]
    with processes(_train_cmds(free_port(), args), logs, child_env(1)) as procs:
        end = time.monotonic() + 180
        while time.monotonic() < end and not ((run / "metrics.jsonl").exists() and metrics_of(run)):
            assert all(p.poll() is None for p in procs), f"{tail(logs[0])}\n{tail(logs[1])}"
            time.sleep(0.2)
        done = len(metrics_of(run))
        assert 1 <= done < epochs, "the run must still be going when the process is killed"
        os.killpg(procs[victim].pid, signal.SIGKILL)
        t_kill = time.monotonic()
        survivor = procs[1 - victim]
        code = wait_all([survivor], PEER_TIMEOUT + 30)[0]
        stopped_after = time.monotonic() - t_kill
    log = Path(logs[1 - victim]).read_text()
    assert code not in (None, 0), f"the survivor did not stop: {tail(logs[1 - victim])}"
    assert stopped_after < PEER_TIMEOUT + 30
    if victim == 1:  # process 0 sees the failed collective and says so
        assert code == 2, log[-3000:]
        assert "error: lost contact with another process of this distributed run" in log
        assert json.loads((run / "summary.json").read_text())["status"] == "failed"
    else:  # process 1 loses the coordinator: JAX ends it with its own message
        assert "another task died" in log or "error: lost contact" in log, log[-3000:]
    print(f"\nvictim process {victim}: the other stopped {stopped_after:.1f} s later with exit code {code}")

    kept = len(metrics_of(run))
    assert kept >= done
    logs2 = [tmp_path / f"resume{i}.txt" for i in range(2)]
    # this time the job comes from the environment, as a launcher would set it
    port = free_port()
    cmd = [sys.executable, "-m", "experiments.train", "--resume", "--out", str(run), "--no-progress"]
    envs = [
        dict(
            child_env(1),
            EP_JAX_DISTRIBUTED="1",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
            EP_JAX_PEER_TIMEOUT=str(PEER_TIMEOUT),
        )
        for i in range(2)
    ]
    with processes([cmd, cmd], logs2, envs) as procs:
        codes = wait_all(procs, 240)
    assert codes == [0, 0], f"{tail(logs2[0])}\n{tail(logs2[1])}"
    got = metrics_of(run)
    assert [m["epoch"] for m in got] == list(range(1, epochs + 1))
    ref = tmp_path / "ref"
    engine.run([engine.Member(cfg(d), "ref", ref)], "new", progress=False, print_fn=lambda *a: None)
    assert_params_close(params_of(run), params_of(ref))
    assert [m["test_acc"] for m in got] == [m["test_acc"] for m in metrics_of(ref)]


# --- start-up checks: every process must be started alike ---------------------------------------


def test_coordinator_port_in_use_is_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _cli(
            [
                "-m",
                "experiments.train",
                *_sets(A),
                "--out",
                str(tmp_path / "run"),
                "--distributed",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                "0",
                "--no-progress",
            ],
            devices=1,
            timeout=120,
        )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} is already in use" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def _two(tmp_path, per_process_args, nums=(2, 2), timeout=150):
    port = free_port()
    run = tmp_path / "run"
    cmds = [
        [
            sys.executable,
            "-m",
            "experiments.train",
            *_sets(A),
            *per_process_args[i],
            "--out",
            str(run),
            "--distributed",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            str(nums[i]),
            "--process-id",
            str(i),
            "--peer-timeout",
            str(PEER_TIMEOUT),
            "--no-progress",
        ]
        for i in range(2)
    ]
    logs = [tmp_path / f"log{i}.txt" for i in range(2)]
    with processes(cmds, logs, child_env(1)) as procs:
        codes = wait_all(procs, timeout)
    return codes, [Path(l).read_text() for l in logs], run


def _error_lines(log):
    return [l for l in log.splitlines() if l.startswith("error: ")]


def test_processes_started_with_other_settings_refuse_together(tmp_path):
    """Seeds (or β, lr, epochs) that differ between the processes: both stop at start-up
    with one error line, and nothing is written."""
    codes, logs, run = _two(tmp_path, [["--seed", "0"], ["--seed", "1"]])
    assert codes == [2, 2], logs
    for log in logs:
        (line,) = _error_lines(log)
        assert "process 1 was started with another config" in line, log[-2000:]
        assert "Traceback" not in log
    assert not run.exists()


def test_processes_started_with_other_process_counts_stop(tmp_path):
    """--num-processes 2 on one process and 3 on the other: both stop at start-up with one
    line (the odd one its own, the other naming it), no C++ abort, nothing written."""
    codes, logs, run = _two(tmp_path, [[], []], nums=(2, 3))
    assert codes == [2, 2], logs
    (line,) = _error_lines(logs[1])
    assert "--num-processes 3 but the job has 2 processes" in line
    assert "Check failure stack trace" not in logs[1] and "Aborted" not in logs[1]
    (line,) = _error_lines(logs[0])
    assert "process 1 refused: --num-processes 3 but the job has 2 processes" in line
    assert not run.exists()


# --- start-up that cannot complete: one line and exit 2, never JAX's 300 s wait and C++ abort ---


def _start_alone(tmp_path, port, pid, start_timeout=3):
    t0 = time.monotonic()
    r = _cli(
        [
            "-m",
            "experiments.train",
            *_sets(A),
            "--out",
            str(tmp_path / "run"),
            "--distributed",
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(pid),
            "--start-timeout",
            str(start_timeout),
            "--no-progress",
        ],
        devices=1,
        timeout=120,
    )
    return r, time.monotonic() - t0


def _one_error_line(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --distributed: "), r.stderr[-3000:]
    assert "Check failure" not in r.stderr and "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["unreachable coordinator", "process 0 alone", "peer of a port in use"])
def test_start_up_that_cannot_complete_ends_with_one_line_within_the_start_timeout(tmp_path, case):
    """Nobody serves the coordinator's port (process 1 started alone); process 0 started
    alone; process 1 of a job whose port is held by something else (its process 0 was
    refused with "port in use"): each stops after --start-timeout (3 s) with one line and
    exit status 2, and writes nothing."""
    if case == "peer of a port in use":
        with socket.socket() as s:  # something else listens there and never answers
            s.bind(("127.0.0.1", 0))
            s.listen()
            r, took = _start_alone(tmp_path, s.getsockname()[1], pid=1)
        line = _one_error_line(r)
        assert "not every process joined within 3 s (process 1" in line and "--start-timeout" in line
    elif case == "process 0 alone":
        r, took = _start_alone(tmp_path, free_port(), pid=0)
        line = _one_error_line(r)
        assert "not every process joined within 3 s (process 0" in line
    else:
        port = free_port()
        r, took = _start_alone(tmp_path, port, pid=1)
        line = _one_error_line(r)
        assert f"the coordinator at 127.0.0.1:{port} could not be reached within 3 s" in line
    assert took < 90, f"{case}: took {took:.0f} s"
    assert not (tmp_path / "run").exists()


def test_start_timeout_must_be_positive(tmp_path):
    env = dict(child_env(1), EP_JAX_START_TIMEOUT="0")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            *_sets(A),
            "--out",
            str(tmp_path / "run"),
            "--distributed",
            "--coordinator",
            "127.0.0.1:1",
            "--num-processes",
            "2",
            "--process-id",
            "1",
            "--no-progress",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip() == "error: --start-timeout must be at least 1 second, got 0", r.stderr


def test_ctrl_c_while_waiting_for_the_other_processes_stops_at_once(tmp_path):
    """JAX's start-up barrier runs no Python handler: the signal wake-up ends the wait."""
    log = tmp_path / "log.txt"
    cmd = [
        sys.executable,
        "-m",
        "experiments.train",
        *_sets(A),
        "--out",
        str(tmp_path / "run"),
        "--distributed",
        "--coordinator",
        f"127.0.0.1:{free_port()}",
        "--num-processes",
        "2",
        "--process-id",
        "0",
        "--start-timeout",
        "100",
        "--no-progress",
    ]
    with processes([cmd], [log], child_env(1)) as (proc,):
        end = time.monotonic() + 90
        while "waiting for all 2 processes" not in tail(log) and time.monotonic() < end:
            assert proc.poll() is None, tail(log)
            time.sleep(0.1)
        assert "waiting for all 2 processes" in tail(log)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        (code,) = wait_all([proc], 30)
        took = time.monotonic() - t0
    assert code == 130, (code, tail(log))
    assert Path(log).read_text().strip().splitlines()[-1] == "interrupted"
    assert took < 10 and "Check failure" not in tail(log)
    assert not (tmp_path / "run").exists()
