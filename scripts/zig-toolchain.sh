#!/usr/bin/env bash
# The cross/linking toolchain for the release builds of Linux addons (npm run dist):
# zig and cargo-zigbuild from their PyPI wheels, installed once into .zig/. `napi build
# -x` links with them against an old glibc (the `.2.17` suffix of the target), so the
# published binaries load on glibc 2.17 and newer. Not needed to build, test or use the
# package; Python is used only to fetch the two binaries, which run on their own.
#
#   bash scripts/zig-toolchain.sh                  # makes .zig/ (once) and prints its bin dir
#   eval "$(bash scripts/zig-toolchain.sh --env)"  # puts zig and cargo-zigbuild on PATH
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD/.zig"
# pinned: zig 0.15's linker and glibc stubs and cargo-zigbuild 0.24 are the pair tested here
zig_version=0.15.2
zigbuild_version=0.24.1

if [ ! -x "$root/bin/zig" ] || [ ! -x "$root/bin/cargo-zigbuild" ]; then
  # both from PyPI wheels (cargo-zigbuild's is its prebuilt binary: no compile, unlike
  # `cargo install cargo-zigbuild`); only the two executables are put on PATH, not Python
  echo "zig-toolchain: installing ziglang==$zig_version and cargo-zigbuild==$zigbuild_version into $root/venv" >&2
  python3 -m venv "$root/venv"
  "$root/venv/bin/pip" install -q --disable-pip-version-check "ziglang==$zig_version" "cargo-zigbuild==$zigbuild_version" >&2
  zig="$("$root/venv/bin/python" -c 'import ziglang, os; print(os.path.join(ziglang.__path__[0], "zig"))')"
  mkdir -p "$root/bin"
  ln -sf "$zig" "$root/bin/zig"
  ln -sf "$root/venv/bin/cargo-zigbuild" "$root/bin/cargo-zigbuild"
fi

if [ "${1:-}" = "--env" ]; then
  echo "export PATH='$root/bin':\"\$PATH\""
else
  echo "$root/bin"
fi
