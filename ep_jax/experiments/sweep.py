"""Run a sweep spec: `python -m experiments.sweep SPEC.toml [options]`.

A spec (TOML or JSON) is a base config, a grid and/or explicit members — every setting a
`RunConfig` field (`python -m experiments.train --list-fields`):

    name = "dep_lr"               # default: the file's stem; output in runs/<name>
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
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import tomllib
from pathlib import Path

from ep_jax.experiments import cli, distributed
from ep_jax.experiments.config import FIELDS, ConfigError, RunConfig, validate
from ep_jax.experiments.presets import PRESETS
from ep_jax.experiments.errors import RunError, SpecError

SPEC_KEYS = {"name", "description", "preset", "out", "base", "grid", "members"}


def load_spec(path) -> dict:
    """Read a TOML/JSON spec; errors name the file (and line for TOML syntax)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            spec = tomllib.loads(text)
        elif path.suffix == ".json":
            spec = json.loads(text)
        else:
            raise SpecError(f"{path}: a spec must be a .toml or .json file")
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: TOML syntax error: {e}") from None
    except json.JSONDecodeError as e:
        raise SpecError(f"{path}: JSON syntax error at line {e.lineno}: {e.msg}") from None
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: a spec must be a table of settings")
    unknown = sorted(set(spec) - SPEC_KEYS - set(FIELDS))
    if unknown:
        raise SpecError(f"{path}: unknown setting(s) {unknown}; a spec holds {sorted(SPEC_KEYS)} and config "
                        "fields (python -m experiments.train --list-fields)")
    spec.setdefault("name", path.stem)
    base = {k: v for k, v in spec.items() if k in FIELDS}
    inner = spec.get("base", {})
    if not isinstance(inner, dict):
        raise SpecError(f"{path}: [base] must be a table")
    base.update(inner)
    if spec.get("preset"):
        if spec["preset"] not in PRESETS:
            raise SpecError(f"{path}: unknown preset {spec['preset']!r}; choose one of {sorted(PRESETS)}")
        base = {**PRESETS[spec["preset"]], **base}
    spec["base"] = base
    spec["_path"] = str(path)
    return spec


def _label(v) -> str:
    if isinstance(v, (list, tuple)):
        return "-".join(_label(u) for u in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def expand(spec: dict) -> list[tuple[str, RunConfig]]:
    """`[(member name, validated RunConfig)]` of a spec, in grid then members order."""
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
    out = []
    if grid:
        for combo in itertools.product(*grid.values()):
            settings = dict(zip(grid, combo))
            name = re.sub(r"[^A-Za-z0-9._=+-]", "-", "_".join(f"{k}={_label(v)}" for k, v in settings.items()))
            out.append((name, {**base, **settings}))
    for i, m in enumerate(members):
        m = dict(m)
        name = str(m.pop("name", f"member{i}"))
        out.append((name, {**base, **m}))
    if not out:
        out.append((spec["name"], dict(base)))
    configs = []
    for name, values in out:
        if not re.fullmatch(r"[A-Za-z0-9._=+-]+", name):
            raise SpecError(f"{where}: member name {name!r} may hold only letters, digits and . _ = + -")
        try:
            configs.append((name, validate(RunConfig.from_dict(values))))
        except ConfigError as e:
            raise ConfigError(f"{where}: member {name}: {e}") from None
    names = [n for n, _ in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"{where}: member names must be unique, repeated: {dup}")
    return configs


def parser():
    p = argparse.ArgumentParser(prog=cli.prog("sweep"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="sweep spec, .toml or .json")
    p.add_argument("--out", help="output folder (default: the spec's out, else runs/<name>)")
    p.add_argument("--epochs", type=int, help="override every member's epochs (also to extend on --resume)")
    p.add_argument("--dry-run", action="store_true", help="list groups and members, train nothing")
    cli.add_run_modes(p)
    distributed.add_flags(p)
    cli.add_common(p)
    return p


def members_of(spec: dict, out: Path, epochs: int | None = None):
    from ep_jax.experiments import engine
    configs = expand(spec)
    if epochs is not None:
        configs = [(n, validate(c.replace(epochs=epochs))) for n, c in configs]
    return [engine.Member(c, n, out / n) for n, c in configs]


def check_sweep_folder(out: Path, members, mode: str):
    """The sweep-level checks (the engine checks each member's folder)."""
    from ep_jax.experiments import engine
    saved = engine.read_json(out / "sweep.json")
    if mode == "new" and out.is_dir() and any(out.iterdir()):
        raise RunError(f"{out} already holds a sweep: pass --resume to continue it or --overwrite to "
                              "replace it")
    if mode == "resume":
        if saved is None:
            raise RunError(f"{out}: no sweep to resume (sweep.json is missing)")
        if [m["name"] for m in saved.get("members", [])] != [m.name for m in members]:
            raise RunError(f"{out}: the spec's members differ from the saved sweep's; resume needs the "
                                  "same spec (only epochs may change)")


def write_sweep_json(out: Path, spec: dict, members):
    from ep_jax.experiments.checkpoint import atomic_write_text
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.json", json.dumps(
        {"name": spec["name"], "description": spec.get("description", ""), "spec": spec.get("_path"),
         "members": [{"name": m.name, "config": m.cfg.to_json()} for m in members]}, indent=1) + "\n")


def write_results(out: Path, title: str, members) -> str:
    from ep_jax.experiments import aggregate
    runs = [aggregate.load_run(m.dir) for m in members if (m.dir / "config.json").is_file()]
    text = f"# {title}\n\n" + (aggregate.table(aggregate.cells(runs)) if runs else "no results yet\n")
    (out / "results.md").write_text(text)
    return text


def main(argv=None):
    from ep_jax.experiments import engine
    a = parser().parse_args(argv)
    distributed.setup(a)   # before any other JAX use
    spec = load_spec(a.spec)
    out = Path(a.out or spec.get("out") or Path("runs") / spec["name"])
    members = members_of(spec, out, a.epochs)
    groups = engine.group_members(members)
    print(f"sweep {spec['name']}: {len(members)} member(s) in {len(groups)} group(s) -> {out}")
    for gi, g in enumerate(groups):
        c = g.cfg
        print(f"  group {gi + 1}: {c.dataset} {c.model} {list(c.sizes)} {c.estimator} T1={c.t_free} "
              f"T2={c.t_nudge} batch={c.batch_size} epochs={c.epochs}: " + ", ".join(m.name for m in g.members))
    if a.dry_run:
        return 0
    mode = "resume" if a.resume else "overwrite" if a.overwrite else "new"
    distributed.check_layout(members)
    distributed.together(lambda: (check_sweep_folder(out, members, mode), engine.check_folders(members, mode)))
    if mode == "overwrite" and out.exists() and distributed.is_main():
        # member folders are replaced by the engine; stale files of an older sweep go too
        for stale in ("sweep.json", "results.md"):
            (out / stale).unlink(missing_ok=True)
    if distributed.is_main():
        write_sweep_json(out, spec, members)
    try:
        summaries = engine.run(members, mode, progress=not a.no_progress)
    finally:
        text = write_results(out, spec["name"], members) if distributed.is_main() else ""
    print(text)
    return 0 if all(s["status"] in ("ok", "diverged") for s in summaries) else 3



def entry(argv=None) -> int:
    """The command line: `main` behind the one-line error handling; its exit status."""
    return distributed.main_wrapper(main, argv)


if __name__ == "__main__":
    sys.exit(entry())
