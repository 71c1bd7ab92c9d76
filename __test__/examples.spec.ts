/**
 * The examples (examples/), each in its tiny `--smoke` mode, in this process (silenced):
 * each writes an SVG that is well-formed SVG with one curve per run (and panel), and each
 * run's loss went down. Plus the hand-written RNN gradient of the XOR example against
 * tfjs's autodiff, and the `npm run example` dispatcher as a child process.
 */
import * as tf from '@tensorflow/tfjs-core'
import test from 'ava'
import { spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'
import { silentIO, type ExampleResult } from '../examples/lib/example'
import { Rng } from '../examples/lib/rng'
import { useCpuBackend } from '../examples/lib/tfjs-cpu'
import * as guard from '../examples/guard'
import * as mnist from '../examples/mnist'
import * as regression from '../examples/regression'
import * as telemetry from '../examples/telemetry'
import * as xor from '../examples/xor'
import { lossAndGrad, SHAPES, tfjsLoss, type RnnParams } from '../examples/xor-rnn'
import { parseSvg } from './svg-check'

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'psgd-examples-'))
test.after.always(() => fs.rmSync(dir, { recursive: true, force: true }))
test.before(async () => {
  await useCpuBackend()
})

function checkSvg(t: import('ava').ExecutionContext, result: ExampleResult, curves: number): void {
  t.true(fs.existsSync(result.file), `${result.file} was written`)
  const { root, elements } = parseSvg(fs.readFileSync(result.file, 'utf8'))
  t.is(root.name, 'svg')
  t.is(root.attrs.xmlns, 'http://www.w3.org/2000/svg')
  const paths = elements.filter((e) => e.name === 'path' && e.attrs.class === 'curve')
  t.is(paths.length, curves)
  t.is(result.curves, curves)
  // every curve is drawn: it has at least one segment
  for (const p of paths) t.regex(p.attrs.d, /^M[\d.]+ [\d.]+(L[\d.]+ [\d.]+)+$/, `curve ${p.attrs['data-series']}`)
}

test.serial('regression --smoke: 2 panels × 4 optimizers, every loss ratio falls', async (t) => {
  const r = await regression.main(['--smoke', '--out', path.join(dir, 'regression.svg')], silentIO)
  checkSvg(t, r, 8)
  t.is(r.runs.length, 8)
  for (const run of r.runs) t.true(run.lastLoss < 0.5 * run.firstLoss, `${run.label}: ${run.firstLoss} → ${run.lastLoss}`)
})

test.serial('telemetry --smoke: 5 panels, 7 curves, the loss falls and the stats are recorded every step', async (t) => {
  const r = await telemetry.main(['--smoke', '--out', path.join(dir, 'telemetry.svg')], silentIO)
  checkSvg(t, r, 7)
  for (const run of r.runs) t.true(run.lastLoss < 0.5 * run.firstLoss, `${run.label}: ${run.firstLoss} → ${run.lastLoss}`)
  const tr = telemetry.trainWithTelemetry(20, 0.003, 100, 1)
  t.is(tr.fits.length, 20)
  // the default update probability is 1 at first: every early step fits
  t.deepEqual(tr.fits.slice(0, 5), [1, 2, 3, 4, 5])
  t.true(tr.whitening.every((w) => w !== null && w > 0))
  t.true(tr.updateRms.every((u) => u > 0) && tr.maxCondition.every((c) => c >= 1))
})

test.serial(
  "guard --smoke: 4 panels per learning rate; at lr 0.5 the warning fires and the guard never acts, at lr 8 'throw' refuses a step, 'reset' resets factors with finite params and 'skip' drops fits",
  async (t) => {
    const r = await guard.main(['--smoke', '--out', path.join(dir, 'guard.svg')], silentIO)
    // per learning rate: norm (3 runs, with the warning or the thrown steps), loss (3), counts ('reset', 'skip'), condition (3)
    checkSvg(t, r, 26)
    const names = parseSvg(fs.readFileSync(r.file, 'utf8'))
      .elements.filter((e) => e.name === 'path' && e.attrs.class === 'curve')
      .map((e) => e.attrs['data-series'])
    t.true(names.includes('warning: every mode, step 50'), names.join(' | '))
    t.true(
      names.some((n) => /^threw: 'throw', step \d+$/.test(n)),
      names.join(' | '),
    )
    t.true(names.includes("factor resets: 'reset'"), names.join(' | '))
    t.is(r.runs.length, 6)
    // the diverging run: the warning fires, nothing throws, the guard never acts (every mode takes the same steps)
    const slow = guard.MODES.map((m) => guard.trainGuarded(m, 60, 0.5, 1))
    for (const tr of slow) {
      t.is(tr.warning?.step, 50, tr.mode)
      t.regex(tr.warning!.message, /diverging/)
      t.is(tr.thrown, null)
      t.true(tr.norm[59] > 100 * tr.norm[0], `${tr.mode}: norm ${tr.norm[0]} → ${tr.norm[59]}`)
      t.deepEqual([tr.resets[59], tr.skipped[59], tr.dropped[59]], [0, 0, 0])
      t.deepEqual(tr.norm, slow[0].norm)
    }
    // far too large: the default refuses the step whose updates overflow; 'reset' resets factors, its params stay finite
    const [thrower, resetter, skipper] = guard.MODES.map((m) => guard.trainGuarded(m, 30, 8, 1))
    // (step 13 here; the step an overflow reaches depends on float rounding)
    t.true(thrower.thrown !== null && thrower.thrown.step <= 30, `threw at ${thrower.thrown?.step}`)
    t.regex(thrower.thrown!.message, /would hold NaN or Inf/)
    t.true(resetter.resets[resetter.resets.length - 1] > 0)
    t.true(resetter.norm.length > thrower.norm.length)
    t.true(resetter.norm.every(Number.isFinite))
    // 'skip' drops the fits that would make the factors unhealthy
    const last = skipper.norm.length - 1
    t.true(skipper.dropped[last] + skipper.skipped[last] > 0)
    t.true(skipper.norm.length > thrower.norm.length)
  },
)

test.serial('xor --smoke: one curve per optimizer, the held-out loss ends below half the first batch loss', async (t) => {
  const r = await xor.main(['--smoke', '--out', path.join(dir, 'xor.svg')], silentIO)
  checkSvg(t, r, 2)
  // length 8, at most 200 steps: both learn it (the first loss is about ln 2)
  for (const run of r.runs) t.true(run.lastLoss < 0.5 * run.firstLoss, `${run.label}: ${run.firstLoss} → ${run.lastLoss}`)
})

test.serial('mnist --smoke: loss and accuracy curves per optimizer, every training loss falls', async (t) => {
  const r = await mnist.main(['--smoke', '--out', path.join(dir, 'mnist.svg')], silentIO)
  // adam, kron, kron-auto, affine: a loss curve and an accuracy curve each
  checkSvg(t, r, 8)
  t.is(r.runs.length, 4)
  for (const run of r.runs) t.true(run.lastLoss < run.firstLoss, `${run.label}: ${run.firstLoss} → ${run.lastLoss}`)
})

test.serial("the XOR example's hand-written BPTT gradient matches tfjs's autodiff", (t) => {
  const length = 5
  const hidden = 7
  const batch = 4
  const rng = new Rng(3)
  const shapes = SHAPES(hidden)
  const p: RnnParams = {
    wx: rng.normals(2 * hidden, 0.5),
    wh: xor.randomOrthogonal(rng, hidden),
    b: rng.normals(hidden, 0.1),
    wo: rng.normals(hidden, 0.5),
    bo: rng.normals(1, 0.1),
  }
  const { x, y } = xor.xorBatch(rng, length, batch)
  const mine = lossAndGrad(p, x, y, length, hidden)
  const keys = Object.keys(p) as (keyof RnnParams)[]
  const ref = tf.tidy(() => {
    const ts = Object.fromEntries(keys.map((k) => [k, tf.tensor(p[k], shapes[k])])) as Record<keyof RnnParams, tf.Tensor>
    const f = (...args: tf.Tensor[]): tf.Scalar =>
      tfjsLoss(
        Object.fromEntries(keys.map((k, i) => [k, args[i]])) as Record<keyof RnnParams, tf.Tensor>,
        tf.tensor(x, [length, batch, 2]),
        tf.tensor(y, [batch]),
        length,
        hidden,
      )
    const { value, grads } = tf.valueAndGrads(f)(keys.map((k) => ts[k]))
    return { loss: value.dataSync()[0], grads: grads.map((g) => Array.from(g.dataSync())) }
  })
  t.true(Math.abs(mine.loss - ref.loss) < 1e-5, `loss ${mine.loss} vs ${ref.loss}`)
  keys.forEach((k, i) => {
    const a = Array.from(mine.grads![k])
    const b = ref.grads[i]
    const scale = Math.max(...b.map(Math.abs))
    const err = Math.max(...a.map((v, j) => Math.abs(v - b[j])))
    t.true(scale > 1e-4, `${k}: a non-trivial gradient`)
    t.true(err <= 1e-4 * scale, `${k}: largest difference ${err} (scale ${scale})`)
  })
})

test.serial('npm run example: the dispatcher runs an example and refuses an unknown one', (t) => {
  const root = path.join(__dirname, '..')
  const out = path.join(dir, 'dispatch.svg')
  const ok = spawnSync(process.execPath, ['--import', 'tsx', 'examples/run.ts', 'regression', '--smoke', '--steps', '20', '--out', out], {
    cwd: root,
    encoding: 'utf8',
  })
  t.is(ok.status, 0, ok.stderr)
  const stdout = ok.stdout
  t.true(fs.existsSync(out))
  t.regex(stdout, /steps to 1e-3/)
  t.regex(stdout, /wrote /)
  const bad = spawnSync(process.execPath, ['--import', 'tsx', 'examples/run.ts', 'nope'], { cwd: root, encoding: 'utf8' })
  t.is(bad.status, 2)
  t.regex(bad.stderr, /usage: npm run example -- <mnist\|xor\|regression\|telemetry\|guard>/)
})
