#!/usr/bin/env bash
# Prepares the Python side of the side-by-side benchmark: a virtual environment with
# psgd-jax and the exact JAX stack it is compared on (CPU wheels from PyPI).
#
# Usage: benches/setup-reference.sh [--python PATH]
#
#   --python PATH      interpreter that creates the venv (default: python3)
#   PSGD_BENCH_VENV    use this existing venv instead of creating .venv-bench; it is
#                      only checked, never installed into
#
# Prints the venv's python on stdout (all progress goes to stderr), so a runner can do
#   PY=$(benches/setup-reference.sh) && "$PY" benches/psgd_jax_bench.py --all
# Never run in CI; re-running is cheap once the venv imports psgd_jax.
set -euo pipefail

# Pinned so that timings are comparable over time; the same stack the conformance
# fixtures were generated with (scripts/reference/generate_fixtures.py).
PACKAGES=(
  "psgd-jax==0.2.9"
  "jax==0.4.38"
  "jaxlib==0.4.38"
  "optax==0.2.4"
  "flax==0.10.2"
  "chex==0.1.88"
  "numpy<2.2"
)

python=python3
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python)
      [[ $# -ge 2 ]] || { echo "setup-reference: --python needs a path" >&2; exit 2; }
      python=$2
      shift 2
      ;;
    --python=*)
      python=${1#--python=}
      shift
      ;;
    -h | --help)
      sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
      exit 0
      ;;
    *)
      echo "setup-reference: unknown argument '$1' (see --help)" >&2
      exit 2
      ;;
  esac
done

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Warns (does not fail) when a venv holds other versions than the pins: the numbers it
# produces are still valid, just not comparable with ones taken on the pinned stack.
check_versions() {
  "$1" - <<'EOF' >&2 || true
from importlib.metadata import version
pins = {"psgd-jax": "0.2.9", "jax": "0.4.38", "jaxlib": "0.4.38", "optax": "0.2.4",
        "flax": "0.10.2", "chex": "0.1.88"}
for name, want in pins.items():
    have = version(name)
    if have != want:
        print(f"setup-reference: warning: {name} {have} installed, benchmark pins {want}")
EOF
}

if [[ -n "${PSGD_BENCH_VENV:-}" ]]; then
  venv_python="$PSGD_BENCH_VENV/bin/python"
  if ! "$venv_python" -c "import psgd_jax" 2>/dev/null; then
    echo "setup-reference: PSGD_BENCH_VENV='$PSGD_BENCH_VENV' has no python that imports psgd_jax" >&2
    exit 1
  fi
  check_versions "$venv_python"
  echo "setup-reference: using existing venv $PSGD_BENCH_VENV" >&2
  echo "$venv_python"
  exit 0
fi

venv="$repo_root/.venv-bench"
venv_python="$venv/bin/python"

if "$venv_python" -c "import psgd_jax" 2>/dev/null; then
  echo "setup-reference: $venv is ready" >&2
  check_versions "$venv_python"
  echo "$venv_python"
  exit 0
fi

if [[ ! -x "$venv_python" ]]; then
  echo "setup-reference: creating $venv with $python" >&2
  "$python" -m venv "$venv"
fi
# An interrupted earlier run can leave a venv without psgd_jax; installing again into it
# finishes the job.
echo "setup-reference: installing ${PACKAGES[*]}" >&2
"$venv_python" -m pip install --quiet --upgrade pip >&2
"$venv_python" -m pip install --quiet "${PACKAGES[@]}" >&2
"$venv_python" -c "import psgd_jax" >&2
check_versions "$venv_python"
echo "setup-reference: $venv is ready" >&2
echo "$venv_python"
