/**
 * The README's TypeScript blocks, as a user runs them: a project made the way the README's
 * "TypeScript setup" says (`npm init -y`, `tsc --init` of this TypeScript, then the ESM or
 * the CommonJS change), psgd installed from the packed package (`npm pack`, as published),
 * every ```ts block type-checked by the project's own tsconfig and run with node.
 *
 * Offline: the tarball has no dependencies, the addon built by `npm run build:native` is
 * put beside the installed package's loader (which prefers an addon there to a platform
 * package), and `@tensorflow/*` is linked from this repository's dev dependencies.
 */
import test from 'ava'
import { execFileSync, spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'

const root = path.join(__dirname, '..')
const tsc = path.join(root, 'node_modules', 'typescript', 'bin', 'tsc')
const npm = process.platform === 'win32' ? 'npm.cmd' : 'npm'

/** The README's ```ts blocks, in order. */
function readmeBlocks(): string[] {
  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8')
  return [...readme.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1])
}

function run(cmd: string, args: string[], cwd: string, timeout = 120_000): string {
  return execFileSync(cmd, args, { cwd, encoding: 'utf8', timeout, stdio: ['ignore', 'pipe', 'pipe'] })
}

let work: string
let tarball: string

test.before(() => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'psgd-readme-'))
  // dist/ is built by `npm run build:ts` (npm test runs it before ava)
  const out = run(npm, ['pack', '--ignore-scripts', '--json', '--pack-destination', work], root)
  tarball = path.join(work, (JSON.parse(out) as { filename: string }[])[0].filename)
})

test.after.always(() => {
  if (work) fs.rmSync(work, { recursive: true, force: true })
})

/** A project as the README describes it, with psgd installed from the tarball. */
function makeProject(kind: 'esm' | 'cjs'): string {
  const dir = path.join(work, kind)
  fs.mkdirSync(dir)
  run(npm, ['init', '-y'], dir)
  run(process.execPath, [tsc, '--init'], dir)
  if (kind === 'esm') run(npm, ['pkg', 'set', 'type=module'], dir)
  else {
    const config = path.join(dir, 'tsconfig.json')
    const text = fs.readFileSync(config, 'utf8')
    if (!/"verbatimModuleSyntax": true/.test(text)) throw new Error(`tsc --init wrote no verbatimModuleSyntax: ${text}`)
    fs.writeFileSync(config, text.replace('"verbatimModuleSyntax": true', '"verbatimModuleSyntax": false'))
  }
  run(npm, ['install', '--offline', '--no-audit', '--no-fund', tarball], dir)
  const installed = path.join(dir, 'node_modules', 'psgd')
  if (fs.existsSync(path.join(installed, 'crates'))) throw new Error('the packed package carries Rust sources')
  for (const f of fs.readdirSync(path.join(root, 'native')).filter((f) => f.endsWith('.node'))) {
    fs.copyFileSync(path.join(root, 'native', f), path.join(installed, 'native', f))
  }
  fs.symlinkSync(path.join(root, 'node_modules', '@tensorflow'), path.join(dir, 'node_modules', '@tensorflow'), 'junction')
  return dir
}

for (const kind of ['esm', 'cjs'] as const) {
  test.serial(
    `every TypeScript block of the README type-checks and runs in ${kind === 'esm' ? 'an ESM' : 'a CommonJS'} project made as the README says`,
    (t) => {
      const blocks = readmeBlocks()
      t.true(blocks.length >= 4, `${blocks.length} blocks`)
      const dir = makeProject(kind)
      blocks.forEach((b, i) => fs.writeFileSync(path.join(dir, `block${i + 1}.ts`), b))
      const check = spawnSync(process.execPath, [tsc, '-p', '.'], { cwd: dir, encoding: 'utf8', timeout: 120_000 })
      t.is(check.status, 0, `tsc -p . in the ${kind} project:\n${check.stdout}${check.stderr}`)
      // the package's own declarations type-check too, for a project that does not skip lib
      // checks (TensorFlow.js's own declarations do not: only errors in psgd's count)
      const libs = spawnSync(process.execPath, [tsc, '-p', '.', '--noEmit', '--skipLibCheck', 'false'], { cwd: dir, encoding: 'utf8', timeout: 120_000 })
      const ours = `${libs.stdout}${libs.stderr}`.split('\n').filter((l) => l.includes('node_modules/psgd/'))
      t.deepEqual(ours, [], `psgd's declarations in the ${kind} project`)
      const outputs = blocks.map((_, i) => {
        const r = spawnSync(process.execPath, [`block${i + 1}.js`], {
          cwd: dir,
          encoding: 'utf8',
          timeout: 120_000,
          env: { ...process.env, NAPI_RS_NATIVE_LIBRARY_PATH: '' },
        })
        t.is(r.status, 0, `block ${i + 1} (${kind}) exited with ${r.status}:\n${r.stdout.slice(-2000)}${r.stderr.slice(-2000)}`)
        return r.stdout
      })
      // the blocks do what the README says: the toy problem's last loss is below 1e-4, the
      // class example counts its steps, the TensorFlow.js one reports its losses
      const at = (needle: string) => blocks.findIndex((b) => b.includes(needle))
      t.true(Number(outputs[at('loss < 1e-4')].trim().split('\n').pop()) < 1e-4)
      t.regex(outputs[at('stepAsync')], /steps taken: 2/)
      t.true(at("from 'psgd/tfjs'") >= 0, 'the README has a TensorFlow.js block')
      t.regex(outputs[at("from 'psgd/tfjs'")], /loss/)
    },
  )
}
