"""Run a sweep spec: `python -m experiments.sweep SPEC.toml|SPEC.json [options]`.

A spec (TOML or JSON) names the data, the training length and the members:

    name = "dep_lr"               # default: the file's stem; output in runs/<name>
    dataset = "mnist"             # anything ep_jax.data.load_dataset knows, or "synthetic"
    data_dir = "..."              # optional, handed to load_dataset
    epochs = 20
    subset = 0                    # train on the first N training examples (0: all)
    test_subset = 0               # evaluate on the first N test examples (0: all)
    data_seed = 0                 # order of training batches, shared by every member
    drop_last = false             # drop the last partial training batch
    eval_batch_size = 1000
    out = "runs/dep_lr"           # optional

    [synthetic]                   # only for dataset = "synthetic" (ep_jax.synthetic)
    n_features = 784; n_classes = 10; n_train = 1000; n_test = 500; noise = 0.3; seed = 0

    [base]                        # settings of every member (ep_jax.sweep.MemberConfig)
    model = "dendritic"; sizes = [784, 256, 10]; estimator = "symmetric"; lr = [0.4, 0.02]

    [grid]                        # cartesian product over lists of alternatives
    seed = [0, 1, 2]
    beta = [0.1, 0.2]

    [[members]]                   # optional explicit members, merged over [base]
    name = "one_sided"; estimator = "one_sided"; nudge = "random_sign"

Members with different static structure (model, widths, estimator, step counts, batch)
run as separate vmapped groups, one after another. Every member sees the same batches in
the same order (epoch e shuffles with `fold_in(PRNGKey(data_seed), e)`).

Output, per member `<out>/<member>/`: `config.json` (the member's settings and data
settings), `metrics.jsonl` (per epoch: epoch, train_acc — running free-phase accuracy
during the epoch —, test_acc, loss — mean training loss —, time_s — the wall time of the
epoch of the whole group —, alive), `summary.json` (status ok|diverged, final_test_acc,
best_test_acc, best_epoch, diverged_step). Accuracies are fractions in JSON, percent in
`<out>/results.md` (one row per member, and mean ± std over seeds for members that differ
only in seed). `<out>/_checkpoints/group<i>.pkl` holds the stacked state after the last
finished epoch; `--resume` continues from it (also to more epochs with `--epochs`) and
gives the same numbers as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import sys
import time
import tomllib
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ep_jax import sweep as S
from ep_jax.synthetic import make_synthetic

SPEC_KEYS = {"name", "description", "dataset", "data_dir", "epochs", "subset", "test_subset",
             "data_seed", "drop_last", "eval_batch_size", "out", "synthetic", "base", "grid", "members"}
DATA_KEYS = ("dataset", "subset", "test_subset", "data_seed", "drop_last")


# --- spec -------------------------------------------------------------------------------------

def load_spec(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file {str(path)!r} does not exist")
    if path.suffix == ".toml":
        spec = tomllib.loads(path.read_text())
    elif path.suffix == ".json":
        spec = json.loads(path.read_text())
    else:
        raise ValueError(f"spec must be a .toml or .json file, got {str(path)!r}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; known: {sorted(SPEC_KEYS)}")
    spec.setdefault("name", path.stem)
    spec.setdefault("dataset", "synthetic")
    spec.setdefault("epochs", 1)
    for k, v in (("subset", 0), ("test_subset", 0), ("data_seed", 0), ("drop_last", False),
                 ("eval_batch_size", 1000)):
        spec.setdefault(k, v)
    for k in ("epochs", "eval_batch_size"):
        if int(spec[k]) < 1:
            raise ValueError(f"{path}: {k} must be >= 1, got {spec[k]}")
    return spec


def spec_members(spec) -> list[S.MemberConfig]:
    return S.expand_grid(spec.get("base"), spec.get("grid"), spec.get("members", ()))


# --- data -------------------------------------------------------------------------------------

def load_data(spec):
    name = spec["dataset"]
    if name == "synthetic":
        syn = dict(spec.get("synthetic", {}))
        seed = syn.pop("seed", 0)
        ds = make_synthetic(jax.random.PRNGKey(seed), **syn)
    else:
        try:
            from ep_jax.data import load_dataset
        except ImportError:
            raise SystemExit(f"dataset {name!r} needs ep_jax.data.load_dataset, which is not in this "
                             "tree; use dataset = \"synthetic\"") from None
        ds = load_dataset(name, data_dir=spec.get("data_dir"))
    x, y, xt, yt = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if spec["subset"]:
        x, y = x[:spec["subset"]], y[:spec["subset"]]
    if spec["test_subset"]:
        xt, yt = xt[:spec["test_subset"]], yt[:spec["test_subset"]]
    return x, y, xt, yt


def _batches_fallback(x, y, batch_size, key=None, drop_last=False):
    n = x.shape[0]
    order = np.asarray(jax.random.permutation(key, n)) if key is not None else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield jnp.asarray(x[idx]), jnp.asarray(y[idx])


try:
    from ep_jax.data import batches
except ImportError:
    batches = _batches_fallback


def n_batches(n, batch_size, drop_last):
    return n // batch_size if drop_last else math.ceil(n / batch_size)


# --- files ------------------------------------------------------------------------------------

def _finite_or_none(v):
    v = float(v)
    return v if math.isfinite(v) else None


def _atomic_write(path: Path, data: bytes):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_metrics(path: Path, upto: int | None = None) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    return [r for r in rows if upto is None or r["epoch"] <= upto]


def member_config_json(cfg: S.MemberConfig, spec, group_index: int) -> dict:
    return {**cfg.to_dict(), **{k: spec[k] for k in DATA_KEYS}, "group": group_index}


def summarize(rows: list[dict], alive: bool, diverged_step: int) -> dict:
    scored = [r for r in rows if r["test_acc"] is not None]
    best = max(scored, key=lambda r: r["test_acc"], default=None)
    return {
        "status": "ok" if alive else "diverged",
        "epochs": rows[-1]["epoch"] if rows else 0,
        "final_test_acc": rows[-1]["test_acc"] if rows else None,
        "best_test_acc": best and best["test_acc"],
        "best_epoch": best and best["epoch"],
        "diverged_step": None if alive else diverged_step,
    }


# --- training ---------------------------------------------------------------------------------

def run_group(gi: int, group: S.Group, data, spec, out: Path, resume: bool, progress: bool,
              dt_sampler=S.hts_dt_sampler) -> list[dict]:
    """Train one group to `spec["epochs"]`, resuming from its checkpoint when asked."""
    x, y, xt, yt = data
    names = [c.name for c in group.members]
    dirs = [out / n for n in names]
    configs = [member_config_json(c, spec, gi) for c in group.members]
    ckpt = out / "_checkpoints" / f"group{gi}.pkl"
    state, sh = S.build_sweep(group, dt_sampler)
    start = 0
    if resume and ckpt.exists():
        saved = pickle.loads(ckpt.read_bytes())
        if saved["members"] != names:
            raise SystemExit(f"{ckpt}: checkpoint holds members {saved['members']}, the spec gives {names}")
        for d, c in zip(dirs, configs):
            if json.loads((d / "config.json").read_text()) != c:
                raise SystemExit(f"{d / 'config.json'} differs from the spec's settings for this member; "
                                 "resume needs the same spec (only epochs may grow)")
        state = flax.serialization.from_bytes(state, saved["state"])
        start = saved["epoch"]
    for d, c in zip(dirs, configs):
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(c, indent=1))
        # keep exactly the epochs the checkpoint holds (a crash may have left one more)
        rows = read_metrics(d / "metrics.jsonl", upto=start)
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    model, est, bs = group.model, group.estimator, group.batch_size
    if x.shape[1] != model.sizes[0]:
        raise SystemExit(f"group {gi} ({names[0]}, ...): sizes[0] = {model.sizes[0]} but the data has "
                         f"{x.shape[1]} features")
    epochs, M = int(spec["epochs"]), len(names)
    nb = n_batches(x.shape[0], bs, spec["drop_last"])
    bar = tqdm(total=(epochs - start) * nb, desc=f"group {gi} ({M} members)", disable=not progress,
               file=sys.stderr)
    for epoch in range(start + 1, epochs + 1):
        t0 = time.perf_counter()
        key = jax.random.fold_in(jax.random.PRNGKey(spec["data_seed"]), epoch)
        correct = jnp.zeros((M,), jnp.int32)
        loss_sum = jnp.zeros((M,))
        seen = 0
        for xb, yb in batches(x, y, bs, key=key, drop_last=spec["drop_last"]):
            state, m = S.sweep_step(model, est, state, xb, yb, sh)
            correct += m["correct"]
            loss_sum += m["loss"] * xb.shape[0]
            seen += xb.shape[0]
            bar.update(1)
        test_correct = jnp.zeros((M,), jnp.int32)
        for xb, yb in batches(xt, yt, spec["eval_batch_size"]):
            c, _ = S.sweep_evaluate(model, state, xb, yb, sh, est.t_free)
            test_correct += c
        train_acc, loss = np.asarray(correct) / seen, np.asarray(loss_sum) / seen
        test_acc, alive = np.asarray(test_correct) / xt.shape[0], np.asarray(state.alive)
        elapsed = time.perf_counter() - t0
        for i, d in enumerate(dirs):
            row = {"epoch": epoch, "train_acc": _finite_or_none(train_acc[i]),
                   "test_acc": _finite_or_none(test_acc[i]), "loss": _finite_or_none(loss[i]),
                   "time_s": elapsed, "alive": bool(alive[i])}
            with open(d / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        ckpt.parent.mkdir(exist_ok=True)
        _atomic_write(ckpt, pickle.dumps({"epoch": epoch, "members": names,
                                          "state": flax.serialization.to_bytes(state)}))
        bar.set_postfix(epoch=epoch, test_acc=f"{100 * np.mean(test_acc[alive]) if alive.any() else 0:.2f}")
    bar.close()

    summaries = []
    alive, div = np.asarray(state.alive), np.asarray(state.diverged_step)
    for i, d in enumerate(dirs):
        s = summarize(read_metrics(d / "metrics.jsonl"), bool(alive[i]), int(div[i]))
        (d / "summary.json").write_text(json.dumps(s, indent=1))
        summaries.append({"member": names[i], **s})
    return summaries


# --- results table ----------------------------------------------------------------------------

def _pct(v):
    return "–" if v is None else f"{100 * v:.2f}"


def results_table(configs: list[S.MemberConfig], summaries: dict) -> str:
    """Markdown: one row per member, then mean ± std over seeds."""
    dicts = [c.to_dict() for c in configs]
    varying = [k for k in dicts[0] if k != "name"
               and len({json.dumps(d[k], sort_keys=True) for d in dicts}) > 1]
    show = lambda d, k: S._label(d[k]) if d[k] is not None else "–"
    lines = ["| member | " + " | ".join(varying) + " | status | final test % | best test % |",
             "|" + "---|" * (len(varying) + 4)]
    for c, d in zip(configs, dicts):
        s = summaries.get(c.name)
        if s is None:
            continue
        lines.append(f"| {c.name} | " + " | ".join(show(d, k) for k in varying)
                     + f" | {s['status']} | {_pct(s['final_test_acc'])} | {_pct(s['best_test_acc'])} |")
    cells: dict[str, list] = {}
    others = [k for k in varying if k != "seed"]
    for c, d in zip(configs, dicts):
        if c.name in summaries:
            cells.setdefault(" | ".join(show(d, k) for k in others), []).append(summaries[c.name])
    if "seed" in varying:
        lines += ["", "Mean ± std over seeds (std with ddof=1; diverged members included):", "",
                  "| " + " | ".join(others + ["n", "diverged", "final test %", "best test %"]) + " |",
                  "|" + "---|" * (len(others) + 4)]

        def ms(vals):
            vals = [100 * v for v in vals if v is not None]
            if not vals:
                return "–"
            return f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.2f}"

        for cell, ss in cells.items():
            n_div = sum(s["status"] == "diverged" for s in ss)
            lines.append(f"| {cell + ' | ' if others else ''}{len(ss)} | {n_div} | "
                         f"{ms([s['final_test_acc'] for s in ss])} | {ms([s['best_test_acc'] for s in ss])} |")
    return "\n".join(lines) + "\n"


# --- command line -----------------------------------------------------------------------------

def main(argv=None, dt_sampler=S.hts_dt_sampler):
    ap = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n")[0])
    ap.add_argument("spec", help="sweep spec, .toml or .json")
    ap.add_argument("--out", help="output folder (default: the spec's out, else runs/<name>)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    ap.add_argument("--epochs", type=int, help="override the spec's epochs")
    ap.add_argument("--subset", type=int, help="override the spec's subset (training examples)")
    ap.add_argument("--dry-run", action="store_true", help="list groups and members, train nothing")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    spec = load_spec(args.spec)
    for k in ("epochs", "subset"):
        if getattr(args, k) is not None:
            spec[k] = getattr(args, k)
    configs = spec_members(spec)
    groups = S.group_members(configs)
    out = Path(args.out or spec.get("out") or Path("runs") / spec["name"])
    print(f"sweep {spec['name']}: {len(configs)} members in {len(groups)} group(s), "
          f"{spec['epochs']} epochs on {spec['dataset']} -> {out}")
    for gi, g in enumerate(groups):
        print(f"  group {gi}: {g.model.name} {g.model.sizes} {g.estimator.kind} "
              f"T1={g.estimator.t_free} T2={g.estimator.t_nudge} batch={g.batch_size}: "
              + ", ".join(c.name for c in g.members))
    if args.dry_run:
        return []
    # sample every member's dt before any training, so a missing sampler fails at once
    for g in groups:
        for c in g.members:
            if c.dt_dist is not None:
                try:
                    S.member_hyper(c, g.model, dt_sampler)
                except RuntimeError as e:
                    raise SystemExit(f"member {c.name!r}: {e}") from None
    ckdir = out / "_checkpoints"
    if not args.resume and ckdir.exists() and any(ckdir.iterdir()):
        raise SystemExit(f"{out} already holds a sweep; pass --resume to continue it or choose another --out")
    data = load_data(spec)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(
        {**{k: v for k, v in spec.items() if k not in ("base", "grid", "members")},
         "members": [c.to_dict() for c in configs]}, indent=1))
    summaries = {}
    for gi, g in enumerate(groups):
        for s in run_group(gi, g, data, spec, out, args.resume, not args.no_progress, dt_sampler):
            summaries[s["member"]] = s
        (out / "results.md").write_text(f"# {spec['name']}\n\n" + results_table(configs, summaries))
    print((out / "results.md").read_text())
    return [summaries[c.name] for c in configs]


if __name__ == "__main__":
    main()
