"""Training runs and sweeps over several devices and processes, on JAX's own runtime.

`python -m experiments.train ... --distributed` (or `EP_JAX_DISTRIBUTED=1`) runs the same
engine (`experiments.engine`) on every device of every process of a `jax.distributed`
job; docs/distributed.md shows how to launch one (one host, several hosts, SLURM).

- `setup(args)`, called by the commands before any other JAX use, starts
  `jax.distributed` (`ep_jax.parallel.initialize`, gloo collectives for CPU devices):
  coordinator address, process count and id from `--coordinator`/`--num-processes`/
  `--process-id`, else `JAX_COORDINATOR_ADDRESS`/`JAX_NUM_PROCESSES`/`JAX_PROCESS_ID`,
  else what JAX detects (SLURM, Open MPI). With one process nothing is started: the run
  just uses every local device.
  The start is bounded by `--start-timeout` (`EP_JAX_START_TIMEOUT`, default 300 s):
  processes other than 0 first wait for the coordinator's port to accept connections,
  then every process waits in JAX's barrier under our own deadline (`_Deadline`), which
  ends the process with one `error:` line and exit status 2 before JAX's own timeout
  would abort it with a C++ stack trace; after 5 s a line says what it waits for.
- `setup` returns the runtime (`experiments.runtime.Distributed`, or `Local` when not
  asked) that the commands hand to the engine. Every group of members trains on a
  `("members", "data")` mesh over all devices (`ep_jax.parallel.sharded_sweep_steps`): members split over "members" (they never
  communicate), each member's batch over "data" (gradients averaged). The number of
  member shards is the largest that fits, or `--member-shards`; the members must divide
  by it and every batch (`batch_size`, and the last partial batch of an epoch) by the data
  shards, else the command refuses before touching anything (`check_layout`).
- Every process holds the (small) dataset and computes the same data order (it derives
  from the seeds); the per-member batch indices are split like the batches, so each
  process's devices gather only their own rows of every global batch.
- Between chunks the state is replicated (the compiled chunk ends with an all-gather),
  which is what lets process 0 alone write metrics, run files, summaries and checkpoints
  (`is_main`); the other processes write nothing and print only errors.
- The run folders are checked by every process before any is changed (`together`: a
  refusal on one process stops all of them, each with one `error:` line). `--resume`
  reads the checkpoints on every process, so the output folder must be visible to all
  processes (a shared file system; on one host it always is).
- A process that dies makes the collectives of the others fail (gloo, NCCL) or, if it
  went silent, the coordination service notices after `--peer-timeout` seconds of
  missed heartbeats: the others then stop with an error line instead of hanging
  (`main_wrapper`), and every process restarted with `--resume` continues from the last
  finished epoch.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

from ep_jax.experiments import runtime
from ep_jax.experiments.errors import RunError
from ep_jax.experiments.runtime import _STATE
from ep_jax.experiments.runtime import first_line as _first_line

ENV_FLAG = "EP_JAX_DISTRIBUTED"
DEFAULT_PEER_TIMEOUT = 100  # JAX's heartbeat timeout
DEFAULT_START_TIMEOUT = 300  # how long the processes wait for each other at start (JAX's default)
#: seconds of waiting at start before the command says what it waits for
WAIT_NOTICE_S = 5


def add_flags(p):
    """The `--distributed` flags of the training commands."""
    g = p.add_argument_group("distributed (several devices, processes or hosts; docs/distributed.md)")
    g.add_argument(
        "--distributed",
        action="store_true",
        help=f"train on every device of every process of a jax.distributed job (or {ENV_FLAG}=1)",
    )
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="address of process 0's coordinator (default: JAX_COORDINATOR_ADDRESS, or SLURM's)",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="number of processes (default: JAX_NUM_PROCESSES, or SLURM's; 1: this process's devices)",
    )
    g.add_argument(
        "--process-id", type=int, metavar="I", help="this process's id, 0..N-1 (default: JAX_PROCESS_ID, or SLURM's)"
    )
    g.add_argument(
        "--member-shards",
        type=int,
        metavar="K",
        help="split a sweep's members over K groups of devices (default: as many as fit)",
    )
    g.add_argument(
        "--peer-timeout",
        type=int,
        metavar="SECONDS",
        help=f"a process silent this long counts as dead and the run stops (default "
        f"{DEFAULT_PEER_TIMEOUT}; EP_JAX_PEER_TIMEOUT)",
    )
    g.add_argument(
        "--start-timeout",
        type=int,
        metavar="SECONDS",
        help=f"how long the processes wait for each other (and for the coordinator) at start before "
        f"the command stops with an error (default {DEFAULT_START_TIMEOUT}; EP_JAX_START_TIMEOUT)",
    )


def _env_int(name):
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        from ep_jax.experiments.config import ConfigError

        raise ConfigError(f"{name}={v!r} is not an integer") from None


def requested(a) -> bool:
    """Whether the flags or `EP_JAX_DISTRIBUTED` ask for a distributed run."""
    return bool(
        getattr(a, "distributed", False)
        or os.environ.get(ENV_FLAG, "").lower() in ("1", "true", "yes")
        or any(getattr(a, k, None) is not None for k in ("coordinator", "num_processes", "process_id", "member_shards"))
    )


def setup(a):
    """Start the distributed runtime if the flags or `EP_JAX_DISTRIBUTED` ask for it (call
    before any other JAX use). Returns the runtime to hand to the engine: a
    `runtime.Distributed` (true) when the run is distributed, else `runtime.LOCAL` (false)."""
    from ep_jax.experiments.config import ConfigError

    if not requested(a):
        return runtime.LOCAL
    if _STATE["on"]:
        return runtime.current()
    import jax

    from ep_jax import parallel

    num = a.num_processes if a.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = a.process_id if a.process_id is not None else _env_int("JAX_PROCESS_ID")
    coordinator = a.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    shards = a.member_shards if a.member_shards is not None else _env_int("EP_JAX_MEMBER_SHARDS")
    timeout = a.peer_timeout if a.peer_timeout is not None else _env_int("EP_JAX_PEER_TIMEOUT")
    timeout = DEFAULT_PEER_TIMEOUT if timeout is None else timeout
    start = getattr(a, "start_timeout", None)
    start = start if start is not None else _env_int("EP_JAX_START_TIMEOUT")
    start = DEFAULT_START_TIMEOUT if start is None else start
    if num is not None and num < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {num}")
    if pid is not None and (pid < 0 or (num is not None and pid >= num)):
        raise ConfigError(f"--process-id must be in 0..{(num or 1) - 1}, got {pid}")
    if shards is not None and shards < 1:
        raise ConfigError(f"--member-shards must be at least 1, got {shards}")
    if timeout < 1:
        raise ConfigError(f"--peer-timeout must be at least 1 second, got {timeout}")
    if start < 1:
        raise ConfigError(f"--start-timeout must be at least 1 second, got {start}")
    if coordinator is not None and not re.fullmatch(r"\S+:\d+", coordinator):
        raise ConfigError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if num != 1 or pid not in (None, 0):
        if pid in (None, 0) and coordinator is not None:
            _check_port_free(coordinator)
        if pid not in (None, 0) and coordinator is not None:
            start_left = max(1, start - _wait_for_coordinator(coordinator, pid, start))
        else:
            start_left = start
        waiting = (
            f"process {pid if pid is not None else '?'}: waiting for all {num or '?'} processes to join via "
            f"{coordinator or 'the cluster'}"
        )
        # JAX aborts the process (a C++ check failure) when its own wait runs out: ours ends
        # first, with one line
        with _Deadline(
            start_left,
            waiting,
            f"--distributed: not every process joined within {start} s (process "
            f"{pid if pid is not None else '?'}, coordinator {coordinator or 'from the cluster'}): start "
            f"all {num or ''} processes with the same --coordinator and --num-processes, check that "
            "the coordinator's port is served by process 0 of this job, or raise --start-timeout",
        ):
            try:
                parallel.initialize(
                    coordinator, num, pid, initialization_timeout=start + 60, heartbeat_timeout_seconds=timeout
                )
            except (ValueError, TypeError) as e:
                raise ConfigError(
                    f"--distributed: {_first_line(e).rstrip('.')}: give --coordinator HOST:PORT "
                    "--num-processes N --process-id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                    "JAX_PROCESS_ID), or run under SLURM"
                ) from None
            except Exception as e:  # connection refused, timed out, ...
                raise RunError(
                    f"--distributed: could not join the other processes via "
                    f"{coordinator or 'the cluster'} ({_first_line(e)})"
                ) from None
    _STATE.update(on=True, member_shards=shards)
    rt = runtime.current()

    def same_count():
        if num is not None and jax.process_count() != num:
            raise RunError(
                f"--num-processes {num} but the job has {jax.process_count()} processes: start every "
                "process with the same --num-processes"
            )

    # one decision: the process started with another count says so, the others name it
    rt.together(same_count)
    if jax.process_index() != 0:
        sys.stdout = open(os.devnull, "w")  # process 0 alone logs; errors still go to stderr
    return runtime.current()


def _check_port_free(coordinator: str):
    """Process 0 serves the coordinator: refuse a local port already in use (JAX would crash)."""
    import socket

    host, port = coordinator.rsplit(":", 1)
    if host not in ("localhost", "127.0.0.1", "0.0.0.0", "[::1]", socket.gethostname()):
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("" if host == "0.0.0.0" else "127.0.0.1", int(port)))
        except OSError:
            raise RunError(
                f"--coordinator {coordinator}: port {port} is already in use on this host; "
                "choose a free port for process 0"
            ) from None


def _wait_for_coordinator(coordinator: str, pid: int, seconds: int):
    """Before JAX's own wait (which ends in a C++ abort): is anything listening at the
    coordinator's address? Retried until `seconds` pass (process 0 may start later); a
    line says what it waits for after `WAIT_NOTICE_S` s; RunError when the time is up.
    Returns the seconds it waited."""
    import socket
    import time

    host, port = coordinator.rsplit(":", 1)
    host = host.strip("[]")
    t0 = time.monotonic()
    said = False
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, seconds)):
                return int(time.monotonic() - t0)
        except socket.gaierror as e:
            raise RunError(f"--coordinator {coordinator}: unknown host {host!r} ({e.strerror or e})") from None
        except OSError:
            pass
        waited = time.monotonic() - t0
        if waited >= seconds:
            raise RunError(
                f"--distributed: the coordinator at {coordinator} could not be reached within {seconds} s "
                "(is process 0 of this job running, with this --coordinator?); start it, or raise "
                "--start-timeout"
            ) from None
        if not said and waited >= WAIT_NOTICE_S:
            said = True
            print(
                f"process {pid}: waiting for the coordinator at {coordinator} (process 0) to accept connections, "
                f"up to {seconds} s...",
                file=sys.stderr,
                flush=True,
            )
        time.sleep(min(0.5, max(0.05, seconds - waited)))


class _Deadline:
    """A bounded wait around a native call that cannot be interrupted (JAX's start-up
    barrier): after `WAIT_NOTICE_S` s one line says what it waits for; when `seconds`
    pass, one `error:` line and exit status 2 (`os._exit`: the call is still blocking).
    Ctrl-C or SIGTERM meanwhile (no Python handler runs until the call returns) ends the
    process at once with `interrupted` and exit status 130 (a signal wake-up pipe)."""

    def __init__(self, seconds: float, waiting: str, error: str):
        import threading

        self.seconds, self.waiting, self.error = seconds, waiting, error
        self.done = False
        self.pipe = None
        self.old_fd = None
        self.thread = threading.Thread(target=self._watch, name="ep_jax-start-deadline", daemon=True)

    def _watch(self):
        import select
        import signal
        import time

        from ep_jax.experiments import interrupts

        t0 = time.monotonic()
        said = self.seconds <= WAIT_NOTICE_S
        while not self.done:
            until = t0 + (self.seconds if said else WAIT_NOTICE_S)
            left = until - time.monotonic()
            if left <= 0:
                if not said:
                    said = True
                    print(f"{self.waiting} (up to {self.seconds} s)...", file=sys.stderr, flush=True)
                    continue
                interrupts.hard_exit(2, f"error: {self.error}")
            if self.pipe is None:
                time.sleep(min(left, 0.1))
                continue
            ready, _, _ = select.select([self.pipe[0]], [], [], left)
            if ready:
                got = os.read(self.pipe[0], 64)
                if not self.done and any(b in (int(signal.SIGINT), int(signal.SIGTERM)) for b in got):
                    interrupts.hard_exit(interrupts.INTERRUPTED, "interrupted")

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            r, w = os.pipe()
            os.set_blocking(w, False)
            try:
                self.old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
                self.pipe = (r, w)
            except ValueError:
                os.close(r)
                os.close(w)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        import signal

        self.done = True
        if self.pipe is not None:
            try:
                signal.set_wakeup_fd(self.old_fd if self.old_fd is not None else -1)
                os.write(self.pipe[1], b"\0")
            except (OSError, ValueError):
                pass
        self.thread.join()
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None


def active() -> bool:
    """The run is distributed (`setup` started it)."""
    return runtime.current().active


def multi() -> bool:
    """Several processes take part."""
    return runtime.current().multi


def is_main() -> bool:
    """This process writes the run's files and logs (process 0; always when not distributed)."""
    return runtime.current().is_main


def together(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on every process as one decision (`runtime.Distributed.together`)."""
    return runtime.current().together(fn, *args, **kwargs)


def layout(M: int, batch_size: int, n: int, where: str = "") -> tuple[int, int]:
    """`(member_shards, data_shards)` of a group on the current devices (`runtime.Distributed.layout`)."""
    rt = runtime.current()
    return (rt if rt.active else runtime.Distributed(_STATE["member_shards"])).layout(M, batch_size, n, where)


def check_layout(members):
    """Refuse (ConfigError) before anything is touched if a group does not divide."""
    from ep_jax.experiments import engine

    runtime.current().check_layout(engine.group_members(members))


# --- the commands' exit ------------------------------------------------------------------

_LOST = re.compile(
    r"gloo|nccl|coordination service|heartbeat|connection reset|connection refused|"
    r"broken pipe|socket closed|unavailable:|deadline_exceeded",
    re.I,
)


def lost_peer(e: BaseException) -> bool:
    """Does the error say that another process of the run is gone?"""
    return multi() and bool(_LOST.search(str(e)))


def main_wrapper(main, argv=None) -> int:
    """`cli.main_wrapper` for the training commands: a collective that fails because
    another process died becomes one clear `error:` line (exit 2), and this process then
    leaves at once rather than wait for the lost one at JAX's shutdown barrier."""
    from ep_jax.experiments import cli

    def guarded(argv):
        try:
            return main(argv)
        except Exception as e:
            if lost_peer(e):
                _STATE["lost"] = True
                raise RunError(
                    f"lost contact with another process of this distributed run ({_first_line(e)}); "
                    "every finished epoch is checkpointed: start all processes again with --resume"
                ) from e
            raise

    try:
        code = cli.main_wrapper(guarded, argv)
    except Exception:
        if not multi():
            raise
        # an unexpected error: show it, and leave at once (the others' collectives then
        # fail and they stop too, rather than all waiting at the shutdown barrier)
        traceback.print_exc()
        _STATE["lost"] = True
        code = 1
    return finish(code)


def finish(code: int) -> int:
    """Leave the distributed runtime: at JAX's shutdown barrier when every process is
    alive, at once (`os._exit`) when one was lost."""
    if _STATE["lost"]:  # also when the job never became consistent (setup refused it)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if not multi():
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    import jax

    try:
        jax.distributed.shutdown()
    except Exception as e:  # noqa: BLE001
        print(f"warning: jax.distributed.shutdown: {_first_line(e)}", file=sys.stderr)
    return code
