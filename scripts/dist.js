#!/usr/bin/env node
// `npm run dist -- <dir> [--no-build] [--from <dir of .node files>] [--targets a,b]`:
// writes every tarball a release publishes into <dir>, ready for `npm publish <tarball>`:
//
// - one platform package per addon at hand (npm/<platform>/, made by `napi create-npm-dirs`,
//   plus its `.node` file), and
// - the main package, whose package.json gains `optionalDependencies` on every platform
//   package of `napi.targets` at its own version, as `napi pre-publish` writes them: npm then
//   installs only the one whose os/cpu/libc fit, and napi-rs's loader (native/index.js)
//   requires it. The main package has no install script and carries no Rust sources and no
//   `.node` file; the check below fails the run if that ever changes.
//
// Unless --no-build, the Linux addons are built first with the release command (zig links
// them against glibc 2.17; scripts/zig-toolchain.sh installs it): by default the host's
// platform on a Linux host, or the list given by --targets (linux-x64-gnu, linux-arm64-gnu).
// With --no-build every addon found is packed; --from takes the `.node` files from another
// directory (the release workflow downloads each runner's build there) instead of native/.
//
// `napi artifacts` and `napi pre-publish` are not used: both require the artifact of every
// configured target, which only the full build matrix of a release has.
'use strict'
const { spawnSync, execFileSync } = require('node:child_process')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')

const root = path.join(__dirname, '..')
const args = process.argv.slice(2)
let outDir
let build = true
let from = path.join(root, 'native')
let targets
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--no-build') build = false
  else if (args[i] === '--from') from = path.resolve(args[++i])
  else if (args[i] === '--targets') targets = args[++i].split(',').filter(Boolean)
  else if (!outDir && !args[i].startsWith('-')) outDir = path.resolve(args[i])
  else fail(`unknown argument ${args[i]}`)
}
if (!outDir) fail('usage: npm run dist -- <dir> [--no-build] [--from <dir>] [--targets linux-x64-gnu,linux-arm64-gnu]')

function fail(message) {
  console.error(`dist: ${message}`)
  process.exit(1)
}

function run(cmd, argv, options = {}) {
  const r = spawnSync(cmd, argv, { cwd: root, stdio: 'inherit', ...options })
  if (r.error) throw r.error
  if (r.status !== 0) fail(`${cmd} ${argv.join(' ')} exited with ${r.status}`)
}

/** `npm pack` of `dir` into outDir; returns the tarball's path and its file list. */
function pack(dir) {
  const out = execFileSync('npm', ['pack', dir, '--pack-destination', outDir, '--ignore-scripts', '--json'], { cwd: root, encoding: 'utf8' })
  const [info] = JSON.parse(out)
  return { file: path.join(outDir, info.filename), files: info.files.map((f) => f.path) }
}

const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8'))
const npmDir = path.join(root, 'npm')
const platformPackages = fs
  .readdirSync(npmDir)
  .filter((d) => fs.existsSync(path.join(npmDir, d, 'package.json')))
  .map((dir) => ({ dir, json: JSON.parse(fs.readFileSync(path.join(npmDir, dir, 'package.json'), 'utf8')) }))
if (platformPackages.length !== pkg.napi.targets.length) {
  fail(`npm/ has ${platformPackages.length} platform packages for ${pkg.napi.targets.length} napi.targets: run \`npx napi create-npm-dirs\``)
}
for (const { dir, json } of platformPackages) {
  if (json.version !== pkg.version) fail(`npm/${dir} is at version ${json.version}, the package at ${pkg.version}: run \`npx napi version\``)
}

// the release build of each Linux addon asked for (cargo makes this a no-op when it is current);
// only those are packed then, not an older addon that happens to lie in native/
let packOnly
if (build) {
  const host = process.platform === 'linux' ? `linux-${process.arch}-gnu` : undefined
  const wanted = targets ?? (host && ['linux-x64-gnu', 'linux-arm64-gnu'].includes(host) ? [host] : [])
  const scripts = { 'linux-x64-gnu': 'build:native:linux-x64', 'linux-arm64-gnu': 'build:native:linux-arm64' }
  if (wanted.length > 0) {
    const env = execFileSync('bash', ['scripts/zig-toolchain.sh', '--env'], { cwd: root, encoding: 'utf8' })
    const zigPath = /PATH='([^']*)'/.exec(env)[1]
    for (const t of wanted) {
      if (!scripts[t]) fail(`no release build here for ${t} (only ${Object.keys(scripts).join(', ')})`)
      run('npm', ['run', scripts[t]], { env: { ...process.env, PATH: `${zigPath}${path.delimiter}${process.env.PATH}` } })
    }
  }
  packOnly = new Set(wanted.map((t) => `${pkg.name}-${t}`))
}
// dist/ from scratch, so that no stale file of an earlier build is published
fs.rmSync(path.join(root, 'dist'), { recursive: true, force: true })
run('npm', ['run', 'build:ts'])
for (const f of ['index.js', 'index.d.ts']) {
  if (!fs.existsSync(path.join(root, 'native', f))) fail(`native/${f} (napi-rs's loader) is missing: build an addon first`)
}

fs.mkdirSync(outDir, { recursive: true })
const written = []

// the platform packages with an addon at hand, each packed from a copy of npm/<platform>/
for (const { dir, json } of platformPackages) {
  const node = path.join(from, json.main)
  if (!fs.existsSync(node) || (packOnly && !packOnly.has(json.name))) continue
  const stage = fs.mkdtempSync(path.join(os.tmpdir(), 'psgd-dist-'))
  try {
    for (const f of fs.readdirSync(path.join(npmDir, dir))) fs.copyFileSync(path.join(npmDir, dir, f), path.join(stage, f))
    fs.copyFileSync(node, path.join(stage, json.main))
    const { file, files } = pack(stage)
    if (!files.includes(json.main)) fail(`${path.basename(file)} lacks ${json.main}`)
    written.push(file)
  } finally {
    fs.rmSync(stage, { recursive: true, force: true })
  }
}
if (written.length === 0) fail(`no platform addon in ${from}: nothing to publish`)

// the main package, packed from a copy of its files with the optionalDependencies added
const listed = JSON.parse(execFileSync('npm', ['pack', '--dry-run', '--ignore-scripts', '--json'], { cwd: root, encoding: 'utf8' }))[0].files.map((f) => f.path)
const stage = fs.mkdtempSync(path.join(os.tmpdir(), 'psgd-dist-'))
try {
  for (const f of listed) {
    fs.mkdirSync(path.join(stage, path.dirname(f)), { recursive: true })
    fs.copyFileSync(path.join(root, f), path.join(stage, f))
  }
  const main = { ...pkg, optionalDependencies: { ...pkg.optionalDependencies } }
  for (const { json } of platformPackages) main.optionalDependencies[json.name] = pkg.version
  fs.writeFileSync(path.join(stage, 'package.json'), JSON.stringify(main, null, 2) + '\n')
  const { file, files } = pack(stage)
  const bad = files.filter((f) => /\.(node|rs)$|(^|\/)Cargo\.(toml|lock)$/.test(f))
  if (bad.length > 0) fail(`${path.basename(file)} carries ${bad.join(', ')}`)
  const hooks = ['preinstall', 'install', 'postinstall'].filter((h) => main.scripts?.[h])
  if (hooks.length > 0) fail(`the main package has install scripts (${hooks.join(', ')})`)
  written.unshift(file)
} finally {
  fs.rmSync(stage, { recursive: true, force: true })
}

for (const file of written) console.log(`dist: ${file} (${(fs.statSync(file).size / 1024).toFixed(0)} KiB)`)
