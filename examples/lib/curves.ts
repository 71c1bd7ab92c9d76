/** Summaries of training curves: smoothing, thresholds, averages over seeds. */

/** Exponential moving average (bias-corrected, so the first values are not pulled to 0). */
export function ema(values: ArrayLike<number>, decay = 0.9): number[] {
  const out: number[] = []
  let m = 0
  for (let i = 0; i < values.length; i++) {
    m = decay * m + (1 - decay) * values[i]
    out.push(m / (1 - decay ** (i + 1)))
  }
  return out
}

/** The 1-based step at which `values` first falls to `threshold` or below, or null if never. */
export function stepsToReach(values: ArrayLike<number>, threshold: number): number | null {
  for (let i = 0; i < values.length; i++) if (values[i] <= threshold) return i + 1
  return null
}

export function mean(values: readonly number[]): number {
  return values.reduce((a, b) => a + b, 0) / values.length
}

export function median(values: readonly number[]): number {
  const s = [...values].sort((a, b) => a - b)
  const m = s.length >> 1
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2
}

/** The geometric mean of positive values (how losses over seeds are averaged on a log scale). */
export function geomean(values: readonly number[]): number {
  return Math.exp(mean(values.map((v) => Math.log(v))))
}

/** Pointwise geometric mean of equally long curves (the seeds of one configuration). */
export function geomeanCurve(curves: readonly (readonly number[])[]): number[] {
  const n = Math.min(...curves.map((c) => c.length))
  return Array.from({ length: n }, (_, i) => geomean(curves.map((c) => c[i])))
}

/** At most `n` (x, y) points of a curve, evenly spaced in x (keeps plots and files small). */
export function thin(y: readonly number[], n: number, x?: readonly number[]): { x: number[]; y: number[] } {
  const xs = x ?? y.map((_, i) => i + 1)
  if (y.length <= n) return { x: [...xs], y: [...y] }
  const idx = Array.from({ length: n }, (_, i) => Math.round((i * (y.length - 1)) / (n - 1)))
  return { x: idx.map((i) => xs[i]), y: idx.map((i) => y[i]) }
}
