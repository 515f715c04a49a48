"""Command line for one training run (a sweep of one, through `experiments.engine`).

    python -m experiments.train --preset fmnist-dep-1h                 # the README's main job
    python -m experiments.train --preset mnist-dep --set lr=0.4,0.02 --set beta=0.2 --seed 3
    python -m experiments.train --resume --out runs/mnist-dep-seed0 --epochs 60     # continue
    python -m experiments.train --list                                 # the presets
    python -m experiments.train --list-fields                          # every config field

The run folder (default `runs/<preset>-seed<seed>`) must not exist yet, unless
`--resume` (continue its checkpoint, bit for bit; only `--epochs` may change) or
`--overwrite` (replace it). The whole config is checked before any data is read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ep_jax.experiments import cli, distributed
from ep_jax.experiments.config import ConfigError, RunConfig, describe, parse_sets, validate
from ep_jax.experiments.presets import PRESETS
from ep_jax.experiments.errors import RunError


def parser():
    p = argparse.ArgumentParser(prog=cli.prog("train"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="a preset (--list shows them)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable; --list-fields shows them)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--subset", type=int, help="train on N examples (seeded random choice)")
    p.add_argument("--test-subset", type=int, help="evaluate on N test examples")
    p.add_argument("--data-dir", help="folder with the dataset files (the only place looked)")
    p.add_argument("--out", help="run folder (default runs/<preset>-seed<seed>)")
    cli.add_run_modes(p)
    p.add_argument("--list", action="store_true", help="print the presets and exit")
    p.add_argument("--list-fields", action="store_true", help="print every config field and exit")
    distributed.add_flags(p)
    cli.add_common(p)
    return p


def resolve(a) -> RunConfig:
    """The run's config from preset, --set and the shortcut flags (not for --resume)."""
    values = {}
    if a.preset:
        if a.preset not in PRESETS:
            raise ConfigError(f"unknown preset {a.preset!r}; choose one of {sorted(PRESETS)}")
        values.update(PRESETS[a.preset])
    values.update(parse_sets(a.set))
    for name, value in (("epochs", a.epochs), ("seed", a.seed), ("subset", a.subset),
                        ("test_subset", a.test_subset), ("data_dir", a.data_dir)):
        if value is not None:
            values[name] = value
    return validate(RunConfig.from_dict(values))


def main(argv=None):
    a = parser().parse_args(argv)
    if a.list:
        for name, values in sorted(PRESETS.items()):
            print(f"{name:22s} {json.dumps(values)}")
        return 0
    if a.list_fields:
        print(describe())
        return 0
    distributed.setup(a)   # before any other JAX use
    from ep_jax.experiments import engine
    if a.resume:
        if not a.out:
            raise ConfigError("--resume needs --out RUN_DIR")
        ignored = [flag for flag, v in (("--preset", a.preset), ("--set", a.set), ("--seed", a.seed),
                                        ("--subset", a.subset), ("--test-subset", a.test_subset),
                                        ("--data-dir", a.data_dir)) if v]
        if ignored:
            raise ConfigError(f"--resume continues the saved config; it would ignore {', '.join(ignored)} "
                              "(only --epochs may change; start a new run for other settings)")
        run_dir = Path(a.out)
        saved = engine.read_json(run_dir / "config.json")
        if saved is None:
            raise RunError(f"{run_dir}: no run to resume (config.json is missing)")
        cfg = validate(RunConfig.from_dict(saved, where=f"{run_dir}/config.json: "))
        if a.epochs is not None:
            cfg = validate(cfg.replace(epochs=a.epochs))
        mode = "resume"
    else:
        cfg = resolve(a)
        run_dir = Path(a.out) if a.out else Path("runs") / f"{a.preset or 'custom'}-seed{cfg.seed}"
        mode = "overwrite" if a.overwrite else "new"
    member = engine.Member(cfg, run_dir.name, run_dir)
    (summary,) = engine.run([member], mode, progress=not a.no_progress)
    return {"ok": 0, "interrupted": 130}.get(summary["status"], 3)



def entry(argv=None) -> int:
    """The command line: `main` behind the one-line error handling; its exit status."""
    return distributed.main_wrapper(main, argv)


if __name__ == "__main__":
    sys.exit(entry())
