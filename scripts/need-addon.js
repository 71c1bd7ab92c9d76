#!/usr/bin/env node
// Run before `npm run demo`, `npm run example` and the tfjs benches: they use the addon
// `npm run build` made and never build it themselves. Where it is missing (or does not
// load), say what to run, and whether this machine has the Rust toolchain that needs.
'use strict'
const { spawnSync } = require('node:child_process')
const path = require('node:path')

try {
  require(path.join(__dirname, '..', 'native', 'index.js'))
} catch (e) {
  const hasCargo = spawnSync('cargo', ['--version'], { stdio: 'ignore' }).status === 0
  const why = e && e.code === 'MODULE_NOT_FOUND' ? 'the native addon is not built' : `the native addon does not load (${e.message.split('\n')[0]})`
  console.error(`psgd: ${why}. Run \`npm run build\` first.`)
  if (!hasCargo) {
    console.error('psgd: building it needs a Rust toolchain (cargo), which is not on PATH: install it from https://rustup.rs, then run `npm run build`.')
  }
  process.exit(1)
}
