#!/usr/bin/env bash
# Compiles the `cuda` feature here, with no GPU: the Rust bench binary and the Node addon,
# against the PyPI toolkit of scripts/cuda-toolkit.sh. The bench binary is copied to
# .cuda/dist/ so it can be carried to a GPU machine (x86-64, with the driver) and run
# there:
#
#   bash scripts/build-cuda.sh
#   # on the GPU machine, from the repository root:
#   .cuda/dist/psgd-bench --device cuda --workloads benches/workloads.json
#
# Its own target directory (target/cuda) keeps the CPU build's artifacts untouched: the
# cuda feature changes candle-core, so everything above it compiles again once.
# CUDA_COMPUTE_CAP picks the GPU generation (default 90, Hopper).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/cuda-toolkit.sh --env)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
host="$(rustc -vV | sed -n 's/^host: //p')"
start=$SECONDS

mkdir -p "$CARGO_TARGET_DIR"
# one cargo call for both, so the two resolve the same features and share every build
cargo build --release -p psgd -p psgd-node --lib --bench psgd --features psgd-node/cuda \
  --target "$host" --message-format=json-render-diagnostics >"$CARGO_TARGET_DIR/build.json"
bench="$(grep '"kind":\["bench"\]' "$CARGO_TARGET_DIR/build.json" | sed -nE 's/.*"executable":"([^"]*)".*/\1/p' | tail -1)"
[ -x "$bench" ] || { echo "build-cuda: no bench executable in cargo's output" >&2; exit 1; }

mkdir -p .cuda/dist
cp "$bench" .cuda/dist/psgd-bench
echo "build-cuda: built in $((SECONDS - start)) s; bench binary .cuda/dist/psgd-bench ($(du -h .cuda/dist/psgd-bench | cut -f1)), addon $CARGO_TARGET_DIR/$host/release/libpsgd_node.so"
