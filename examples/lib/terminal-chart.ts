/**
 * A compact chart of one or more curves for the terminal: a grid of characters, one
 * glyph per series, a y axis (linear or log) and a legend.
 */
export interface ChartSeries {
  name: string
  y: readonly number[]
  /** x of each value; default 1, 2, … */
  x?: readonly number[]
}

export interface ChartOptions {
  title?: string
  width?: number
  height?: number
  logY?: boolean
  /** ANSI colours (default: when stdout is a terminal) */
  color?: boolean
}

const GLYPHS = ['●', '▲', '■', '◆', '✚', '✖']
const COLORS = [34, 31, 32, 35, 33, 36]

export function terminalChart(series: readonly ChartSeries[], options: ChartOptions = {}): string {
  const width = options.width ?? 64
  const height = options.height ?? 12
  const logY = options.logY ?? false
  const color = options.color ?? Boolean(process.stdout.isTTY)
  const tf = (v: number): number => (logY ? Math.log10(v) : v)
  const ok = (v: number): boolean => Number.isFinite(v) && (!logY || v > 0)
  const pts = series.map((s) => s.y.map((y, i) => [s.x?.[i] ?? i + 1, y] as const).filter(([, y]) => ok(y)))
  const all = pts.flat()
  if (all.length === 0) return `${options.title ?? ''}\n(no finite values to chart)\n`
  const xMin = Math.min(...all.map(([x]) => x))
  const xMax = Math.max(...all.map(([x]) => x))
  let yLo = Math.min(...all.map(([, y]) => tf(y)))
  let yHi = Math.max(...all.map(([, y]) => tf(y)))
  if (yHi - yLo < 1e-12) {
    yLo -= 0.5
    yHi += 0.5
  }
  const grid: string[][] = Array.from({ length: height }, () => Array<string>(width).fill(' '))
  pts.forEach((p, si) => {
    const glyph = GLYPHS[si % GLYPHS.length]
    const cell = color ? `\x1b[${COLORS[si % COLORS.length]}m${glyph}\x1b[0m` : glyph
    // one mark per column: the mean of the values that fall in it
    const sums = new Float64Array(width)
    const counts = new Int32Array(width)
    for (const [x, y] of p) {
      const c = xMax > xMin ? Math.min(width - 1, Math.floor(((x - xMin) / (xMax - xMin)) * width)) : 0
      sums[c] += tf(y)
      counts[c]++
    }
    for (let c = 0; c < width; c++) {
      if (counts[c] === 0) continue
      const v = sums[c] / counts[c]
      const r = Math.round(((yHi - v) / (yHi - yLo)) * (height - 1))
      grid[r][c] = cell
    }
  })
  const label = (v: number): string => {
    const y = logY ? 10 ** v : v
    return (Math.abs(y) >= 1e4 || (Math.abs(y) < 1e-2 && y !== 0) ? y.toExponential(1) : y.toPrecision(3)).padStart(8)
  }
  const lines: string[] = []
  if (options.title) lines.push(options.title)
  grid.forEach((row, r) => {
    const v = yHi - (r / (height - 1)) * (yHi - yLo)
    const axis = r === 0 || r === height - 1 || r === height >> 1 ? label(v) : ' '.repeat(8)
    lines.push(`${axis} ┤${row.join('')}`)
  })
  const xl = String(Math.round(xMin))
  const xr = String(Math.round(xMax))
  lines.push(`${' '.repeat(8)} └${'─'.repeat(width)}`)
  lines.push(`${' '.repeat(10)}${xl}${' '.repeat(Math.max(1, width - xl.length - xr.length))}${xr}`)
  const legend = series.map((s, si) => {
    const g = GLYPHS[si % GLYPHS.length]
    return `${color ? `\x1b[${COLORS[si % COLORS.length]}m${g}\x1b[0m` : g} ${s.name}`
  })
  lines.push(`${' '.repeat(10)}${legend.join('   ')}${logY ? '   (log y)' : ''}`)
  return lines.join('\n') + '\n'
}
