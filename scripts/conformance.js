#!/usr/bin/env node
// `npm run conformance -- DIR`: replays every fixture case under DIR (a case directory or a
// tree of them) through the Rust core with the reference's recorded random draws, and
// compares each step's updates with psgd-jax's. One line per case, then `N passed, M
// failed`; exits non-zero when any case fails. The replayer is the dev-only crate
// `psgd-conformance` (not part of the published package or the addon), built with the
// same flags and packages as `npm run test:cargo` so the two share every compiled
// dependency.
'use strict'
const { execFileSync, spawnSync } = require('node:child_process')
const path = require('node:path')

const host = /^host: (\S+)$/m.exec(execFileSync('rustc', ['-vV'], { encoding: 'utf8' }))
if (!host) throw new Error('conformance: cannot read the host triple from `rustc -vV`')
const root = path.join(__dirname, '..')
// build with exactly `npm run test:cargo`'s package set: cargo unifies the dependencies'
// features over the selected packages, so any other set would recompile candle
const build = ['build', '-q', '--release', '--target', host[1], '-p', 'psgd', '-p', 'psgd-node', '-p', 'psgd-conformance', '--bins']
const b = spawnSync('cargo', build, { stdio: ['ignore', 'inherit', 'inherit'], cwd: root })
if (b.status !== 0) process.exit(b.status ?? 1)
const bin = path.join(root, 'target', host[1], 'release', process.platform === 'win32' ? 'psgd-conformance.exe' : 'psgd-conformance')
const r = spawnSync(bin, process.argv.slice(2), { stdio: 'inherit', cwd: root })
process.exit(r.status ?? 1)
