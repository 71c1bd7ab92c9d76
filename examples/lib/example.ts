/**
 * What every example shares at its edges: where it prints (a chart and a summary on
 * stdout, the progress bar on stderr; a test passes sinks that drop both), and what it
 * returns to its caller (the picture it wrote and each run's first and last loss).
 */
import type { ProgressStream } from './progress'

export interface ExampleIO {
  /** summary and terminal chart */
  print: (s: string) => void
  /** the progress bar's stream; null for none */
  progress: ProgressStream | null
}

export const consoleIO: ExampleIO = { print: (s) => process.stdout.write(s.endsWith('\n') ? s : s + '\n'), progress: process.stderr }

export const silentIO: ExampleIO = { print: () => {}, progress: null }

export interface RunSummary {
  label: string
  firstLoss: number
  lastLoss: number
}

export interface ExampleResult {
  /** the SVG written */
  file: string
  /** how many curves it holds */
  curves: number
  runs: RunSummary[]
}
