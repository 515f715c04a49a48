"""Packaging: every third-party import is a declared dependency, package data exists, and
the test configuration matches what the README promises (`-m slow`)."""

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# distribution name -> the module it is imported as, where the two differ
IMPORT_NAME = {"tensorflow-datasets": "tensorflow_datasets", "importlib_resources": "importlib_resources"}


def declared(*groups):
    """Importable module names of the dependencies (and the given optional groups)."""
    reqs = list(PYPROJECT["project"]["dependencies"])
    for g in groups:
        reqs += PYPROJECT["project"]["optional-dependencies"][g]
    names = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].strip() for r in reqs}
    return {IMPORT_NAME.get(n, n.replace("-", "_")) for n in names}


def third_party_imports(folder):
    """{module: [files]} of absolute imports in `folder` that are neither stdlib nor ours."""
    ours = {"ep_jax", "experiments", "benchmarks", "conftest", "exp_helpers"}
    found = {}
    for f in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ours and not top.startswith("test_"):
                    found.setdefault(top, []).append(str(f.relative_to(ROOT)))
    return found


@pytest.mark.parametrize(
    "folder,groups", [("ep_jax", ("tfds", "tensorboard", "wandb")), ("benchmarks", ()), ("tests", ("test",))]
)
def test_every_third_party_import_is_declared(folder, groups):
    missing = {m: files for m, files in third_party_imports(folder).items() if m not in declared(*groups)}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_packages_and_package_data():
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    # only the ep_jax namespace is installed; experiments/ and benchmarks/ stay in the checkout
    assert include == ["ep_jax*"]
    for pkg, patterns in PYPROJECT["tool"]["setuptools"]["package-data"].items():
        for pat in patterns:
            assert list((ROOT / pkg.replace(".", "/")).glob(pat)), f"package data {pkg}/{pat} matches no file"
    # the sweep specs are read with tomllib: Python 3.11 or later
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert PYPROJECT["project"]["scripts"] == {"ep-jax": "ep_jax.experiments.commands:main"}


def test_wheel_installs_only_the_ep_jax_namespace(tmp_path):
    """A built wheel holds one top-level package (no generic `experiments`/`benchmarks`
    that could shadow a user's own), the shipped sweep specs and the `ep-jax` script."""
    import shutil
    import subprocess
    import zipfile

    src = tmp_path / "src"  # a copy: the build leaves build/ and *.egg-info beside the sources
    shutil.copytree(
        ROOT,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", "build", "runs", ".data", ".whl", ".venv", "*.egg-info", "__pycache__", "results"
        ),
    )
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("ep_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"ep_jax"}, tops
    specs = {Path(n).name for n in names if n.startswith("ep_jax/experiments/sweeps/")}
    assert specs == {p.name for p in (ROOT / "ep_jax" / "experiments" / "sweeps").glob("*.toml")} and specs
    (entry,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "ep-jax = ep_jax.experiments.commands:main" in zipfile.ZipFile(wheel).read(entry).decode()
    # the licence travels with the wheel; its metadata carries the version and licence
    import ep_jax

    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = zipfile.ZipFile(wheel).read(meta).decode()
    assert f"\nVersion: {ep_jax.__version__}\n" in meta and "\nLicense-Expression: Apache-2.0\n" in meta


def test_slow_marker_is_registered_and_excluded_by_default():
    opts = PYPROJECT["tool"]["pytest"]["ini_options"]
    assert any(m.startswith("slow:") for m in opts["markers"])
    assert "-m 'not slow'" in opts["addopts"]
    assert "-m slow" in (ROOT / "README.md").read_text()


def test_version_has_one_source():
    """`ep_jax.__version__` is the version: pyproject reads it (setuptools' dynamic attr,
    read statically), CHANGELOG.md has its section and CITATION.cff names it."""
    import ep_jax

    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ep_jax.__version__"}
    v = ep_jax.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?", v), v
    # setuptools reads the literal without importing ep_jax (which needs jax at build time)
    init = ast.parse((ROOT / "ep_jax" / "__init__.py").read_text())
    literal = [
        n.value.value
        for n in init.body
        if isinstance(n, ast.Assign)
        and [getattr(t, "id", None) for t in n.targets] == ["__version__"]
        and isinstance(n.value, ast.Constant)
    ]
    assert literal == [v]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert re.search(rf"^## \[{re.escape(v)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M), (
        f"CHANGELOG.md has no '## [{v}] - YYYY-MM-DD' section"
    )
    cff = (ROOT / "CITATION.cff").read_text()
    assert re.search(rf'^version: "?{re.escape(v)}"?$', cff, re.M), "CITATION.cff names another version"


def test_licence_and_citation():
    """Apache-2.0 in LICENSE, declared in pyproject (PEP 639) and CITATION.cff; the citation
    file lists the two papers ep_jax implements and the README says how to cite."""
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    licence = (ROOT / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence
    # PEP 639 fields need setuptools >= 77
    (req,) = PYPROJECT["build-system"]["requires"]
    assert req == "setuptools>=77"
    cff = (ROOT / "CITATION.cff").read_text()
    assert re.search(r"^cff-version: 1\.2\.0$", cff, re.M) and re.search(r"^license: Apache-2.0$", cff, re.M)
    for title in (
        "Dendritic Neural Networks with Equilibrium Propagation",
        "Heterogeneous Time Constants Improve Stability in Equilibrium Propagation",
    ):
        assert title in cff, title
    readme = (ROOT / "README.md").read_text()
    assert "CITATION.cff" in readme and "LICENSE" in readme


def test_pinned_tool_groups():
    """The docs and lint tools are pinned (a new release cannot fail CI by itself), and
    .ci/run installs and runs them before the tests."""
    groups = PYPROJECT["project"]["optional-dependencies"]
    for g in ("docs", "lint"):
        assert groups[g] and all("==" in r for r in groups[g]), (g, groups[g])
    ci = (ROOT / ".ci" / "run").read_text()
    lint, docs, tests = ci.index("ruff check"), ci.index("mkdocs build --strict"), ci.index("python -m pytest")
    assert lint < tests and ci.index("ruff format --check") < tests and docs < tests
    assert "bash .ci/wheel_check.sh" in ci
