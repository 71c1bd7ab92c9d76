/**
 * `npm run conformance -- DIR`: replays every fixture case under DIR (a case directory or
 * a tree of them) through our optimizers with the reference's recorded random draws, and
 * compares each step's updates with psgd-jax's. One line per case, then `N passed, M failed`;
 * exits non-zero when any case fails.
 */
import * as fs from 'node:fs'
import { native } from '../src/native'

function main(): number {
  const dir = process.argv[2]
  if (!dir || process.argv.length > 3) {
    console.error('usage: npm run conformance -- DIR')
    return 2
  }
  if (!fs.existsSync(dir)) {
    console.error(`conformance: '${dir}' does not exist`)
    return 2
  }
  const tol = native.conformanceTolerance()
  const results = native.runConformance(dir)
  if (results.length === 0) {
    console.error(`conformance: no case (a directory with case.json) under '${dir}'`)
    return 2
  }
  const width = Math.max(...results.map((r) => r.name.length))
  for (const r of results) {
    const err = Number.isFinite(r.maxRelErr) ? r.maxRelErr.toExponential(2) : 'error'
    console.log(`${r.passed ? 'PASS' : 'FAIL'}  ${r.name.padEnd(width)}  max rel err ${err} (tol ${tol})  ${r.detail}`)
  }
  const passed = results.filter((r) => r.passed).length
  console.log(`${passed} passed, ${results.length - passed} failed`)
  return passed === results.length ? 0 : 1
}

process.exitCode = main()
