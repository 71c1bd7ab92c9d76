/**
 * `npm run bench:tfjs` in its `--quick` mode, on one backend and one model, as a child
 * process: it runs to the end and reports every row (a time per step and its ratio to
 * Adam's, or why the row did not run) and the native step alone. The figures themselves
 * are never asserted.
 */
import test from 'ava'
import { spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'

test('bench:tfjs --quick runs and reports every row against Adam', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'psgd-bench-tfjs-'))
  try {
    const json = path.join(dir, 'out.json')
    const root = path.join(__dirname, '..')
    const r = spawnSync(
      process.execPath,
      ['--import', 'tsx', 'benches/tfjs.ts', '--quick', '--backend', 'cpu', '--model', 'mlp', '--rounds', '1', '--json', json],
      {
        cwd: root,
        encoding: 'utf8',
      },
    )
    t.is(r.status, 0, r.stderr)
    t.regex(r.stdout, /### mlp, cpu backend/)
    const out = JSON.parse(fs.readFileSync(json, 'utf8')) as {
      tfjs: { label: string; msPerStep: number | null; ratioToAdam: number | null; skipped?: string }[]
      native: { model: string; label: string; msPerStep: number }[]
    }
    const rows = out.tfjs
    t.deepEqual(
      rows.map((x) => x.label),
      [
        'tfjs Adam',
        'Kron (default)',
        'Kron, updatePreconditionerFirst: false',
        'Kron, overlapFit: true',
        'Kron, preconditionerUpdateProbability: 0.03',
        'Kron, overlapFit: true, preconditionerUpdateProbability: 0.03',
      ],
    )
    t.is(rows[0].ratioToAdam, 1)
    for (const row of rows) {
      t.is(row.skipped, undefined, row.label)
      t.true(Number.isFinite(row.msPerStep) && (row.msPerStep as number) > 0, `${row.label}: ${row.msPerStep} ms/step`)
      t.true(Number.isFinite(row.ratioToAdam) && (row.ratioToAdam as number) > 0, `${row.label}: ratio ${row.ratioToAdam}`)
      t.true(r.stdout.includes(`| ${row.label} |`), `${row.label} is in the printed table`)
    }
    // the native step alone: the fit in either order and the apply
    t.is(out.native.length, 3)
    for (const row of out.native) {
      t.is(row.model, 'mlp')
      t.true(Number.isFinite(row.msPerStep) && row.msPerStep > 0, `${row.label}: ${row.msPerStep} ms`)
      t.true(r.stdout.includes(`| ${row.label} |`), `${row.label} is in the printed table`)
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true })
  }
})
