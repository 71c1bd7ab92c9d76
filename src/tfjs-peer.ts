/**
 * The first module the `psgd/tfjs` entry loads: it loads `@tensorflow/tfjs-core`, an
 * optional peer dependency of psgd, so that when it is not installed the error says what
 * to install instead of only naming the module.
 */

/**
 * The error to throw for `e`, a failure to load `@tensorflow/tfjs-core`: when the package
 * is not installed, an Error that says what to install (with `e` as its `cause`); else `e`.
 * @internal
 */
export function tfjsCoreLoadError(e: unknown): unknown {
  const err = e as { code?: unknown; message?: unknown } | null
  const missing = err?.code === 'MODULE_NOT_FOUND' && String(err.message).includes(`'@tensorflow/tfjs-core'`)
  if (!missing) return e
  return new Error(
    "psgd/tfjs needs TensorFlow.js, and '@tensorflow/tfjs-core' is not installed: install it with a backend, " +
      'e.g. `npm install @tensorflow/tfjs-core @tensorflow/tfjs-node` (or @tensorflow/tfjs-backend-cpu, ' +
      "@tensorflow/tfjs-backend-wasm, or @tensorflow/tfjs, which includes them). The main entry 'psgd' works without it.",
    { cause: e },
  )
}

try {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  require('@tensorflow/tfjs-core')
} catch (e) {
  throw tfjsCoreLoadError(e)
}
