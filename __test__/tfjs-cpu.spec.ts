import '@tensorflow/tfjs-backend-cpu'
import * as tf from '@tensorflow/tfjs-core'
import test from 'ava'
import { execFileSync } from 'node:child_process'
import { tfjsContracts } from './tfjs-contracts'
import { tfjsSuite } from './tfjs-suite'
import { tfjsCoreLoadError } from '../src/tfjs-peer'

test.before(async () => {
  await tf.setBackend('cpu')
})

tfjsSuite(test, 'cpu')
tfjsContracts(test, 'cpu')

test('the main entry loads without TensorFlow.js: it imports no @tensorflow module', (t) => {
  // a fresh process, so this file's own tfjs imports do not count
  const loaded = execFileSync(
    process.execPath,
    ['--import', 'tsx', '-e', "require('./index.ts'); console.log(JSON.stringify(Object.keys(require.cache).filter((k) => k.includes('@tensorflow'))))"],
    { cwd: `${__dirname}/..`, encoding: 'utf8' },
  )
  t.deepEqual(JSON.parse(loaded), [])
})

test('without @tensorflow/tfjs-core, psgd/tfjs throws an Error saying what to install, and the main entry still loads', (t) => {
  // a fresh process whose resolver finds no @tensorflow/tfjs-core (Node's own not-found error)
  const script = `
    const Module = require('node:module')
    const resolve = Module._resolveFilename
    Module._resolveFilename = function (request, parent, isMain, options) {
      const paths = request === '@tensorflow/tfjs-core' ? { paths: [require('node:os').tmpdir()] } : options
      return resolve.call(this, request, parent, isMain, paths)
    }
    const main = Object.keys(require('./index.ts'))
    let error = null
    try { require('./tfjs.ts') } catch (e) { error = { type: e.constructor.name, message: e.message, cause: e.cause && e.cause.code } }
    console.log(JSON.stringify({ main, error }))`
  const out = JSON.parse(execFileSync(process.execPath, ['--import', 'tsx', '-e', script], { cwd: `${__dirname}/..`, encoding: 'utf8' }))
  t.true(out.main.includes('kron'))
  t.like(out.error, { type: 'Error', cause: 'MODULE_NOT_FOUND' })
  t.regex(out.error.message, /npm install @tensorflow\/tfjs-core/)
  t.regex(out.error.message, /@tensorflow\/tfjs-node/)
  // other load failures pass through unchanged
  const other = Object.assign(new Error("Cannot find module 'left-pad'"), { code: 'MODULE_NOT_FOUND' })
  t.is(tfjsCoreLoadError(other), other)
  const broken = new SyntaxError('Unexpected token')
  t.is(tfjsCoreLoadError(broken), broken)
})
