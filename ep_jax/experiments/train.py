"""Command line for one training run (a sweep of one, through `experiments.engine`).

    python -m experiments.train --preset fmnist-dep-1h                 # the README's main job
    python -m experiments.train --preset mnist-dep --set lr=0.4,0.02 --set beta=0.2 --seed 3
    python -m experiments.train --resume --out runs/mnist-dep-seed0 --epochs 60     # continue
    python -m experiments.train --list                                 # the presets
    python -m experiments.train --list-fields                          # every config field

The run folder (default `runs/<preset>-seed<seed>`) must not exist yet, unless
`--resume` (continue its checkpoint, bit for bit; only `--epochs` may change) or
`--overwrite` (replace it). The whole config is checked before any data is read.
`--list` shows the presets as a table; `--list-fields` every config field, then what
each estimator kind computes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ep_jax.experiments import cli, distributed
from ep_jax.experiments.config import ConfigError, RunConfig, describe, parse_sets, validate
from ep_jax.experiments.errors import RunError
from ep_jax.experiments.names import safe_component
from ep_jax.experiments.presets import PRESETS

#: integers beyond this are no config value (and overflow float comparisons): refused first
INT_LIMIT = 2**63

#: what each estimator kind computes (ep_jax.estimators), for --list-fields
ESTIMATORS = {
    "symmetric": "EP, nudged at +beta and -beta: g = -(dPhi(s+) - dPhi(s-)) / (2 beta); bias O(beta^2) (default)",
    "one_sided": "EP, nudged at +beta only: g = -(dPhi(s+) - dPhi(s0)) / beta; bias O(beta) "
    "(unbiased on average with nudge = random_sign)",
    "chl": "contrastive Hebbian rule: -(1/beta) <pre(s+) x (s+ - s0)> per layer (paper 003's rule; also "
    "for gamma != 1)",
    "bptt": "backprop through time, truncated: t_free - t_nudge free steps without gradient, then jax.grad "
    "through the last t_nudge steps (DBPTT for the dendritic model; beta is not used)",
    "bptt_full": "backprop through time through all t_free free steps (t_nudge and beta are not used)",
    "holomorphic": "EP nudged at n_points complex betas |beta| e^(2 pi i k/N) from the free state: the first "
    "Fourier coefficient of dPhi, exact at finite beta as N grows; N = 2 is symmetric "
    "(holomorphic activations: tanh, sigmoid, identity)",
    "implicit": "the exact gradient at the free fixed point by implicit differentiation (adjoint fixed-point "
    "iteration); refused when the free phase's residual exceeds implicit_tol (beta not used)",
}


def check_int_flags(flags: dict):
    """Refuse (ConfigError, one line) an integer flag beyond +-2**63 (`{flag: value}`;
    None: not given) before a config comparison could overflow."""
    for flag, v in flags.items():
        if isinstance(v, int) and not -INT_LIMIT < v < INT_LIMIT:
            raise ConfigError(
                f"{flag}: must be an integer of magnitude below 2**63, got a number of {len(str(abs(v)))} digits"
            )


def check_int_values(values: dict, where: str = ""):
    """Refuse (ConfigError naming the field) a config value (`{field: value}`, lists
    included) that is an integer beyond +-2**63."""
    for k, v in values.items():
        for u in v if isinstance(v, (list, tuple)) else (v,):
            if isinstance(u, int) and not isinstance(u, bool) and not -INT_LIMIT < u < INT_LIMIT:
                raise ConfigError(
                    f"{where}{k}: must be an integer of magnitude below 2**63, got a number "
                    f"of {len(str(abs(u)))} digits"
                )


def check_data_dir(value, what: str = "--data-dir"):
    """Refuse (ConfigError, one line) a data folder that exists but is not a folder (a
    file such as /etc/passwd), before the data layer reports it as "does not exist"."""
    if value and Path(value).exists() and not Path(value).is_dir():
        raise ConfigError(f"{what} {value}: is a file, not a folder; give the folder that holds the dataset's files")


def preset_table() -> str:
    """The presets as a table: name, paper table cell, model, estimator, dataset, sizes, epochs."""
    from ep_jax.experiments import presets

    rows = [("preset", "paper/table", "model", "estimator", "dataset", "sizes", "epochs")]
    for name in sorted(PRESETS):
        cfg = presets.preset_config(name)
        t2, t1 = presets.table2_cell(cfg), presets.table1_cell(cfg)
        where = f"dEP Table 2 ({t2[0]}, {t2[1]})" if t2 else f"HTS Table 1 ({t1[1]}, dt_out {t1[2]:g})" if t1 else "-"
        rows.append((name, where, cfg.model, cfg.estimator, cfg.dataset, cfg.layer_summary(), str(cfg.epochs)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return (
        "\n".join(lines) + "\n\nevery preset's values: ep_jax/experiments/presets.py; override any field with "
        "--set KEY=VALUE (--list-fields shows them)"
    )


def estimator_table() -> str:
    """One line per estimator kind: what it computes."""
    w = max(map(len, ESTIMATORS))
    return "estimator kinds (ep_jax.estimators):\n" + "\n".join(f"  {k:{w}s}  {v}" for k, v in ESTIMATORS.items())


def parser():
    """The command line's argument parser."""
    p = argparse.ArgumentParser(
        prog=cli.prog("train"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", help="a preset (--list shows them)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable; --list-fields shows them)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help="epochs to train (overrides the preset's; on --resume: the new total, to extend the run)",
    )
    p.add_argument(
        "--seed", type=int, help="seed of init, masks, time steps, data order and nudge signs (0 .. 2**32-1; default 0)"
    )
    p.add_argument("--subset", type=int, help="train on N examples (seeded random choice)")
    p.add_argument("--test-subset", type=int, help="evaluate on N test examples")
    p.add_argument(
        "--data-dir",
        help="folder with the dataset files (the only place looked); also with --resume, when the data moved",
    )
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
    check_int_values(values, "--set ")
    check_int_flags({"--epochs": a.epochs, "--seed": a.seed, "--subset": a.subset, "--test-subset": a.test_subset})
    for name, value in (
        ("epochs", a.epochs),
        ("seed", a.seed),
        ("subset", a.subset),
        ("test_subset", a.test_subset),
        ("data_dir", a.data_dir),
    ):
        if value is not None:
            values[name] = value
    cfg = validate(RunConfig.from_dict(values))
    check_data_dir(cfg.data_dir, "--data-dir" if a.data_dir else "data_dir")
    return cfg


def main(argv=None):
    """`python -m experiments.train`: one run; returns the exit status (0 ok, 130
    interrupted, 3 otherwise)."""
    a = parser().parse_args(argv)
    if a.list:
        print(preset_table())
        return 0
    if a.list_fields:
        print(describe())
        print()
        print(estimator_table())
        return 0
    rt = distributed.setup(a)  # before any other JAX use
    from ep_jax.experiments import engine

    if a.resume:
        if not a.out:
            raise ConfigError("--resume needs --out RUN_DIR")
        ignored = [
            flag
            for flag, v in (
                ("--preset", a.preset),
                ("--set", a.set),
                ("--seed", a.seed),
                ("--subset", a.subset),
                ("--test-subset", a.test_subset),
            )
            if v
        ]
        if ignored:
            raise ConfigError(
                f"--resume continues the saved config; it would ignore {', '.join(ignored)} "
                "(only --epochs and where the data lives, --data-dir, may change; start a new run "
                "for other settings)"
            )
        run_dir = Path(a.out)
        saved = engine.read_json(run_dir / "config.json")
        if saved is None:
            raise RunError(f"{run_dir}: no run to resume (config.json is missing)")
        cfg = validate(RunConfig.from_dict(saved, where=f"{run_dir}/config.json: "))
        if a.epochs is not None:
            check_int_flags({"--epochs": a.epochs})
            cfg = validate(cfg.replace(epochs=a.epochs))
        # where the data lives is not part of the run (the files' checksums are): a new
        # --data-dir, or EP_JAX_DATA_DIR in place of a saved folder, finds data that moved
        if a.data_dir:
            check_data_dir(a.data_dir)
            cfg = validate(cfg.replace(data_dir=a.data_dir))
        elif cfg.data_dir and os.environ.get("EP_JAX_DATA_DIR"):
            cfg = validate(cfg.replace(data_dir=None))
        mode = "resume"
    else:
        cfg = resolve(a)
        if a.out:
            run_dir = Path(a.out)
        else:
            run_dir = Path("runs") / safe_component(
                f"{a.preset or 'custom'}-seed{cfg.seed}", "run folder name", ConfigError
            )
        mode = "overwrite" if a.overwrite else "new"
    member = engine.Member(cfg, run_dir.resolve().name or str(run_dir), run_dir)
    (summary,) = engine.run([member], mode, progress=not a.no_progress, runtime=rt, loggers=a.log)
    return {"ok": 0, "interrupted": 130}.get(summary["status"], 3)


if __name__ == "__main__":
    sys.exit(distributed.main_wrapper(main))
