#!/usr/bin/env node
// `npm run lint:rust` (after `cargo fmt --all --check`): `cargo clippy --release -p psgd
// -p psgd-node --all-targets -- -D warnings`, with the host target triple passed as
// `--target`, as `napi build` and scripts/cargo-test.js pass it: with the same triple, the
// same profile and the same package set (so the same feature unification), clippy writes
// into the same target/<triple>/release tree and reuses the build scripts and proc-macros
// those builds compiled, instead of a second, triple-less tree under target/release.
'use strict'
const { execFileSync, spawnSync } = require('node:child_process')

const host = /^host: (\S+)$/m.exec(execFileSync('rustc', ['-vV'], { encoding: 'utf8' }))
if (!host) throw new Error('cargo-clippy: cannot read the host triple from `rustc -vV`')
const args = [
  'clippy',
  '--release',
  '-p',
  'psgd',
  '-p',
  'psgd-node',
  '-p',
  'psgd-conformance',
  '--features',
  'psgd-node/bench',
  '--all-targets',
  '--target',
  host[1],
  ...process.argv.slice(2),
  '--',
  '-D',
  'warnings',
]
console.log(`cargo ${args.join(' ')}`)
const r = spawnSync('cargo', args, { stdio: 'inherit' })
process.exit(r.status ?? 1)
