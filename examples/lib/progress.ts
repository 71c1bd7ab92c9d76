/**
 * A progress bar on stderr (or any stream). On a terminal it redraws one line in place
 * (at most every 100 ms); elsewhere (a pipe, a log file, CI) it prints only the final line,
 * so logs stay readable.
 */
export interface ProgressStream {
  write(s: string): unknown
  isTTY?: boolean
}

export class ProgressBar {
  private done = 0
  private lastDraw = 0
  private readonly start = performance.now()
  private info = ''

  constructor(
    private readonly total: number,
    private readonly label: string,
    private readonly stream: ProgressStream | null = process.stderr,
    private readonly width = 24,
  ) {}

  /** Advance by `n` units; `info` (e.g. the current loss) is shown after the bar. */
  tick(n = 1, info?: string): void {
    this.done = Math.min(this.total, this.done + n)
    if (info !== undefined) this.info = info
    const now = performance.now()
    if (this.stream?.isTTY && (now - this.lastDraw > 100 || this.done === this.total)) {
      this.lastDraw = now
      this.stream.write(`\r${this.line()}\x1b[K`)
    }
  }

  /** Print the final state and end the line. */
  finish(info?: string): void {
    if (info !== undefined) this.info = info
    if (this.stream === null) return
    this.stream.write(this.stream.isTTY ? `\r${this.line()}\x1b[K\n` : `${this.line()}\n`)
  }

  private line(): string {
    const frac = this.total > 0 ? this.done / this.total : 1
    const full = Math.round(frac * this.width)
    const bar = '█'.repeat(full) + '░'.repeat(this.width - full)
    const elapsed = (performance.now() - this.start) / 1000
    const eta = frac > 0 && frac < 1 ? ` eta ${Math.ceil((elapsed * (1 - frac)) / frac)}s` : ''
    return `${this.label} ${bar} ${String(Math.round(frac * 100)).padStart(3)}% ${this.done}/${this.total} ${elapsed.toFixed(1)}s${eta}${this.info ? '  ' + this.info : ''}`
  }
}
