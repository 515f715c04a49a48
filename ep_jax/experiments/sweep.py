"""Run a sweep spec: `python -m experiments.sweep SPEC.toml [options]`.

A spec (TOML or JSON) is a base config, a grid and/or explicit members — every setting a
`RunConfig` field (`python -m experiments.train --list-fields`):

    name = "dep_lr"               # default: the file's stem; output in runs/<name>
    out = "runs/lr"               # optional: the output folder (relative, inside the current one)
    preset = "mnist-dep"          # optional: start from a preset
    epochs = 20                   # RunConfig fields at the top level go into [base]

    [base]                        # settings of every member
    lr = [0.4, 0.02]

    [grid]                        # cartesian product over lists of alternatives
    seed = [0, 1, 2]
    beta = [0.1, 0.2]

    [[members]]                   # explicit members, merged over [base] (and the grid's absence)
    name = "one_sided"
    estimator = "one_sided"
    nudge = "random_sign"

Every member gets its own run folder `<out>/<member>/` with exactly the layout of a single
run (`experiments.engine`), and trains with its own seed's keys and data order, so a
member's numbers equal those of the same config run alone. Members that share their
static structure train as one vmapped program. `<out>/sweep.json` lists the members;
`<out>/results.md` is the aggregated table (`experiments.aggregate`).

Names become paths, each exactly one folder name inside the output folder: the sweep's
name (no `/` or `\\`, not `.` or `..`, not empty, no control characters, not starting
with `-`) and every member's name, given or derived from the grid (`seed=0_beta=0.1`;
letters, digits and `. _ = + -` only, the same rules). A spec's `out` must be a relative
path without `..`; `--out` may point anywhere. A spec holds at most 10 000 members
(`MAX_MEMBERS`; the grid's size is computed before anything is expanded). The spec file
must be a regular file of at most 16 MiB in UTF-8 (a pipe is refused, never waited on);
nesting too deep to parse is one error line.

Everything is checked before anything is written: the spec, every member's config and
that every member's dataset can be read (`--dry-run` checks the spec and finds the data,
writes and trains nothing).
`--overwrite` replaces the members' run folders (each only as far as its manifest names
what ep_jax wrote, `experiments.runfolder`) and refuses a sweep folder holding anything but
its `sweep.json`, `results.md`, manifest and member folders; `sweep.json` and `results.md`
are never written over a file ep_jax did not write.
`--resume` continues the sweep in `<out>` only with the same spec: every member's config
must equal the one saved in `<out>/sweep.json` except `epochs` (which may grow) and
`data_dir` (where the data lives is not part of a run).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import re
import sys
import tomllib
from pathlib import Path

from ep_jax._safe_read import read_regular
from ep_jax.experiments import cli, distributed, runfolder
from ep_jax.experiments.config import FIELDS, ConfigError, RunConfig, validate
from ep_jax.experiments.engine import NOT_IDENTITY
from ep_jax.experiments.errors import RunError, SpecError
from ep_jax.experiments.names import relative_inside, safe_component
from ep_jax.experiments.presets import PRESETS
from ep_jax.experiments.runfolder import FolderLock
from ep_jax.experiments.train import check_data_dir, check_int_flags, check_int_values

SPEC_KEYS = {"name", "description", "preset", "out", "base", "grid", "members"}
#: the most members a spec may expand to (a bigger grid is refused before it is expanded):
#: checking 10 000 members' configs takes seconds, and each member is a run folder
MAX_MEMBERS = 10_000
#: the largest spec file read (10 000 explicit members of a few settings each fit in 4 MiB)
MAX_SPEC_BYTES = 16 << 20
#: config fields that may differ from the saved sweep on --resume
RESUME_FREE = NOT_IDENTITY  # the fields a resume may change, as for a single run


def load_spec(path) -> dict:
    """Read a TOML/JSON spec; errors name the file (and line for TOML syntax)."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"spec file {str(path)!r} does not exist")
    if path.suffix not in (".toml", ".json"):
        raise SpecError(f"{path}: a spec must be a .toml or .json file")
    try:
        data = read_regular(path, MAX_SPEC_BYTES, SpecError, "sweep spec")
    except FileNotFoundError:
        raise SpecError(f"spec file {str(path)!r} does not exist") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        if path.suffix == ".toml":
            spec = tomllib.loads(text)
        else:
            spec = json.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: TOML syntax error: {e}") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: JSON syntax error at line {e.lineno}: {e.msg}") from None
    except RecursionError:
        raise SpecError(f"{path}: nested too deep to read (a spec is a few tables deep)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise SpecError(f"{path}: not a readable spec ({e})") from None
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: a spec must be a table of settings")
    unknown = sorted(set(spec) - SPEC_KEYS - set(FIELDS))
    if unknown:
        raise SpecError(
            f"{path}: unknown setting(s) {unknown}; a spec holds {sorted(SPEC_KEYS)} and config "
            "fields (python -m experiments.train --list-fields)"
        )
    spec.setdefault("name", path.stem)
    safe_component(spec["name"], f"{path}: the sweep's name", SpecError)
    if spec.get("out") is not None:
        relative_inside(spec["out"], f"{path}: out", SpecError)
    if not isinstance(spec.get("description", ""), str):
        raise SpecError(f"{path}: description must be a string")
    base = {k: v for k, v in spec.items() if k in FIELDS}
    inner = spec.get("base", {})
    if not isinstance(inner, dict):
        raise SpecError(f"{path}: [base] must be a table")
    base.update(inner)
    if spec.get("preset") is not None:
        if not isinstance(spec["preset"], str) or spec["preset"] not in PRESETS:
            raise SpecError(f"{path}: unknown preset {spec['preset']!r}; choose one of {sorted(PRESETS)}")
        base = {**PRESETS[spec["preset"]], **base}
    spec["base"] = base
    spec["_path"] = str(path)
    return spec


def _label(v) -> str:
    """A grid value in a member's name: `:g` (0.1, 1e-05), or every digit where `:g`
    would round the value (0.1000001), so distinct values give distinct names."""
    if isinstance(v, (list, tuple)):
        return "-".join(_label(u) for u in v)
    if isinstance(v, float):
        short = f"{v:g}"
        return short if not math.isfinite(v) or float(short) == v else repr(v)
    return str(v)


def size(spec: dict) -> int:
    """How many members `spec` expands to, computed without expanding it."""
    grid, members = spec.get("grid") or {}, spec.get("members") or []
    n = (math.prod(len(a) for a in grid.values()) if grid else 0) + len(members)
    return n or 1


def duplicates(names) -> list[str]:
    """The names that occur more than once, sorted (one pass: linear in the names)."""
    return sorted(n for n, c in collections.Counter(names).items() if c > 1)


def expand(spec: dict) -> list[tuple[str, RunConfig]]:
    """`[(member name, validated RunConfig)]` of a spec, in grid then members order.
    Refuses (SpecError) more than `MAX_MEMBERS` members before expanding anything."""
    where = spec.get("_path", "spec")
    base, grid, members = spec["base"], spec.get("grid") or {}, spec.get("members") or []
    if not isinstance(grid, dict):
        raise SpecError(f"{where}: [grid] must be a table of lists")
    if not isinstance(members, list) or not all(isinstance(m, dict) for m in members):
        raise SpecError(f"{where}: [[members]] must be tables")
    for k, alts in grid.items():
        if k not in FIELDS:
            raise SpecError(f"{where}: grid.{k} is not a config field")
        if not isinstance(alts, list) or not alts:
            raise SpecError(f"{where}: grid.{k} must be a non-empty list of alternatives, got {alts!r}")
    n = size(spec)
    if n > MAX_MEMBERS:
        shape = " x ".join(f"{len(a)} {k}" for k, a in grid.items())
        raise SpecError(
            f"{where}: the spec has {n} members (grid {shape or 'none'} + {len(members)} listed), "
            f"more than the {MAX_MEMBERS} a sweep may hold; split it into smaller sweeps"
        )
    out = []
    if grid:
        for combo in itertools.product(*grid.values()):
            settings = dict(zip(grid, combo))
            name = re.sub(r"[^A-Za-z0-9._=+-]", "-", "_".join(f"{k}={_label(v)}" for k, v in settings.items()))
            out.append((name, {**base, **settings}))
    for i, m in enumerate(members):
        m = dict(m)
        name = m.pop("name", f"member{i}")
        if not isinstance(name, (str, int)) or isinstance(name, bool):
            raise SpecError(f"{where}: members[{i}].name must be a string, got {name!r}")
        out.append((str(name), {**base, **m}))
    if not out:
        out.append((spec["name"], dict(base)))
    configs = []
    for name, values in out:
        if not re.fullmatch(r"[A-Za-z0-9._=+-]+", name):
            raise SpecError(f"{where}: member name {name!r} may hold only letters, digits and . _ = + -")
        safe_component(name, f"{where}: member name", SpecError)
        try:
            check_int_values(values)
            configs.append((name, validate(RunConfig.from_dict(values))))
        except ConfigError as e:
            raise ConfigError(f"{where}: member {name}: {e}") from None
    dup = duplicates(n for n, _ in configs)
    if dup:
        shown = dup[:10] + (["..."] if len(dup) > 10 else [])
        same = [
            k
            for k, alts in grid.items()
            if len({json.dumps(a, sort_keys=True) for a in alts}) < len(alts)
            or len({_label(a) for a in alts}) < len(alts)
        ]
        hint = (
            f" (grid.{same[0]} lists the same value twice, or values that name alike: {grid[same[0]]!r})"
            if same
            else ""
        )
        raise SpecError(f"{where}: member names must be unique, repeated: {shown}{hint}")
    return configs


def parser():
    """The command line's argument parser."""
    p = argparse.ArgumentParser(
        prog=cli.prog("sweep"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("spec", help="sweep spec, .toml or .json")
    p.add_argument("--out", help="output folder (default: the spec's out, else runs/<name>)")
    p.add_argument("--epochs", type=int, help="override every member's epochs (also to extend on --resume)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the spec and the data, list groups and members, write and train nothing",
    )
    cli.add_run_modes(p)
    distributed.add_flags(p)
    cli.add_common(p)
    return p


def members_of(spec: dict, out: Path, epochs: int | None = None):
    """The spec's `engine.Member`s, each in `<out>/<member name>` (`epochs`: override)."""
    from ep_jax.experiments import engine

    configs = expand(spec)
    if epochs is not None:
        check_int_flags({"--epochs": epochs})
        configs = [(n, validate(c.replace(epochs=epochs))) for n, c in configs]
    return [engine.Member(c, n, out / n) for n, c in configs]


def check_data(members, load: bool = True):
    """Refuse (DatasetError, naming the member) before anything is written if a member's
    dataset cannot be read. Synthetic data always can. A real dataset is loaded through
    `engine.load_data` (which caches it for the run) when `load`, else it must be found
    offline (`ep_jax.data.available_offline`) or load."""
    from ep_jax import data
    from ep_jax.experiments import engine

    seen = set()
    for m in members:
        c = m.cfg
        if c.dataset == "synthetic":
            continue
        check_data_dir(c.data_dir, f"member {m.name}: data_dir")
        key = (c.dataset, c.data_dir)  # the subsets of a readable dataset are valid (validate)
        if key in seen:
            continue
        seen.add(key)
        if not load and data.available_offline(c.dataset, c.data_dir):
            continue
        try:
            engine.load_data(c)
        except data.DatasetError as e:
            raise data.DatasetError(f"member {m.name}: {e}") from None


def _members_of_saved(out: Path, saved) -> list[dict]:
    members = saved.get("members") if isinstance(saved, dict) else None
    if not isinstance(members, list) or not all(
        isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("config"), dict) for m in members
    ):
        raise RunError(f"{out / 'sweep.json'}: not a sweep's record (no list of members with name and config)")
    return members


def sweep_outputs(out: Path, members) -> tuple[set, set]:
    """`(files, folders)` that ep_jax wrote (or writes) in the sweep folder `out`: its
    manifest's (`runfolder.read_manifest`) — for a sweep made before manifests existed,
    `sweep.json` and `results.md` when `sweep.json` reads as a sweep's record — and the
    members' folders (each checked by the engine)."""
    from ep_jax.experiments import engine

    m = runfolder.read_manifest(out) if out.is_dir() else None
    if m is not None:
        files, folders = set(m["files"]), set(m["folders"])
    else:
        files, folders = set(), set()
        try:
            _members_of_saved(out, engine.read_json(out / "sweep.json"))
            files = set(runfolder.SWEEP_FILES)
        except RunError:
            pass
    return files, folders | {m.name for m in members if m.dir.parent == out}


def check_sweep_folder(out: Path, members, mode: str):
    """The sweep-level checks (the engine checks each member's folder): "new" refuses a
    folder that holds anything; "overwrite" a folder holding anything ep_jax did not write
    there (`sweep_outputs`), naming it; "resume" needs `<out>/sweep.json` with the same
    members, each of the same config (only `RESUME_FREE` fields may differ). No mode writes
    `sweep.json` or `results.md` over a file ep_jax did not write."""
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a folder")
    if mode == "new" and out.is_dir():
        entries = sorted(p.name for p in out.iterdir() if p.name not in (runfolder.HOLDER, runfolder.MANIFEST))
        if (out / "sweep.json").exists():
            raise RunError(f"{out} already holds a sweep: pass --resume to continue it or --overwrite to replace it")
        if entries:
            raise RunError(
                f"{out} is not empty (it holds {entries[0]!r}) and holds no sweep; a new sweep needs a "
                "new or empty folder: choose another --out"
            )
    if mode == "resume":
        check_resume(out, members)
    if out.is_dir():
        files, folders = sweep_outputs(out, members)
        for name in runfolder.SWEEP_FILES:
            p = out / name
            if p.is_symlink() or (p.exists() and (name not in files or not p.is_file())):
                raise RunError(
                    f"{p} exists and ep_jax did not write it; a sweep never writes over a file it did "
                    "not write: move it away or choose another --out"
                )
        if mode == "overwrite":
            foreign = runfolder.first_foreign(out, files, folders)
            if foreign is not None:
                raise RunError(
                    f"{out} holds {foreign!r}, which ep_jax did not write; --overwrite replaces only a "
                    "sweep's own files and run folders: move it away or choose another --out"
                )


def check_resume(out: Path, members):
    """`--resume`: `<out>/sweep.json` with the same members, each of the same config (only
    `RESUME_FREE` fields may differ)."""
    from ep_jax.experiments import engine

    saved = engine.read_json(out / "sweep.json")
    if saved is None:
        raise RunError(f"{out}: no sweep to resume (sweep.json is missing)")
    saved_members = _members_of_saved(out, saved)
    before, now = [m["name"] for m in saved_members], [m.name for m in members]
    if before != now:
        gone = [n for n in before if n not in set(now)]
        new = [n for n in now if n not in set(before)]
        detail = (
            "; ".join(
                x
                for x in (
                    f"not in the spec: {gone[:5]}" if gone else "",
                    f"not in the saved sweep: {new[:5]}" if new else "",
                )
                if x
            )
            or "the order differs"
        )
        raise RunError(
            f"{out}: the spec's members differ from the saved sweep's ({detail}); resume needs "
            "the same spec (only epochs may change)"
        )
    for m, s in zip(members, saved_members):
        mine = m.cfg.to_json()
        try:
            theirs = RunConfig.from_dict(s["config"]).to_json()
        except ConfigError as e:
            raise RunError(f"{out / 'sweep.json'}: member {m.name}: {e}") from None
        diff = sorted(k for k in mine if k not in RESUME_FREE and mine[k] != theirs[k])
        if diff:
            shown = ", ".join(f"{k}={theirs[k]!r} -> {mine[k]!r}" for k in diff[:4]) + (", ..." * (len(diff) > 4))
            raise RunError(
                f"{out}: member {m.name} belongs to another config than the saved sweep's "
                f"(differs in {diff}: {shown}); resume needs the same spec (only epochs may "
                "change)"
            )


def write_sweep_json(out: Path, spec: dict, members):
    """`<out>/sweep.json`: the sweep's name, description, spec file and members (atomic)."""
    from ep_jax.experiments.checkpoint import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / "sweep.json",
        json.dumps(
            {
                "name": spec["name"],
                "description": spec.get("description", ""),
                "spec": spec.get("_path"),
                "members": [{"name": m.name, "config": m.cfg.to_json()} for m in members],
            },
            indent=1,
        )
        + "\n",
    )


def write_results(out: Path, title: str, members) -> str:
    """`<out>/results.md`, the aggregated table of the members run so far (written
    atomically); returns its text."""
    from ep_jax.experiments import aggregate
    from ep_jax.experiments.checkpoint import atomic_write_text

    runs = [aggregate.load_run(m.dir) for m in members if (m.dir / "config.json").is_file()]
    text = f"# {title}\n\n" + (aggregate.table(aggregate.cells(runs)) if runs else "no results yet\n")
    atomic_write_text(out / "results.md", text)
    return text


def main(argv=None):
    """`python -m experiments.sweep`: check everything, then train the spec's members;
    returns the exit status (3 when a member failed or was interrupted)."""
    from ep_jax.experiments import engine

    a = parser().parse_args(argv)
    rt = distributed.setup(a)  # before any other JAX use
    spec = load_spec(a.spec)
    out = Path(a.out or spec.get("out") or Path("runs") / spec["name"])
    members = members_of(spec, out, a.epochs)
    groups = engine.group_members(members)
    print(f"sweep {spec['name']}: {len(members)} member(s) in {len(groups)} group(s) -> {out}")
    for gi, g in enumerate(groups):
        c = g.cfg
        names = [m.name for m in g.members]
        shown = ", ".join(names[:50]) + (f", ... ({len(names) - 50} more)" if len(names) > 50 else "")
        print(
            f"  group {gi + 1}: {c.dataset} {c.model} {list(c.sizes)} {c.estimator} T1={c.t_free} "
            f"T2={c.t_nudge} batch={c.batch_size} epochs={c.epochs}: " + shown
        )
    if a.dry_run:
        check_data(members, load=False)
        return 0
    mode = "resume" if a.resume else "overwrite" if a.overwrite else "new"
    rt.check_layout(groups)
    lock = FolderLock(out, "sweep")  # one process at a time in the sweep folder (process 0 holds it)

    def checks():  # every check (lock, folders, then data) before anything is written
        if rt.is_main:
            lock.acquire()
        check_sweep_folder(out, members, mode)
        engine.check_folders(members, mode)
        check_data(members)

    try:
        rt.together(checks)
        if rt.is_main:  # what the sweep writes here, recorded before it is written (runfolder.record)
            out.mkdir(parents=True, exist_ok=True)
            runfolder.record(out, runfolder.SWEEP_FILES, [m.name for m in members if m.dir.parent == out])
        if mode == "overwrite" and out.exists() and rt.is_main:
            # member folders are replaced by the engine; the stale table of an older sweep goes
            # (ep_jax wrote it: check_sweep_folder refused anything else)
            (out / "results.md").unlink(missing_ok=True)
        if rt.is_main:
            write_sweep_json(out, spec, members)
        try:
            summaries = engine.run(members, mode, progress=not a.no_progress, runtime=rt, loggers=a.log)
        finally:
            text = write_results(out, spec["name"], members) if rt.is_main else ""
    finally:
        lock.release()
        lock.undo_created()
    print(text)
    return 0 if all(s["status"] in ("ok", "diverged") for s in summaries) else 3


if __name__ == "__main__":
    sys.exit(distributed.main_wrapper(main))
