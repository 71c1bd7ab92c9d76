/**
 * A strict little XML reader for the examples' SVG files (no dependency): checks that the
 * document is well formed (every tag closed in order, attributes quoted, only the five
 * predefined entities or numeric ones, nothing but whitespace outside the root) and returns
 * its elements, so a test can count the curves.
 */
export interface Element {
  name: string
  attrs: Record<string, string>
}

export function parseSvg(text: string): { root: Element; elements: Element[] } {
  const elements: Element[] = []
  const stack: string[] = []
  let root: Element | null = null
  let i = 0
  const checkText = (s: string, where: number): void => {
    const bad = s.match(/&(?!(?:amp|lt|gt|quot|apos|#\d+|#x[0-9a-fA-F]+);)|</)
    if (bad) throw new Error(`malformed text near offset ${where + (bad.index ?? 0)}`)
  }
  while (i < text.length) {
    const lt = text.indexOf('<', i)
    const chunk = lt < 0 ? text.slice(i) : text.slice(i, lt)
    if (stack.length === 0 && chunk.trim() !== '') throw new Error(`text outside the root element at offset ${i}`)
    checkText(chunk, i)
    if (lt < 0) break
    if (text.startsWith('<?', lt)) {
      const end = text.indexOf('?>', lt)
      if (end < 0 || root !== null) throw new Error(`misplaced or unterminated declaration at ${lt}`)
      i = end + 2
      continue
    }
    if (text.startsWith('<!--', lt)) {
      const end = text.indexOf('-->', lt)
      if (end < 0) throw new Error(`unterminated comment at ${lt}`)
      i = end + 3
      continue
    }
    const gt = text.indexOf('>', lt)
    if (gt < 0) throw new Error(`unterminated tag at ${lt}`)
    const tag = text.slice(lt + 1, gt)
    if (tag.startsWith('/')) {
      const name = tag.slice(1).trim()
      const open = stack.pop()
      if (open !== name) throw new Error(`</${name}> closes <${open}> at ${lt}`)
    } else {
      const selfClosing = tag.endsWith('/')
      const body = selfClosing ? tag.slice(0, -1) : tag
      const m = body.match(/^([A-Za-z][\w:.-]*)((?:\s+[A-Za-z_:][\w:.-]*="[^"<]*")*)\s*$/)
      if (!m) throw new Error(`malformed tag <${tag.slice(0, 60)}> at ${lt}`)
      const attrs: Record<string, string> = {}
      for (const a of m[2].matchAll(/([A-Za-z_:][\w:.-]*)="([^"]*)"/g)) {
        if (a[1] in attrs) throw new Error(`attribute ${a[1]} twice in <${m[1]}>`)
        checkText(a[2], lt)
        attrs[a[1]] = a[2]
      }
      const el = { name: m[1], attrs }
      if (stack.length === 0) {
        if (root !== null) throw new Error(`a second root element <${m[1]}> at ${lt}`)
        root = el
      }
      elements.push(el)
      if (!selfClosing) stack.push(m[1])
    }
    i = gt + 1
  }
  if (stack.length > 0) throw new Error(`unclosed <${stack[stack.length - 1]}>`)
  if (root === null) throw new Error('no root element')
  return { root, elements }
}
