#!/usr/bin/env node
// `npm run conformance -- DIR`: replays every fixture case under DIR (a case directory or a
// tree of them) through the Rust core with the reference's recorded random draws, and
// compares each step's updates with psgd-jax's. One line per case, then `N passed, M
// failed`; exits non-zero when any case fails. The replayer is the dev-only crate
// `psgd-conformance` (not part of the published package or the addon), built with the
// same flags as `npm run test:cargo` so the two share every compiled dependency.
'use strict'
const { execFileSync, spawnSync } = require('node:child_process')
const path = require('node:path')

const host = /^host: (\S+)$/m.exec(execFileSync('rustc', ['-vV'], { encoding: 'utf8' }))
if (!host) throw new Error('conformance: cannot read the host triple from `rustc -vV`')
const root = path.join(__dirname, '..')
const args = ['run', '-q', '--release', '--target', host[1], '-p', 'psgd-conformance', '--', ...process.argv.slice(2)]
const r = spawnSync('cargo', args, { stdio: 'inherit', cwd: root })
process.exit(r.status ?? 1)
