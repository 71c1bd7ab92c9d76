#!/usr/bin/env bash
# Asserts the glibc floor of Linux addons: no dynamic symbol may need a GLIBC_ version newer
# than the floor (2.17, what the release builds link against: CentOS 7, Debian 8 and every
# later glibc distribution). Arguments: `.node` files or platform package tarballs (.tgz);
# by default the Linux gnu addons in native/. Needs binutils' objdump.
#
#   bash scripts/check-glibc.sh dist/psgd-linux-x64-gnu-0.1.0.tgz
set -euo pipefail
cd "$(dirname "$0")/.."
floor="${PSGD_GLIBC_FLOOR:-2.17}"
command -v objdump >/dev/null || { echo "check-glibc: objdump (binutils) is required" >&2; exit 1; }
[ $# -gt 0 ] || set -- native/psgd.linux-*-gnu.node
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

status=0
for arg in "$@"; do
  files=("$arg")
  if [[ "$arg" == *.tgz ]]; then
    mkdir -p "$tmp/$(basename "$arg")"
    tar -xzf "$arg" -C "$tmp/$(basename "$arg")"
    mapfile -t files < <(find "$tmp/$(basename "$arg")" -name '*.node')
    [ ${#files[@]} -gt 0 ] || { echo "check-glibc: no .node file in $arg" >&2; status=1; continue; }
  fi
  for f in "${files[@]}"; do
    [ -f "$f" ] || { echo "check-glibc: $f does not exist" >&2; status=1; continue; }
    # objdump -T names the version each undefined symbol needs, e.g. `GLIBC_2.14  memcpy`
    newest="$(objdump -T "$f" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)"
    if [ -z "$newest" ]; then
      echo "check-glibc: $(basename "$f") needs no versioned glibc symbol"
    elif [ "$(printf '%s\n%s\n' "$newest" "$floor" | sort -V | tail -1)" != "$floor" ]; then
      echo "check-glibc: FAIL $(basename "$arg"): needs GLIBC_$newest, newer than the $floor floor:" >&2
      objdump -T "$f" | grep -E "GLIBC_$(echo "$newest" | sed 's/\./\\./g')\b" | awk '{print "  " $NF}' | sort -u | head -20 >&2
      status=1
    else
      echo "check-glibc: ok $(basename "$arg"): newest symbol version GLIBC_$newest (floor $floor)"
    fi
  done
done
exit $status
