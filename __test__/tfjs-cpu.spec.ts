import '@tensorflow/tfjs-backend-cpu'
import * as tf from '@tensorflow/tfjs-core'
import test from 'ava'
import { execFileSync } from 'node:child_process'
import { tfjsSuite } from './tfjs-suite'

test.before(async () => {
  await tf.setBackend('cpu')
})

tfjsSuite(test, 'cpu')

test('the main entry loads without TensorFlow.js: it imports no @tensorflow module', (t) => {
  // a fresh process, so this file's own tfjs imports do not count
  const loaded = execFileSync(
    process.execPath,
    ['--import', 'tsx', '-e', "require('./index.ts'); console.log(JSON.stringify(Object.keys(require.cache).filter((k) => k.includes('@tensorflow'))))"],
    { cwd: `${__dirname}/..`, encoding: 'utf8' },
  )
  t.deepEqual(JSON.parse(loaded), [])
})
