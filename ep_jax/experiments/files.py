"""Validating readers of every JSON file the experiment layer reads.

A run folder's `config.json`, `summary.json` and `metrics.jsonl` (and a sweep's
`sweep.json`) are read here and nowhere else. Each reader checks what it returns and
names the file (and, for `metrics.jsonl`, the line) in a one-line error: a missing file
where one is needed, bytes that are not UTF-8, text that is not JSON, JSON nested too deep
to read (`json.loads` of 100 000 `[` raises RecursionError), a list where a table is
expected, a missing key, a value of the wrong type or out of range. Damaged files raise
`RunError` (`ConfigError` for a config); nothing here writes. Only regular files are read,
of at most `MAX_JSON_BYTES` (`ep_jax._safe_read`): a named pipe or a device in a file's place
is refused in one line, never waited on.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ep_jax._safe_read import MIB, read_regular
from ep_jax.experiments.config import FIELDS, ConfigError, RunConfig, short, validate
from ep_jax.experiments.errors import RunError

#: the statuses `summary.json` may hold (`engine.summarize`)
STATUSES = ("ok", "diverged", "interrupted", "failed", "not started", "running")
#: the keys `engine.summarize` writes
SUMMARY_KEYS = (
    "status",
    "message",
    "epochs_done",
    "final_test_acc",
    "best_test_acc",
    "best_epoch",
    "final_train_acc",
    "train_time_s",
    "diverged_step",
)
#: the columns every `metrics.jsonl` row has (alignment runs add `align_time_s`, `alignment`)
METRIC_KEYS = ("epoch", "train_acc", "loss", "test_acc", "test_loss", "time_s", "steps")
KINDS = {"table": dict, "list": list, "any": object}
#: the largest JSON file of a run or sweep folder read (a metrics.jsonl of thousands of
#: epochs with alignment records is a few MiB)
MAX_JSON_BYTES = 64 * MIB


def _name(kind: str) -> str:
    return {"table": "a table ({...})", "list": "a list ([...])"}[kind]


def _type_name(v) -> str:
    return {
        dict: "a table",
        list: "a list",
        str: "a string",
        bool: "true/false",
        type(None): "null",
        int: "a number",
        float: "a number",
    }.get(type(v), type(v).__name__)


def parse_json(text: str, source: str, kind: str = "any"):
    """JSON `text` as a value of `kind` ("table", "list" or "any"); `RunError` naming
    `source` for text that is not JSON, is nested too deep, or is of another kind."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RunError(f"{source}: not valid JSON ({e})") from None
    except RecursionError:
        raise RunError(f"{source}: JSON nested too deep to read (damaged or not this project's file)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise RunError(f"{source}: not readable JSON ({e})") from None
    if kind != "any" and not isinstance(value, KINDS[kind]):
        raise RunError(f"{source}: expected {_name(kind)}, got {_type_name(value)}")
    return value


def read_text(path: Path, required: bool = False, limit: int = MAX_JSON_BYTES) -> str | None:
    """The UTF-8 text of the regular file `path` of at most `limit` bytes
    (`ep_jax._safe_read.read_regular`: a pipe or device in its place is refused, never
    waited on); None when it does not exist (unless `required`)."""
    path = Path(path)
    try:
        data = read_regular(path, limit, RunError, "file")
    except FileNotFoundError:
        if required:
            raise RunError(f"{path}: missing") from None
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RunError(f"{path}: not UTF-8 text (byte {e.start}); damaged or not this project's file") from None


def read_json(path: Path, kind: str = "table", required: bool = False):
    """The JSON value in `path`, of `kind` ("table", "list" or "any"). A missing file
    gives None, or `RunError` when `required`; a file that is not UTF-8, not JSON, nested
    too deep or of another kind gives `RunError` naming it."""
    text = read_text(path, required)
    return None if text is None else parse_json(text, str(path), kind)


# --- config.json ------------------------------------------------------------------------


def config_from(d: dict, source: str) -> RunConfig:
    """A validated `RunConfig` from the table `d` of `source` (a config.json): every field
    present (the engine writes them all: a missing one means damage), known, of its type
    and in range; errors are prefixed with `source`."""
    missing = [k for k in FIELDS if k not in d]
    if missing:
        raise ConfigError(
            f"{source}: missing config field(s) {short(missing)}; a run's config.json has every "
            "field, so the file is damaged or not a run's"
        )
    cfg = RunConfig.from_dict(d, where=f"{source}: ")
    try:
        return validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def read_config(run_dir: Path) -> RunConfig:
    """The validated `RunConfig` of a run folder's `config.json` (`config_from`);
    `RunError` when there is none (not a run folder)."""
    path = Path(run_dir) / "config.json"
    d = read_json(path, "table")
    if d is None:
        raise RunError(f"{run_dir}: no config.json (not a run folder)")
    return config_from(d, str(path))


# --- checks of single values --------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
    return _is_num(v) and (isinstance(v, int) or math.isfinite(v))


def _check(ok: bool, where: str, key: str, expected: str, v):
    if not ok:
        raise RunError(f"{where}: {key}: expected {expected}, got {short(v)}")


def _int(where, key, v, lo=0, none=False):
    if none and v is None:
        return
    _check(_is_int(v) and v >= lo, where, key, f"an integer >= {lo}" + (" or null" if none else ""), v)


def _acc(where, key, v, none=False):
    if none and v is None:
        return
    _check(_finite(v) and 0 <= v <= 100, where, key, "an accuracy in [0, 100] (%)" + (" or null" if none else ""), v)


# --- summary.json -----------------------------------------------------------------------


def check_summary(s, source: str) -> dict:
    """`s` if it is a summary as `engine.summarize` writes it, else `RunError` naming
    `source`: a table with every key, a known status, epochs_done an integer >= 0,
    accuracies numbers in [0, 100] or null."""
    if not isinstance(s, dict):
        raise RunError(f"{source}: expected a table ({{...}}), got {_type_name(s)}")
    missing = [k for k in SUMMARY_KEYS if k not in s]
    if missing:
        raise RunError(f"{source}: missing key(s) {missing}; damaged or not a run's summary")
    _check(s["status"] in STATUSES, source, "status", f"one of {list(STATUSES)}", s["status"])
    _check(isinstance(s["message"], str), source, "message", "a string", s["message"])
    _int(source, "epochs_done", s["epochs_done"])
    for k in ("final_test_acc", "best_test_acc", "final_train_acc"):
        _acc(source, k, s[k], none=True)
    _int(source, "best_epoch", s["best_epoch"], lo=1, none=True)
    _int(source, "diverged_step", s["diverged_step"], none=True)
    _check(
        _finite(s["train_time_s"]) and s["train_time_s"] >= 0, source, "train_time_s", "seconds >= 0", s["train_time_s"]
    )
    if (s["epochs_done"] == 0) != (s["final_test_acc"] is None):
        raise RunError(
            f"{source}: epochs_done = {s['epochs_done']} but final_test_acc = "
            f"{short(s['final_test_acc'])}; damaged summary"
        )
    return s


def read_summary(run_dir: Path) -> dict | None:
    """A run folder's `summary.json`, checked (`check_summary`); None when there is none
    (a run that died before writing one)."""
    path = Path(run_dir) / "summary.json"
    s = read_json(path, "any")
    return None if s is None else check_summary(s, str(path))


# --- metrics.jsonl ------------------------------------------------------------------------


def _check_alignment(recs, where):
    _check(isinstance(recs, list), where, "alignment", "a list of records", recs)
    for i, r in enumerate(recs):
        w = f"{where}: alignment record {i + 1}"
        if not isinstance(r, dict):
            raise RunError(f"{w}: expected a table, got {_type_name(r)}")
        for k in ("step", "angle", "cosine"):
            if k not in r:
                raise RunError(f"{w}: missing {k!r}")
        _int(w, "step", r["step"])
        _check(_is_num(r["angle"]), w, "angle", "a number", r["angle"])
        for k in ("cosine", "rel_rmse", "sign_agree"):
            if k in r:
                v = r[k]
                _check(
                    isinstance(v, dict) and all(_is_num(u) for u in v.values()),
                    w,
                    k,
                    "a table of numbers (one per parameter)",
                    v,
                )


def check_metrics_row(row, where: str, previous_epoch: int = 0) -> dict:
    """`row` if it is a `metrics.jsonl` row (a table with every `METRIC_KEYS` column:
    epoch an integer > `previous_epoch`, accuracies in [0, 100], losses numbers (NaN
    allowed: logged as computed), time_s >= 0, steps an integer >= 0; alignment records
    well formed when present), else `RunError` naming `where`."""
    if not isinstance(row, dict):
        raise RunError(f"{where}: expected a table ({{...}}), got {_type_name(row)}")
    missing = [k for k in METRIC_KEYS if k not in row]
    if missing:
        raise RunError(f"{where}: missing column(s) {missing}")
    _int(where, "epoch", row["epoch"], lo=1)
    if row["epoch"] <= previous_epoch:
        raise RunError(f"{where}: epoch {row['epoch']} after epoch {previous_epoch}; epochs must increase")
    _acc(where, "train_acc", row["train_acc"])
    _acc(where, "test_acc", row["test_acc"])
    for k in ("loss", "test_loss"):
        _check(_is_num(row[k]), where, k, "a number", row[k])
    for k in ("time_s", "align_time_s"):
        if k in row:
            _check(_finite(row[k]) and row[k] >= 0, where, k, "seconds >= 0", row[k])
    _int(where, "steps", row["steps"])
    if "alignment" in row:
        _check_alignment(row["alignment"], where)
    return row


def read_metrics(run_dir: Path) -> list[dict]:
    """A run folder's `metrics.jsonl` rows, each checked (`check_metrics_row`; a bad line
    is named by its number); [] when there is no such file."""
    path = Path(run_dir) / "metrics.jsonl"
    text = read_text(path)
    if text is None:
        return []
    rows, previous = [], 0
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {i}"
        row = check_metrics_row(parse_json(line, where, "any"), where, previous)
        previous = row["epoch"]
        rows.append(row)
    return rows


# --- checkpoint metadata ------------------------------------------------------------------


def checkpoint_epoch(meta, source) -> int:
    """The epoch a checkpoint's metadata records (an integer >= 0), else
    `CheckpointError` naming `source`."""
    from ep_jax.experiments.checkpoint import CheckpointError

    epoch = meta.get("epoch") if isinstance(meta, dict) else None
    if not _is_int(epoch) or epoch < 0:
        raise CheckpointError(f"{source}: damaged checkpoint metadata (epoch {short(epoch)}, expected an integer >= 0)")
    return epoch


# --- a run folder's files checked against each other ----------------------------------------


def _same(a, b) -> bool:
    """Equal as written (NaN equals NaN: a loss may be logged as NaN)."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def check_summary_matches_metrics(summary: dict | None, rows: list[dict], run_dir) -> None:
    """RunError unless a finished run's (`ok`, `diverged`) `summary.json` says what its
    `metrics.jsonl` says: epochs done, final and best test accuracy, the best epoch, final
    train accuracy (`engine.summarize` of the rows). A summary edited by hand, or copied
    from another run, is refused, naming the file and the first value that differs."""
    if summary is None or summary["status"] not in ("ok", "diverged"):
        return
    best = max(rows, key=lambda r: r["test_acc"]) if rows else None
    want = {
        "epochs_done": len(rows),
        "final_test_acc": rows[-1]["test_acc"] if rows else None,
        "best_test_acc": best["test_acc"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "final_train_acc": rows[-1]["train_acc"] if rows else None,
    }
    for k, v in want.items():
        if not _same(summary[k], v):
            raise RunError(
                f"{Path(run_dir) / 'summary.json'}: {k} is {short(summary[k])}, its metrics.jsonl says "
                f"{short(v)}; the summary was edited or belongs to another run"
            )


#: the config fields that are not part of a run's identity: a resume may change them
NOT_IDENTITY = ("epochs", "data_dir")


def same_run(meta: dict, cfg: RunConfig, saved: dict | None) -> bool:
    """Whether a checkpoint's meta belongs to `cfg`'s run: its digest is the config's
    (`RunConfig.digest`, all but epochs), with `data_dir` as the run folder's config.json
    saved it — where the data lives is not part of a run's identity — or its `run_digest`
    (all but `NOT_IDENTITY`; checkpoints written since it exists) is the config's."""
    if not isinstance(meta, dict):
        return False
    if meta.get("digest") == cfg.digest():
        return True
    if isinstance(meta.get("run_digest"), str) and meta["run_digest"] == cfg.digest(exclude=NOT_IDENTITY):
        return True  # written since checkpoints carry it: data_dir is not part of the run
    if isinstance(saved, dict) and isinstance(saved.get("data_dir"), (str, type(None))):
        try:
            return meta.get("digest") == cfg.replace(data_dir=saved["data_dir"]).digest()
        except Exception:  # noqa: BLE001 — a damaged config.json: not the same run
            return False
    return False


def check_config_digest(run_dir, cfg: RunConfig, meta: dict, saved: dict | None = None) -> None:
    """RunError naming the run folder's `config.json` unless the checkpoint metadata
    `meta` was written for `cfg` (`same_run`; `saved` is the config.json's table)."""
    digest = meta.get("digest") if isinstance(meta, dict) else None
    if not same_run(meta, cfg, saved):
        raise RunError(
            f"{Path(run_dir) / 'config.json'}: does not match the run's checkpoint (config digest "
            f"{cfg.digest()}, the checkpoint's {short(digest)}); the config was edited after the run or "
            "belongs to another one"
        )


def check_checkpoint_record(
    run_dir, cfg: RunConfig, saved: dict | None, rows: list[dict], status: str | None
) -> dict | None:
    """When the run folder holds a checkpoint: its metadata (`checkpoint.read_meta`,
    digest checked), after checking that the checkpoint was written for this
    `config.json` (its config digest, as `same_run`: only epochs and the data
    folder may differ) and that `metrics.jsonl` holds its history (the history is the
    metrics' first rows; all of them for a run that finished `ok`). None without a
    checkpoint. RunError naming the file otherwise: a config edited after the run (it
    would move the run into another cell) or metrics that are not the run's."""
    from ep_jax.experiments import checkpoint

    path = Path(run_dir) / "checkpoint.msgpack"
    if not os.path.lexists(path):
        return None
    meta = checkpoint.read_meta(path)
    check_config_digest(run_dir, cfg, meta, saved)
    history = meta["history"]
    if len(history) > len(rows) or (status == "ok" and len(history) != len(rows)):
        raise RunError(
            f"{Path(run_dir) / 'metrics.jsonl'}: {len(rows)} epoch(s), the run's checkpoint has "
            f"{len(history)}; the metrics were edited or belong to another run"
        )
    for h, r in zip(history, rows):
        for k in ("epoch", "steps") + checkpoint.ROW_NUMBERS:
            if not _same(h.get(k), r.get(k)):
                raise RunError(
                    f"{Path(run_dir) / 'metrics.jsonl'}: epoch {h['epoch']}: {k} is {short(r.get(k))}, "
                    f"the run's checkpoint says {short(h.get(k))}; the metrics were edited or belong "
                    "to another run"
                )
    return meta
