import '@tensorflow/tfjs-backend-cpu'
import * as tf from '@tensorflow/tfjs-core'
import { KronOptimizer } from '../tfjs'
;(async () => {
  await tf.setBackend('cpu')
  const v = tf.variable(tf.tensor(Float32Array.from([1, 2, 3, 4]), [4]), true, 'x/w0')
  const opt = new KronOptimizer({ learningRate: 0.01, seed: 3 })
  const before = tf.memory().numTensors
  const g = tf.tensor(Float32Array.from([NaN, 1, 1, 1]), [4])
  try { opt.applyGradients({ 'x/w0': g }) ; console.log('accepted', v.dataSync()) } catch (e) { console.log('threw', (e as Error).constructor.name, (e as Error).message) }
  g.dispose()
  console.log('tensors', tf.memory().numTensors - before, opt.iterations)
})()
