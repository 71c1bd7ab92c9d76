#!/usr/bin/env bash
# Prepares the PyTorch side of `npm run bench -- --torch`: a virtual environment with torch
# (CPU wheels), opt_einsum and heavyball 3.2.1, and psgd_torch's psgd.py at commit a8616f1.
#
# Usage: benches/setup-torch.sh [--python PATH]
#
#   --python PATH      interpreter that creates the venv (default: python3)
#   PSGD_TORCH_VENV    use this existing venv instead of creating .venv-torch; it is only
#                      checked, never installed into
#
# psgd.py has no licence, so it is never committed: this script fetches it from
# github.com/lixilinx/psgd_torch (`git show a8616f1:psgd.py`), checks its sha256 (the
# one the fixture generator checks), and puts it at .venv-torch/psgd.py. Then:
#   PSGD_TORCH_VENV=.venv-torch npm run bench -- --torch --psgd-torch .venv-torch/psgd.py
# (both are the defaults: `npm run bench -- --torch` finds them there).
# Prints the venv's python and the path of psgd.py on stdout; progress goes to stderr.
# Never run in CI or by the tests.
set -euo pipefail

PSGD_TORCH_REPO=https://github.com/lixilinx/psgd_torch
PSGD_TORCH_COMMIT=a8616f1
PSGD_TORCH_SHA256=23fd61872406cc917779d674aeb3c12eba77af6c127c7473e500df27091f38f9
PACKAGES=("opt_einsum" "numpy" "heavyball==3.2.1")

python=python3
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python)
      [[ $# -ge 2 ]] || { echo "setup-torch: --python needs a path" >&2; exit 2; }
      python=$2
      shift 2
      ;;
    -h | --help)
      sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
      exit 0
      ;;
    *)
      echo "setup-torch: unknown argument '$1' (see --help)" >&2
      exit 2
      ;;
  esac
done

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${PSGD_TORCH_VENV:-$repo_root/.venv-torch}
venv_python="$venv/bin/python"

if [[ -z "${PSGD_TORCH_VENV:-}" ]] && ! "$venv_python" -c "import torch, opt_einsum, heavyball" 2>/dev/null; then
  if [[ ! -x "$venv_python" ]]; then
    echo "setup-torch: creating $venv with $python" >&2
    "$python" -m venv "$venv"
  fi
  echo "setup-torch: installing torch (CPU) and ${PACKAGES[*]}" >&2
  "$venv_python" -m pip install --quiet --upgrade pip >&2
  "$venv_python" -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu >&2
  "$venv_python" -m pip install --quiet "${PACKAGES[@]}" >&2
fi
if ! "$venv_python" -c "import torch, opt_einsum, heavyball" >&2; then
  echo "setup-torch: $venv has no python that imports torch, opt_einsum and heavyball" >&2
  exit 1
fi

psgd="$venv/psgd.py"
if [[ ! -f "$psgd" ]] || [[ $(sha256sum "$psgd" | cut -d' ' -f1) != "$PSGD_TORCH_SHA256" ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "setup-torch: fetching psgd.py at $PSGD_TORCH_COMMIT from $PSGD_TORCH_REPO" >&2
  git clone --quiet --filter=blob:none --no-checkout "$PSGD_TORCH_REPO" "$tmp/psgd_torch" >&2
  git -C "$tmp/psgd_torch" show "$PSGD_TORCH_COMMIT:psgd.py" >"$tmp/psgd.py"
  have=$(sha256sum "$tmp/psgd.py" | cut -d' ' -f1)
  if [[ "$have" != "$PSGD_TORCH_SHA256" ]]; then
    echo "setup-torch: psgd.py has sha256 $have, expected $PSGD_TORCH_SHA256" >&2
    exit 1
  fi
  cp "$tmp/psgd.py" "$psgd"
fi
echo "setup-torch: $venv is ready" >&2
echo "$venv_python"
echo "$psgd"
