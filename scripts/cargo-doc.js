#!/usr/bin/env node
// `npm run docs:rust`: `cargo doc --release -p psgd --no-deps` with warnings as errors
// (RUSTDOCFLAGS="-D warnings": a broken or private intra-doc link fails), with the host
// triple as `--target` and the release profile, as scripts/cargo-clippy.js does, so the
// dependencies' metadata compiled by clippy is reused.
'use strict'
const { execFileSync, spawnSync } = require('node:child_process')

const host = /^host: (\S+)$/m.exec(execFileSync('rustc', ['-vV'], { encoding: 'utf8' }))
if (!host) throw new Error('cargo-doc: cannot read the host triple from `rustc -vV`')
const args = ['doc', '--release', '-p', 'psgd', '--no-deps', '--target', host[1], ...process.argv.slice(2)]
console.log(`RUSTDOCFLAGS="-D warnings" cargo ${args.join(' ')}`)
const env = { ...process.env, RUSTDOCFLAGS: `${process.env.RUSTDOCFLAGS ?? ''} -D warnings`.trim() }
const r = spawnSync('cargo', args, { stdio: 'inherit', env })
process.exit(r.status ?? 1)
