#!/usr/bin/env bash
# The test suite, from nothing but a Python environment: installs what is missing
# (`pip install -e ".[dev,ray]"` when diffserve or any declared dependency is absent), then runs
# everything but Ray, then the Ray tests inside a network namespace that has only loopback (Ray
# binds to the machine's own address otherwise). Tests marked `artifact` need the DiffServe paper's
# own files: they run where DIFFSERVE_REFERENCE_DIR names them and are left out, with a line saying
# so, where it does not (every other test uses the figures shipped inside diffserve). pytest's exit
# code 5 (no tests collected) is a failure: a suite that ran nothing proves nothing. Extra
# arguments go to both pytest runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python}

missing() {  # prints what this checkout's pyproject.toml declares (core, dev, ray) and the environment lacks
  "$PYTHON" -I - <<'PY'
import importlib.metadata as md
import re

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip's own copy
    from pip._vendor.packaging.requirements import Requirement

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
try:
    md.distribution("diffserve")
except md.PackageNotFoundError:
    print("diffserve")
extras = project.get("optional-dependencies", {})
for line in project["dependencies"] + extras.get("dev", []) + extras.get("ray", []):
    req = Requirement(line)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        print(req.name)
        continue
    if req.specifier and not req.specifier.contains(re.sub(r"\+.*", "", version), prereleases=True):
        print(f"{req.name}-{version}-but-{req.specifier}-wanted")
PY
}

check() {  # check NAME RC
  if [ "$2" -eq 5 ]; then echo "$1: pytest collected no tests"; return 1; fi
  return "$2"
}

lacking=$(missing) || { echo "could not inspect the environment with $PYTHON"; exit 1; }
if [ -n "$lacking" ]; then
  echo "installing diffserve and what is missing: $(echo $lacking)"
  "$PYTHON" -m pip install -e ".[dev,ray]" || { echo "install failed"; exit 1; }
fi

if [ -n "${DIFFSERVE_REFERENCE_DIR:-}" ]; then
  main="not ray"
else
  main="not ray and not artifact"
  echo "artifact tests NOT RUN: they need the DiffServe artifact's own files (set DIFFSERVE_REFERENCE_DIR to run them)"
fi
"$PYTHON" -m pytest -m "$main" "$@"
check "main suite" $? || exit 1

if ! "$PYTHON" -c "import ray" 2>/dev/null; then
  echo "Ray tests SKIPPED: Ray is not installed (pip install -e '.[ray]')"
elif ! unshare --net true 2>/dev/null; then
  echo "Ray tests SKIPPED: cannot create a network namespace here (needs root and unshare)"
else
  unshare --net sh -c 'ip link set lo up && exec "$0" -m pytest -m ray "$@"' "$PYTHON" "$@"
  check "ray suite" $? || exit 1
fi
