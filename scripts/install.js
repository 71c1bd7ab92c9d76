#!/usr/bin/env node
// `npm install` hook: keeps a native addon that loads, otherwise builds one from the Rust
// sources (needs cargo). Set PSGD_SKIP_BUILD=1 to skip.
'use strict'
const { spawnSync } = require('node:child_process')
const fs = require('node:fs')
const path = require('node:path')

const root = path.join(__dirname, '..')
const nativeDir = path.join(root, 'native')

function loads() {
  try {
    require(path.join(nativeDir, 'index.js'))
    return true
  } catch {
    return false
  }
}

function run(cmd, args) {
  console.log(`psgd: ${cmd} ${args.join(' ')}`)
  const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', shell: process.platform === 'win32' })
  if (r.error) throw r.error
  if (r.status !== 0) process.exit(r.status ?? 1)
}

if (process.env.PSGD_SKIP_BUILD) process.exit(0)
if (loads()) process.exit(0)

const cargo = spawnSync('cargo', ['--version'], { stdio: 'ignore' })
if (cargo.error || cargo.status !== 0) {
  console.error('psgd: no prebuilt native addon fits this platform and cargo was not found.')
  console.error('psgd: install Rust (https://rustup.rs) and run `npm rebuild psgd`.')
  process.exit(1)
}

let cli = null
try {
  cli = require.resolve('@napi-rs/cli/package.json', { paths: [root] })
} catch {
  // no @napi-rs/cli (installed as a dependency): the cargo build below
}

if (cli) {
  // the same command as `npm run build:native`, so the cargo build is shared with it
  run(process.execPath, [
    path.join(path.dirname(cli), 'dist', 'cli.js'),
    'build',
    '--platform',
    '--release',
    '--manifest-path',
    'crates/psgd-node/Cargo.toml',
    '--output-dir',
    'native',
    '--js',
    'index.js',
    '--dts',
    'index.d.ts',
  ])
} else {
  // installed as a dependency: the loader (native/index.js) ships with the package; build
  // the library with cargo and put it where the loader looks for it
  run('cargo', ['build', '--release', '-p', 'psgd-node'])
  const lib = { linux: 'libpsgd_node.so', darwin: 'libpsgd_node.dylib', win32: 'psgd_node.dll' }[process.platform]
  const abi =
    process.platform === 'linux' ? (process.report?.getReport().header.glibcVersionRuntime ? '-gnu' : '-musl') : process.platform === 'win32' ? '-msvc' : ''
  const target = path.join(nativeDir, `psgd.${process.platform}-${process.arch}${abi}.node`)
  fs.mkdirSync(nativeDir, { recursive: true })
  fs.copyFileSync(path.join(root, 'target', 'release', lib), target)
}

if (!loads()) {
  console.error('psgd: the native addon was built but does not load')
  process.exit(1)
}
