#!/usr/bin/env node
// `npm run test:cargo`: `cargo test --release` of the psgd crate, built exactly as
// `napi build --release` builds the addon so that the two share every compiled dependency
// and candle is compiled once: the same host target triple (napi always passes
// `--target`) and the same package set (with psgd-node selected too, cargo unifies the
// dependencies' features as in the addon build; psgd-node itself has no test target).
'use strict'
const { execFileSync, spawnSync } = require('node:child_process')

const host = /^host: (\S+)$/m.exec(execFileSync('rustc', ['-vV'], { encoding: 'utf8' }))
if (!host) throw new Error('cargo-test: cannot read the host triple from `rustc -vV`')
const args = ['test', '--release', '-p', 'psgd', '-p', 'psgd-node', '-p', 'psgd-conformance', '--target', host[1], ...process.argv.slice(2)]
console.log(`cargo ${args.join(' ')}`)
const r = spawnSync('cargo', args, { stdio: 'inherit' })
process.exit(r.status ?? 1)
