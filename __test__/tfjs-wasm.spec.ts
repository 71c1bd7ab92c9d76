import { setWasmPaths } from '@tensorflow/tfjs-backend-wasm'
import * as tf from '@tensorflow/tfjs-core'
import test from 'ava'
import path from 'node:path'
import { tfjsContracts } from './tfjs-contracts'
import { tfjsSuite } from './tfjs-suite'

test.before(async () => {
  // the .wasm files ship in the npm package; point the loader at them (no network here)
  setWasmPaths(path.dirname(require.resolve('@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm')) + path.sep)
  await tf.setBackend('wasm')
})

tfjsSuite(test, 'wasm')
tfjsContracts(test, 'wasm')
