import test from 'ava'
import { spawnSync } from 'node:child_process'
import * as path from 'node:path'
import { Affine, Kron, kron, LRA, stats, Tensor, XMat, type PsgdStats } from '../index'
import { values } from './helpers'

const classes = { Kron, XMat, LRA, Affine } as const

const tensor = (shape: number[], seed: number, scale = 1) =>
  Tensor.fromArray(
    Float32Array.from(
      values(
        shape.reduce((a, b) => a * b, 1),
        seed,
      ),
    ).map((v) => v * scale),
    shape,
  )

const tree = (seed: number, scale = 1) => ({ w: tensor([6, 5], seed, scale), b: tensor([5], seed + 1, scale) })

const rms = (a: Float32Array, b: Float32Array) => Math.sqrt(a.reduce((s, v, i) => s + (v - b[i]) ** 2, 0) / a.length)

for (const [name, Ctor] of Object.entries(classes)) {
  test(`${name}.stats: the update's RMS is the RMS of params after − before, per leaf`, (t) => {
    const params = tree(1)
    const opt = new Ctor(params, { learningRate: 0.01, preconditionerUpdateProbability: 1 })
    for (let k = 1; k <= 3; k++) {
      const before = { w: params.w.toArray(), b: params.b.toArray() }
      opt.step(tree(10 * k))
      const s = opt.stats()
      t.is(s.count, k)
      t.true(s.fitted)
      t.is(s.fits, k)
      t.deepEqual(
        s.leaves.map((l) => l.path),
        ['b', 'w'],
      )
      for (const l of s.leaves) {
        const leaf = l.path as 'w' | 'b'
        const want = rms(params[leaf].toArray(), before[leaf])
        t.true(Math.abs((l.updateRms as number) - want) <= 1e-3 * want, `${leaf}: ${l.updateRms} vs ${want}`)
        t.true((l.preRms as number) > 0)
        t.is(typeof l.clipped, 'boolean')
        t.is(l.size, leaf === 'w' ? 30 : 5)
      }
      t.true(s.whitening !== null && s.whitening > 0)
      t.true(s.maxCondition >= 1)
      t.true(s.factors.length > 0)
      const times = s.times as NonNullable<PsgdStats['times']>
      t.true(times.fitMs > 0 && times.applyMs > 0 && times.totalMs >= times.fitMs + times.applyMs)
    }
  })
}

test('Kron.stats: fitted follows a probability of 1 and of 0; fits counts the fits', (t) => {
  for (const [p, fit] of [
    [1, true],
    [0, false],
  ] as const) {
    const params = tree(2)
    const opt = new Kron(params, { learningRate: 0.01, preconditionerUpdateProbability: p })
    for (let k = 1; k <= 4; k++) {
      opt.step(tree(3 + k))
      const s = opt.stats()
      t.is(s.fitted, fit)
      t.is(s.fits, fit ? k : 0)
      t.is(s.whitening === null, !fit)
      t.is((s.times as NonNullable<PsgdStats['times']>).fitMs > 0, fit)
    }
  }
})

test('Kron.stats: the RMS clip is reported when it acts (large preconditioned gradients)', (t) => {
  const params = tree(2)
  const opt = new Kron(params, { learningRate: 0.01, preconditionerInitScale: 100, b1: 0 })
  opt.step(tree(5))
  const s = opt.stats()
  t.is(s.clip, 'rms')
  t.true(s.leaves.every((l) => l.clipped === true && (l.preRms as number) > 1.1))
  const quiet = new Kron(tree(2), { learningRate: 0.01, preconditionerInitScale: 1e-3, b1: 0 })
  quiet.step(tree(5))
  t.true(quiet.stats().leaves.every((l) => l.clipped === false))
})

test('stats before the first step: the step values are null, the factors are read; reading twice gives the same', (t) => {
  const opt = new Kron(tree(1), { learningRate: 0.01 })
  const s = opt.stats()
  t.like(s, { count: 0, fitted: false, fits: 0, whitening: null, times: null, maxCondition: 1 })
  t.true(s.leaves.every((l) => l.preRms === null && l.updateRms === null && l.clipped === null && l.whitening === null))
  t.deepEqual(
    s.factors.map((f) => [f.path, f.factor, f.condition]),
    [
      ['b', 0, 1],
      ['w', 0, 1],
      ['w', 1, 1],
    ],
  )
  opt.step(tree(3))
  t.deepEqual(opt.stats(), opt.stats())
  // reading changes nothing the state holds
  const bytes = opt.stateDict()
  opt.stats()
  t.deepEqual(opt.stateDict(), bytes)
})

test('stats after loadStateDict: the count and the factors come back, the step values wait for the next step', (t) => {
  const opt = new Kron(tree(1), { learningRate: 0.01, preconditionerUpdateProbability: 1 })
  for (let k = 0; k < 3; k++) opt.step(tree(4 + k))
  const saved = opt.stats()
  const other = new Kron(tree(1), { learningRate: 0.01, preconditionerUpdateProbability: 1 })
  other.loadStateDict(opt.stateDict())
  const s = other.stats()
  t.like(s, { count: 3, fitted: false, fits: 0, whitening: null, times: null })
  t.deepEqual(
    s.factors.map((f) => f.condition),
    saved.factors.map((f) => f.condition),
  )
  other.step(tree(9))
  t.like(other.stats(), { count: 4, fitted: true, fits: 1 })
})

test('the functional API: stats(state) and state.stats() give the class values; a disposed state is a TypeError', (t) => {
  const fn = kron({ learningRate: 0.01, preconditionerUpdateProbability: 1 })
  const params = tree(1)
  const st = fn.init(params)
  const cls = new Kron(tree(1), { learningRate: 0.01, preconditionerUpdateProbability: 1 })
  fn.update(tree(2), st, params)
  cls.step(tree(2))
  const a = stats(st)
  const b = cls.stats()
  t.deepEqual(st.stats(), a)
  t.deepEqual(
    a.leaves.map((l) => [l.preRms, l.updateRms]),
    b.leaves.map((l) => [l.preRms, l.updateRms]),
  )
  t.throws(() => stats({} as never), { instanceOf: TypeError, message: /state must come from/ })
  st.dispose()
  t.throws(() => stats(st), { instanceOf: TypeError, message: /disposed/ })
  cls.dispose()
  t.throws(() => cls.stats(), { instanceOf: TypeError, message: /disposed/ })
})

test('stats while a stepAsync runs is an Error; afterwards it reports that step', async (t) => {
  const opt = new Kron(tree(1), { learningRate: 0.01 })
  const pending = opt.stepAsync(tree(2))
  t.throws(() => opt.stats(), { message: /stepAsync/ })
  await pending
  t.is(opt.stats().count, 1)
})

test('RSS stays flat over a loop that reads stats() every step (child process)', (t) => {
  const root = path.join(__dirname, '..')
  const code = `
    const p = require(${JSON.stringify(root)})
    const n = 64
    const params = { w: p.Tensor.fromArray(new Float32Array(n * n).fill(0.5), [n, n]) }
    const grads = { w: p.Tensor.fromArray(new Float32Array(n * n).map((_, i) => Math.sin(i)), [n, n]) }
    const opt = new p.Kron(params, { learningRate: 1e-4, preconditionerUpdateProbability: 0.5 })
    let sum = 0
    const run = (k) => { for (let i = 0; i < k; i++) { opt.step(grads); sum += opt.stats().leaves[0].updateRms } }
    run(1000)
    global.gc()
    const before = process.memoryUsage().rss
    run(10000)
    global.gc()
    console.log(JSON.stringify({ growth: process.memoryUsage().rss - before, live: p.liveTensorBytes(), finite: Number.isFinite(sum) }))`
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--expose-gc', '-e', code], { encoding: 'utf8' })
  if (r.status !== 0) throw new Error(`child failed (${r.status}): ${r.stderr}`)
  const { growth, live, finite } = JSON.parse(r.stdout) as { growth: number; live: number; finite: boolean }
  t.true(finite)
  t.is(live, 2 * 64 * 64 * 4, 'only the params and the grads are alive')
  t.true(growth < 32 * 2 ** 20, `RSS grew ${(growth / 2 ** 20).toFixed(1)} MiB over 10 000 steps`)
})
