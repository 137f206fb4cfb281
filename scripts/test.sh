#!/usr/bin/env bash
# The test suite: everything but Ray, then the Ray tests inside a network namespace that has only
# loopback (Ray binds to the machine's own address otherwise). pytest's exit code 5 (no tests
# collected) is a failure: a suite that ran nothing proves nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1

check() {  # check NAME RC
  if [ "$2" -eq 5 ]; then echo "$1: pytest collected no tests"; return 1; fi
  return "$2"
}

python -m pytest -m "not ray" "$@"
check "main suite" $? || exit 1

if ! python -c "import ray" 2>/dev/null; then
  echo "Ray tests SKIPPED: Ray is not installed (pip install -e '.[ray]')"
elif ! unshare --net true 2>/dev/null; then
  echo "Ray tests SKIPPED: cannot create a network namespace here (needs root and unshare)"
else
  unshare --net sh -c 'ip link set lo up && exec python -m pytest -m ray "$@"' sh "$@"
  check "ray suite" $? || exit 1
fi
