/**
 * `npm run example -- <name> [flags]`: runs one example (`mnist`, `xor`, `regression`, `telemetry`, `guard`).
 * Each trains with a progress bar on stderr, prints a chart and a summary, and writes an
 * SVG (default under examples/out/, `--out FILE` to choose). `--smoke` is a tiny run.
 */
import type { ExampleResult } from './lib/example'

const EXAMPLES: Record<string, () => Promise<{ main: (argv: readonly string[]) => Promise<ExampleResult> }>> = {
  mnist: () => import('./mnist'),
  xor: () => import('./xor'),
  regression: () => import('./regression'),
  telemetry: () => import('./telemetry'),
  guard: () => import('./guard'),
}

async function run(): Promise<void> {
  const [name, ...rest] = process.argv.slice(2)
  const load = name !== undefined ? EXAMPLES[name] : undefined
  if (load === undefined) {
    console.error(`usage: npm run example -- <${Object.keys(EXAMPLES).join('|')}> [--out FILE] [--seed N] [--smoke]`)
    process.exit(2)
  }
  await (await load()).main(rest)
}

run().catch((e) => {
  console.error(e)
  process.exit(1)
})
