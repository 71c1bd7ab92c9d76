// Run by scripts/e2e-registry.sh inside a fresh project that installed psgd (the release
// tarballs) and then TensorFlow.js: psgd/tfjs must use the project's one copy of
// tfjs-core, and a model must train with `model.fit` and continue bit-for-bit after a save
// with its optimizer. Plain CommonJS, as a user's script.
const assert = require('node:assert/strict')
const path = require('node:path')
const tf = require('@tensorflow/tfjs-core')
require('@tensorflow/tfjs-backend-cpu')
const tfl = require('@tensorflow/tfjs-layers')
const { KronOptimizer, AffineOptimizer } = require('psgd/tfjs')

async function main() {
  await tf.setBackend('cpu')
  // one copy: the tfjs-core psgd/tfjs resolves is the project's, and its optimizers are
  // instances of the project's tf.train.Optimizer
  const fromPsgd = require.resolve('@tensorflow/tfjs-core', { paths: [path.dirname(require.resolve('psgd/tfjs'))] })
  assert.equal(fromPsgd, require.resolve('@tensorflow/tfjs-core'))
  assert.ok(new KronOptimizer({ learningRate: 0.01 }) instanceof tf.Optimizer)

  const x = tf.tensor2d(
    Array.from({ length: 64 * 4 }, (_, i) => Math.sin(i * 0.37)),
    [64, 4],
  )
  const y = tf.tidy(() => tf.sum(tf.mul(x, tf.tensor1d([0.5, -1, 2, 0.25])), 1, true))
  const build = (optimizer) => {
    const model = tfl.sequential()
    model.add(tfl.layers.dense({ units: 8, activation: 'tanh', inputShape: [4], kernelInitializer: tfl.initializers.glorotUniform({ seed: 1 }) }))
    model.add(tfl.layers.dense({ units: 1, kernelInitializer: tfl.initializers.glorotUniform({ seed: 2 }) }))
    model.compile({ optimizer, loss: 'meanSquaredError' })
    return model
  }
  for (const Opt of [KronOptimizer, AffineOptimizer]) {
    const model = build(new Opt({ learningRate: 0.01, seed: 1 }))
    const h = await model.fit(x, y, { epochs: 10, batchSize: 16, shuffle: false, verbose: 0 })
    const loss = h.history.loss
    assert.ok(loss[loss.length - 1] < loss[0] / 2, `${Opt.name}: loss ${loss[0]} -> ${loss[loss.length - 1]}`)

    // saved with the optimizer and loaded again (the registered class), one more epoch on
    // each gives the same weights, bit for bit
    let artifacts
    await model.save(
      tf.io.withSaveHandler(async (a) => ((artifacts = a), { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: 'JSON' } })),
      {
        includeOptimizer: true,
      },
    )
    const loaded = await tfl.loadLayersModel(tf.io.fromMemory(artifacts))
    assert.ok(loaded.optimizer instanceof Opt, `${Opt.name}: the loaded model's optimizer is ${loaded.optimizer && loaded.optimizer.constructor.name}`)
    await model.fit(x, y, { epochs: 1, batchSize: 16, shuffle: false, verbose: 0 })
    await loaded.fit(x, y, { epochs: 1, batchSize: 16, shuffle: false, verbose: 0 })
    const bits = (m) => m.getWeights().map((w) => Array.from(new Uint32Array(Float32Array.from(w.dataSync()).buffer)))
    assert.deepEqual(bits(loaded), bits(model), `${Opt.name}: the reloaded model continues bit-for-bit`)
    console.log(`${Opt.name}: model.fit loss ${loss[0].toFixed(4)} -> ${loss[loss.length - 1].toFixed(4)}; save + load continues bit-for-bit`)
  }
  console.log(`one copy of @tensorflow/tfjs-core ${tf.version_core}: ${require.resolve('@tensorflow/tfjs-core')}`)
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
