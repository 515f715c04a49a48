#!/usr/bin/env bash
# The package as users get it: build the sdist and the wheel (`python -m build`: the wheel is
# built FROM the sdist, so a file missing from either fails here), install the wheel into a
# fresh virtual environment outside the checkout, and there import every public module and
# run the `ep-jax` command on a tiny offline Fashion-MNIST run. An editable install hides
# what this catches: a module or data file left out of the package, an import of a
# repository-only folder (experiments/, benchmarks/), a dependency that is not declared.
#
# The virtual environment is clean (no --system-site-packages): every dependency comes from
# the wheel's own metadata. pip's cache, filled by CI's earlier `pip install -e`, makes
# that a local copy, not a second download. EP_JAX_WHEEL_VENV=system reuses the running
# Python's packages instead (faster, e.g. offline; it no longer checks the dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/ep_jax-wheel.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
t0=$SECONDS

"$PY" -m pip install --quiet build
"$PY" -m build --outdir "$TMP/dist" . > "$TMP/build.log" 2>&1 || { tail -50 "$TMP/build.log"; exit 1; }
ls "$TMP/dist"
SDIST=$(ls "$TMP"/dist/ep_jax-*.tar.gz)
WHEEL=$(ls "$TMP"/dist/ep_jax-*-py3-none-any.whl)
# the sdist carries the licence, the citation and the changelog; the wheel the licence
# (listings to files first: `grep -q` on a pipe would end tar with SIGPIPE under pipefail)
tar -tzf "$SDIST" > "$TMP/sdist.txt"
for f in LICENSE CITATION.cff CHANGELOG.md README.md; do
    grep -qx "[^/]*/$f" "$TMP/sdist.txt" || { echo "the sdist lacks $f"; exit 1; }
done
"$PY" -m zipfile -l "$WHEEL" > "$TMP/wheel.txt"
grep -q 'dist-info/licenses/LICENSE' "$TMP/wheel.txt" || { echo "the wheel lacks its LICENSE"; exit 1; }

if [ "${EP_JAX_WHEEL_VENV:-clean}" = system ]; then
    "$PY" -m venv --system-site-packages "$TMP/venv"
else
    "$PY" -m venv "$TMP/venv"
fi
VPY="$TMP/venv/bin/python"
"$VPY" -m pip install --quiet --upgrade pip
# --force-reinstall --no-deps first, so that an ep_jax seen through --system-site-packages
# (an editable checkout) cannot stand in for the wheel; then the dependencies
"$VPY" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"
"$VPY" -m pip install --quiet "$WHEEL"
echo "wheel installed ($((SECONDS - t0)) s so far)"

mkdir "$TMP/work" && cd "$TMP/work"      # nothing of the checkout on sys.path
env -u PYTHONPATH "$VPY" - "$ROOT" "$TMP/venv" <<'PY'
import importlib, importlib.metadata as md, pkgutil, sys
from pathlib import Path
root, venv = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
import ep_jax
where = Path(ep_jax.__file__).resolve()
assert venv in where.parents and root not in where.parents, f"ep_jax imported from {where}"
assert ep_jax.__version__ == md.version("ep_jax"), (ep_jax.__version__, md.version("ep_jax"))
names = ["ep_jax"] + [m.name for m in pkgutil.walk_packages(ep_jax.__path__, "ep_jax.")
                      if not any(p.startswith("_") for p in m.name.split("."))]
for name in names:
    importlib.import_module(name)
for name in ep_jax.__all__:
    getattr(ep_jax, name)
for mod in ("experiments", "benchmarks"):
    assert importlib.util.find_spec(mod) is None, f"the wheel installs a top-level {mod!r}"
print(f"ep_jax {ep_jax.__version__} from {where.parent}: {len(names)} modules imported, "
      f"{len(ep_jax.__all__)} public names")
PY
env -u PYTHONPATH "$TMP/venv/bin/ep-jax" --help > /dev/null
env -u PYTHONPATH "$TMP/venv/bin/ep-jax" train --preset fmnist-dep-1h --subset 512 --epochs 1 --out "$TMP/work/run"
env -u PYTHONPATH "$VPY" -c "
import json, sys
s = json.load(open(sys.argv[1]))
assert s['status'] == 'ok' and s['epochs_done'] == 1, s
print('ep-jax train from the wheel:', s['status'], 'test accuracy', s.get('final_test_acc'))
" "$TMP/work/run/summary.json"
ls "$TMP/work/run"
echo "wheel check passed in $((SECONDS - t0)) s"
