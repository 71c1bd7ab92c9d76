/**
 * Wall-time accounting: where a training run spends its time (the gradient, i.e. the
 * forward and backward pass, vs the optimizer's step), summed over the run.
 */
export class Stopwatch {
  readonly ms: Record<string, number> = {}

  /** Run `fn` and add its wall time to `key`. */
  time<T>(key: string, fn: () => T): T {
    const t0 = performance.now()
    try {
      return fn()
    } finally {
      this.add(key, performance.now() - t0)
    }
  }

  /** Await `fn()` and add its wall time (to the settling of its promise) to `key`. */
  async timeAsync<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const t0 = performance.now()
    try {
      return await fn()
    } finally {
      this.add(key, performance.now() - t0)
    }
  }

  add(key: string, ms: number): void {
    this.ms[key] = (this.ms[key] ?? 0) + ms
  }

  get(key: string): number {
    return this.ms[key] ?? 0
  }

  /**
   * Time every call of `obj[method]` under `key` (e.g. a tfjs optimizer's
   * `applyGradients` while `model.fit` drives it); returns a function that undoes it.
   */
  wrap<K extends string>(obj: { [k in K]: (...args: never[]) => unknown }, method: K, key: string): () => void {
    const original = obj[method]
    const bound = original.bind(obj) as (...args: unknown[]) => unknown
    ;(obj as Record<K, unknown>)[method] = (...args: unknown[]) => this.time(key, () => bound(...args))
    return () => {
      ;(obj as Record<K, unknown>)[method] = original
    }
  }
}

/** Milliseconds as a short human string: `850 ms`, `12.3 s`, `2 min 05 s`. */
export function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)} ms`
  const s = ms / 1000
  if (s < 60) return `${s.toFixed(1)} s`
  const m = Math.floor(s / 60)
  return `${m} min ${String(Math.round(s - 60 * m)).padStart(2, '0')} s`
}
