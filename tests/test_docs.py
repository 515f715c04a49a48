"""Every code block of README.md and docs/ works as written.

- ```python blocks run (each in a fresh interpreter, so none can depend on another);
- docs/tutorial.ipynb runs top to bottom on small sizes (EP_JAX_TUTORIAL_SMALL=1), and its
  stored outputs are those of the full run that the documentation site shows;
- ```bash blocks: every `python -m <module> ...` command is parsed by its module's own
  argument parser, and train/sweep commands resolve and validate their whole config
  (preset, --set values, spec file); `bash <script>` files must exist. Commands that train
  for hours are not run here; the README's main job is run for real below.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FMNIST = Path("/usr/share/datasets/fashion-mnist")
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"


def blocks(lang):
    out = []
    for path in DOCS:
        for i, b in enumerate(re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)):
            out.append(pytest.param(b, id=f"{path.relative_to(ROOT)}#{i}"))
    return out


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


@pytest.mark.parametrize("code", blocks("python"))
def test_python_block_runs(code, tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]


class _Parsed(Exception):
    pass


def _parse_only(module: str, argv: list[str]):
    """Run `module.main(argv)` up to its argument parsing; return the namespace."""
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse
    try:
        importlib.import_module(module).main(argv)
    except _Parsed as p:
        return p.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{module}.main never parsed its arguments")


def commands(block: str):
    """`python -m` / `ep-jax` / `bash` commands of a shell block (one per line, `&&` chains
    split); `ep-jax CMD ...` is given as the module it runs, `python -m experiments.<module> ...`."""
    from ep_jax.experiments.commands import COMMANDS

    out = []
    for line in block.splitlines():
        line = line.split("  #")[0].strip()
        for part in re.split(r"&&|\|\|", line):
            part = part.strip().strip("()").strip()
            part = re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+", "", part)  # leading VAR=value assignments
            if part.startswith(("python -m", "bash ")):
                out.append(shlex.split(part))
            elif part.startswith("ep-jax "):
                cmd = shlex.split(part)
                assert cmd[1] in COMMANDS, f"unknown ep-jax command in the docs: {part}"
                out.append(["python", "-m", f"experiments.{COMMANDS[cmd[1]][0]}"] + cmd[2:])
    return out


@pytest.mark.parametrize("block", blocks("bash"))
def test_shell_block_commands_parse(block):
    from experiments import config, sweep, train

    for cmd in commands(block):
        if cmd[0] == "bash":
            assert (ROOT / cmd[1]).is_file(), cmd
            continue
        module, argv = cmd[2], cmd[3:]
        if module == "pytest":
            continue
        a = _parse_only(module, argv)
        if module == "experiments.train" and not (a.resume or a.list or a.list_fields):
            train.resolve(a)  # the whole config validates
        if module == "experiments.train" and a.resume:
            assert not (a.set or a.preset or a.seed is not None)
        if module == "experiments.sweep":
            assert sweep.expand(sweep.load_spec(ROOT / a.spec))  # the spec file exists and validates
        if module == "experiments.gdu" and a.preset:
            config.validate(config.RunConfig.from_dict({**train.PRESETS[a.preset], **config.parse_sets(a.set)}))


def test_commands_found():
    """The parser above sees the README's commands (guards against a silent regex miss)."""
    found = [c for b in blocks("bash") for c in commands(b.values[0])]
    mods = {c[2] for c in found if c[0] == "python"}
    assert {"experiments.train", "experiments.sweep", "experiments.reproduce", "experiments.aggregate"} <= mods


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_readme_main_job_as_written(tmp_path):
    """The README's main job, the training command exactly as written (≈ 1 min on 2 cores)."""
    text = (ROOT / "README.md").read_text()
    line = next(l for l in text.splitlines() if "python -m experiments.train --preset fmnist-dep-1h" in l)
    cmd = shlex.split(line[line.index("python -m experiments.train") :])
    r = subprocess.run([sys.executable] + cmd[1:], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    summary = json.loads((tmp_path / "runs" / "fmnist-dep-1h-seed0" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["epochs_done"] == 2
    assert summary["final_test_acc"] > 80.0, summary  # README: 84.81 % measured


def test_tutorial_notebook_stores_the_full_run():
    """The site shows the stored outputs (mkdocs-jupyter does not execute): every code cell
    ran, in order, without an error, at the full sizes (60 000 training images), with its
    two figures."""
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "(60000, 784)" in text and "epoch 2: test accuracy" in text, text[:2000]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_tutorial_notebook_runs(tmp_path, monkeypatch):
    """docs/tutorial.ipynb top to bottom in a Jupyter kernel, on small sizes (≈ 1 min on 2
    cores); its cells assert what they show (accuracy above chance, the output layer's EP
    gradient aligned with BPTT)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("EP_JAX_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", env()["PYTHONPATH"])
    NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "epoch 1: test accuracy" in text, text[-2000:]
