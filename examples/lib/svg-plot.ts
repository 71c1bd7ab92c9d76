/**
 * Line plots as standalone SVG, written by hand (no dependency): one or more panels side
 * by side, each with axes, ticks, a legend and an optional log-scale y axis. Each curve is
 * one `<path class="curve">`; a series drawn with markers also gets `<circle class="marker">`s.
 * A series keeps its colour across the panels of a figure (by name).
 */
import * as fs from 'node:fs'
import * as path from 'node:path'

export interface Series {
  name: string
  /** what picks the colour (default: the name), e.g. the optimizer, so it stays the same across panels */
  colorKey?: string
  x: readonly number[]
  y: readonly number[]
  /** draw a dot at each point */
  markers?: boolean
  dashed?: boolean
  /** stroke opacity, e.g. 0.35 for one seed among several */
  opacity?: number
  /** leave it out of the legend (e.g. every seed but the first) */
  noLegend?: boolean
}

export interface Panel {
  title: string
  xLabel: string
  yLabel: string
  logY?: boolean
  series: readonly Series[]
  /** fixed y range (in data units), else from the data */
  yRange?: [number, number]
  /** x ticks at integers only (epochs, lengths) */
  xIntegers?: boolean
  /** where the legend goes inside the frame (default top right) */
  legend?: 'top-right' | 'bottom-left' | 'bottom-right'
}

export interface FigureOptions {
  title?: string
  /** panel size in px */
  panelWidth?: number
  panelHeight?: number
  columns?: number
}

const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#17becf', '#8c564b']
const FONT = 'font-family="Helvetica, Arial, sans-serif"'

export function escapeXml(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;')
}

/** Round-number ticks covering [lo, hi] (about `n` of them). */
function linearTicks(lo: number, hi: number, n = 5): number[] {
  const span = hi - lo
  const raw = span / n
  const mag = 10 ** Math.floor(Math.log10(raw))
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= n + 1) ?? 10 * mag
  const ticks: number[] = []
  // from an index, rounded, so that 1 + 5·0.2 is the integer 2 (a running sum is not)
  for (let i = Math.ceil(lo / step - 1e-9); i * step <= hi + step * 1e-9; i++) ticks.push(Number((i * step).toPrecision(12)))
  return ticks
}

/** Ticks of a log axis spanning [lo, hi] decades (log10 units): powers of ten, thinned on long spans; 2× and 5× as well on short ones. */
function logTicks(lo: number, hi: number): number[] {
  const decades = hi - lo
  const out: number[] = []
  const every = Math.max(1, Math.ceil(decades / 8))
  for (let k = Math.floor(lo); k <= Math.ceil(hi); k++) {
    for (const m of decades < 2 ? [1, 2, 5] : [1]) {
      const t = k + Math.log10(m)
      if (t >= lo - 1e-9 && t <= hi + 1e-9 && (m !== 1 || k % every === 0)) out.push(t)
    }
  }
  return out
}

function fmtTick(v: number, log: boolean): string {
  if (log) {
    const x = 10 ** v
    const k = Math.floor(v + 1e-9)
    const m = Math.round(x / 10 ** k)
    return k >= -2 && k <= 3 ? String(Number(x.toPrecision(2))) : m === 1 ? `1e${k}` : `${m}e${k}`
  }
  if (v === 0) return '0'
  const a = Math.abs(v)
  if (a >= 1e5 || a < 1e-3) return v.toExponential(0)
  return String(Number(v.toPrecision(4)))
}

function panelSvg(p: Panel, w: number, h: number, colorOfKey: (key: string) => string): string {
  const colorOf = (s: Series): string => colorOfKey(s.colorKey ?? s.name)
  const m = { left: 62, right: 14, top: 28, bottom: 44 }
  const pw = w - m.left - m.right
  const ph = h - m.top - m.bottom
  const log = p.logY ?? false
  const ok = (y: number): boolean => Number.isFinite(y) && (!log || y > 0)
  const ty = (y: number): number => (log ? Math.log10(y) : y)
  const xs = p.series.flatMap((s) => s.x.filter((_, i) => ok(s.y[i])))
  const ys = p.series.flatMap((s) => s.y.filter(ok).map(ty))
  let x0 = xs.length ? Math.min(...xs) : 0
  let x1 = xs.length ? Math.max(...xs) : 1
  if (x1 === x0) {
    x0 -= 0.5
    x1 += 0.5
  }
  let y0 = p.yRange ? ty(p.yRange[0]) : ys.length ? Math.min(...ys) : 0
  let y1 = p.yRange ? ty(p.yRange[1]) : ys.length ? Math.max(...ys) : 1
  if (log && !p.yRange) {
    y0 = Math.floor(y0 * 2) / 2
    y1 = Math.ceil(y1 * 2) / 2
  }
  if (y1 - y0 < 1e-12) {
    y0 -= 0.5
    y1 += 0.5
  }
  const X = (x: number): number => m.left + ((x - x0) / (x1 - x0)) * pw
  const Y = (y: number): number => m.top + (1 - (ty(y) - y0) / (y1 - y0)) * ph
  const out: string[] = []
  out.push(`<rect x="${m.left}" y="${m.top}" width="${pw}" height="${ph}" fill="#fff" stroke="#999"/>`)
  // grid and ticks
  const yt = log ? logTicks(y0, y1) : linearTicks(y0, y1, 5)
  for (const t of yt) {
    const py = m.top + (1 - (t - y0) / (y1 - y0)) * ph
    out.push(`<line x1="${m.left}" x2="${m.left + pw}" y1="${py.toFixed(1)}" y2="${py.toFixed(1)}" stroke="#e5e5e5"/>`)
    out.push(`<text x="${m.left - 6}" y="${(py + 4).toFixed(1)}" text-anchor="end" font-size="11" ${FONT}>${escapeXml(fmtTick(t, log))}</text>`)
  }
  for (const t of linearTicks(x0, x1, 6).filter((t) => !p.xIntegers || Number.isInteger(t))) {
    const px = X(t)
    out.push(`<line x1="${px.toFixed(1)}" x2="${px.toFixed(1)}" y1="${m.top}" y2="${m.top + ph}" stroke="#f0f0f0"/>`)
    out.push(`<text x="${px.toFixed(1)}" y="${m.top + ph + 16}" text-anchor="middle" font-size="11" ${FONT}>${escapeXml(fmtTick(t, false))}</text>`)
  }
  out.push(`<text x="${m.left + pw / 2}" y="${m.top - 10}" text-anchor="middle" font-size="13" font-weight="bold" ${FONT}>${escapeXml(p.title)}</text>`)
  out.push(`<text x="${m.left + pw / 2}" y="${h - 8}" text-anchor="middle" font-size="12" ${FONT}>${escapeXml(p.xLabel)}</text>`)
  out.push(
    `<text x="14" y="${m.top + ph / 2}" text-anchor="middle" font-size="12" ${FONT} transform="rotate(-90 14 ${m.top + ph / 2})">${escapeXml(p.yLabel + (log ? ' (log)' : ''))}</text>`,
  )
  // curves: a non-finite (or, on a log axis, non-positive) value breaks the line
  out.push(`<clipPath id="clip"><rect x="${m.left}" y="${m.top}" width="${pw}" height="${ph}"/></clipPath>`)
  for (const s of p.series) {
    let d = ''
    let pen = false
    const dots: string[] = []
    s.y.forEach((y, i) => {
      if (!ok(y)) {
        pen = false
        return
      }
      const px = X(s.x[i]).toFixed(1)
      const py = Y(y).toFixed(1)
      d += `${pen ? 'L' : 'M'}${px} ${py}`
      pen = true
      if (s.markers) dots.push(`<circle class="marker" cx="${px}" cy="${py}" r="3" fill="${colorOf(s)}"/>`)
    })
    const dash = s.dashed ? ' stroke-dasharray="6 4"' : ''
    const op = s.opacity !== undefined ? ` stroke-opacity="${s.opacity}"` : ''
    out.push(
      `<path class="curve" data-series="${escapeXml(s.name)}" d="${d}" fill="none" stroke="${colorOf(s)}" stroke-width="1.8"${dash}${op} clip-path="url(#clip)"/>`,
    )
    out.push(...dots)
  }
  // legend, top right inside the frame
  const named = p.series.filter((s) => !s.noLegend)
  const lw = Math.max(...named.map((s) => s.name.length), 4) * 6.6 + 34
  const lh = named.length * 16 + 6
  const where = p.legend ?? 'top-right'
  const lx = where === 'bottom-left' ? m.left + 6 : m.left + pw - lw - 6
  const ly0 = where === 'top-right' ? m.top + 6 : m.top + ph - lh - 6
  if (named.length > 0) {
    out.push(`<rect x="${lx}" y="${ly0}" width="${lw}" height="${lh}" fill="#fff" fill-opacity="0.85" stroke="#ccc"/>`)
  }
  named.forEach((s, i) => {
    const ly = ly0 + 12 + i * 16
    const dash = s.dashed ? ' stroke-dasharray="6 4"' : ''
    out.push(`<line x1="${lx + 6}" x2="${lx + 26}" y1="${ly - 4}" y2="${ly - 4}" stroke="${colorOf(s)}" stroke-width="2"${dash}/>`)
    out.push(`<text x="${lx + 30}" y="${ly}" font-size="11" ${FONT}>${escapeXml(s.name)}</text>`)
  })
  return out.join('\n')
}

/** A figure of one or more panels, as a complete SVG document. */
export function svgFigure(panels: readonly Panel[], options: FigureOptions = {}): string {
  const cols = Math.min(options.columns ?? panels.length, panels.length)
  // panels wide enough for the figure's title (bold 15 px: about 8.7 px a character)
  const pw = Math.max(options.panelWidth ?? 480, Math.ceil(((options.title?.length ?? 0) * 8.7 + 40) / cols))
  const ph = options.panelHeight ?? 320
  const rows = Math.ceil(panels.length / cols)
  const top = options.title ? 30 : 0
  const W = pw * cols
  const H = ph * rows + top
  const colors = new Map<string, string>()
  const colorOf = (name: string): string => {
    if (!colors.has(name)) colors.set(name, PALETTE[colors.size % PALETTE.length])
    return colors.get(name)!
  }
  const body = panels.map((p, i) => {
    const gx = (i % cols) * pw
    const gy = top + Math.floor(i / cols) * ph
    // each panel's clip path gets its own id
    const inner = panelSvg(p, pw, ph, colorOf)
      .replace(/id="clip"/, `id="clip${i}"`)
      .replace(/url\(#clip\)/g, `url(#clip${i})`)
    return `<g transform="translate(${gx} ${gy})">\n${inner}\n</g>`
  })
  const title = options.title
    ? `<text x="${W / 2}" y="20" text-anchor="middle" font-size="15" font-weight="bold" ${FONT}>${escapeXml(options.title)}</text>\n`
    : ''
  return (
    `<?xml version="1.0" encoding="UTF-8"?>\n` +
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">\n` +
    `<rect width="${W}" height="${H}" fill="#fff"/>\n${title}${body.join('\n')}\n</svg>\n`
  )
}

/** Write `svg` to `file`, creating its folder. */
export function writeSvg(file: string, svg: string): void {
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true })
  fs.writeFileSync(file, svg)
}
