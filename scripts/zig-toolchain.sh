#!/usr/bin/env bash
# The cross/linking toolchain for the release builds of Linux addons (npm run dist):
# zig from PyPI's `ziglang` wheel and cargo-zigbuild, installed once into .zig/. `napi build
# -x` links with them against an old glibc (the `.2.17` suffix of the target), so the
# published binaries load on glibc 2.17 and newer. Not needed to build, test or use the
# package; Python is used only to fetch the zig binary, which runs on its own.
#
#   bash scripts/zig-toolchain.sh                  # makes .zig/ (once) and prints its bin dir
#   eval "$(bash scripts/zig-toolchain.sh --env)"  # puts zig and cargo-zigbuild on PATH
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD/.zig"
# pinned: zig 0.15's linker and glibc stubs and cargo-zigbuild 0.24 are the pair tested here
zig_version=0.15.2
zigbuild_version=0.24.1

if [ ! -x "$root/bin/zig" ]; then
  echo "zig-toolchain: installing ziglang==$zig_version into $root/venv" >&2
  python3 -m venv "$root/venv"
  "$root/venv/bin/pip" install -q --disable-pip-version-check "ziglang==$zig_version" >&2
  zig="$("$root/venv/bin/python" -c 'import ziglang, os; print(os.path.join(ziglang.__path__[0], "zig"))')"
  mkdir -p "$root/bin"
  ln -sf "$zig" "$root/bin/zig"
fi
if [ ! -x "$root/cargo/bin/cargo-zigbuild" ]; then
  echo "zig-toolchain: installing cargo-zigbuild $zigbuild_version into $root/cargo" >&2
  cargo install -q --locked --root "$root/cargo" cargo-zigbuild --version "$zigbuild_version" >&2
fi

if [ "${1:-}" = "--env" ]; then
  echo "export PATH='$root/bin:$root/cargo/bin':\"\$PATH\""
else
  echo "$root/bin"
fi
