"""Command line for one training run.

    python -m experiments.train --preset fmnist-dep --epochs 2 --subset 6000
    python -m experiments.train --preset mnist-dep --set lr=0.4,0.02 --set beta=0.2 --seed 3
    python -m experiments.train --resume --out runs/mnist-dep-seed0     # continue a run
    python -m experiments.train --list                                  # the presets

Presets (`experiments/presets.py`) hold the published hyperparameters of paper 000's
Table 2; `--set key=value` overrides any config field (`experiments/config.py`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments import config as C
from experiments.presets import PRESETS


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help=f"one of {sorted(PRESETS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--subset", type=int, help="train on N examples (seeded choice)")
    p.add_argument("--test-subset", type=int, help="evaluate on N test examples")
    p.add_argument("--data-dir", help="folder with the dataset files (IDX .gz or KMNIST .npz)")
    p.add_argument("--out", help="run folder (default runs/<preset>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--list", action="store_true", help="print the presets and exit")
    a = p.parse_args(argv)

    if a.list:
        for name, cfg in sorted(PRESETS.items()):
            print(f"{name:14s} {json.dumps(cfg)}")
        return 0
    if a.preset and a.preset not in PRESETS:
        p.error(f"unknown preset {a.preset!r}; choose one of {sorted(PRESETS)}")
    run_dir = Path(a.out) if a.out else None
    if a.resume:
        if run_dir is None:
            p.error("--resume needs --out RUN_DIR")
        saved = json.loads((run_dir / "config.json").read_text())
        cfg = C.resolve(saved, {"epochs": a.epochs} if a.epochs else {})
    else:
        overrides = {}
        for name, value in (("epochs", a.epochs), ("seed", a.seed), ("subset", a.subset),
                            ("test_subset", a.test_subset), ("data_dir", a.data_dir)):
            if value is not None:
                overrides[name] = value
        try:
            cfg = C.apply_overrides(C.resolve(PRESETS.get(a.preset)), a.set)
            cfg = C.resolve(cfg, overrides)
        except ValueError as e:
            p.error(str(e))
        if run_dir is None:
            run_dir = Path("runs") / f"{a.preset or 'custom'}-seed{cfg['seed']}"
    from experiments.run import train
    summary = train(cfg, run_dir, resume=a.resume, progress=not a.no_progress)
    return {"ok": 0, "interrupted": 130}.get(summary["status"], 3)


if __name__ == "__main__":
    sys.exit(main())
