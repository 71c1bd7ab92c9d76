import test from 'ava'
import { spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'

// The error a user sees where no addon loads: src/native.ts with napi-rs's loader next to it
// but no `.node` file, no platform package, and the given package.json, in a child process
// (the addon is loaded once per process).
const root = path.join(__dirname, '..')

function loadError(pkg: object): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'psgd-loader-'))
  try {
    fs.mkdirSync(path.join(dir, 'src'))
    fs.mkdirSync(path.join(dir, 'native'))
    fs.copyFileSync(path.join(root, 'src', 'native.ts'), path.join(dir, 'src', 'native.ts'))
    fs.copyFileSync(path.join(root, 'native', 'index.js'), path.join(dir, 'native', 'index.js'))
    fs.writeFileSync(path.join(dir, 'package.json'), JSON.stringify(pkg))
    const r = spawnSync(
      process.execPath,
      ['--import', 'tsx', '-e', `try { require(${JSON.stringify(path.join(dir, 'src', 'native.ts'))}) } catch (e) { console.log(e.message) }`],
      {
        cwd: root,
        encoding: 'utf8',
        // the loader's own override would load an addon from elsewhere
        env: { ...process.env, NAPI_RS_NATIVE_LIBRARY_PATH: '' },
      },
    )
    return r.stdout + r.stderr
  } finally {
    fs.rmSync(dir, { recursive: true, force: true })
  }
}

function platform(): string {
  const base = `${process.platform}-${process.arch}`
  if (process.platform === 'win32') return `${base}-msvc`
  if (process.platform !== 'linux') return base
  const report = process.report.getReport() as { header: { glibcVersionRuntime?: string } }
  return `${base}-${report.header.glibcVersionRuntime ? 'gnu' : 'musl'}`
}

test('an unsupported platform: the error names it, the prebuilt ones, and how to build from source', (t) => {
  const message = loadError({ name: 'psgd', version: '0.0.0', optionalDependencies: { 'psgd-plan9-mips': '0.0.0' } })
  t.regex(message, /^psgd: no native addon loads on this platform/m)
  t.true(message.includes(`(${platform()}, Node ${process.version})`), message)
  t.true(message.includes('no prebuilt addon for it (only for plan9-mips)'), message)
  t.true(message.includes('npm ci && npm run build'), message)
})

test('a supported platform whose optional package is missing: the error says to install it', (t) => {
  const message = loadError({ name: 'psgd', version: '0.0.0', optionalDependencies: { [`psgd-${platform()}`]: '0.0.0' } })
  t.true(message.includes(`Its prebuilt package psgd-${platform()} is not installed`), message)
  t.true(message.includes('--omit=optional'), message)
})

test('npm run demo and example never build the addon: where none is built they say what to run', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'psgd-need-addon-'))
  try {
    fs.mkdirSync(path.join(dir, 'scripts'))
    fs.copyFileSync(path.join(root, 'scripts', 'need-addon.js'), path.join(dir, 'scripts', 'need-addon.js'))
    const run = (env: NodeJS.ProcessEnv) => spawnSync(process.execPath, [path.join(dir, 'scripts', 'need-addon.js')], { encoding: 'utf8', env })
    const withRust = run(process.env)
    t.is(withRust.status, 1)
    t.regex(withRust.stderr, /the native addon is not built\. Run `npm run build` first/)
    // no cargo on PATH: the message says a Rust toolchain is needed and where to get it
    const bin = path.join(dir, 'bin')
    fs.mkdirSync(bin)
    const noRust = run({ ...process.env, PATH: bin })
    t.is(noRust.status, 1)
    t.regex(noRust.stderr, /needs a Rust toolchain \(cargo\), which is not on PATH/)
    // with the addon built, it says nothing and lets the script run
    const here = spawnSync(process.execPath, [path.join(root, 'scripts', 'need-addon.js')], { encoding: 'utf8' })
    t.is(here.status, 0, here.stderr)
    t.is(here.stderr, '')
  } finally {
    fs.rmSync(dir, { recursive: true, force: true })
  }
})

test("the binding's checked-in types are the ones napi-rs generated for this build", (t) => {
  // src/native.generated.ts: a three-line header, then native/index.d.ts as written by `npm run build:native`
  const committed = fs
    .readFileSync(path.join(root, 'src', 'native.generated.ts'), 'utf8')
    .split('\n')
    .slice(3)
    .join('\n')
  const built = fs.readFileSync(path.join(root, 'native', 'index.d.ts'), 'utf8')
  t.true(
    committed === built,
    'src/native.generated.ts differs from native/index.d.ts: after `npm run build:native` (not the bench build), copy native/index.d.ts below its three-line header',
  )
})
