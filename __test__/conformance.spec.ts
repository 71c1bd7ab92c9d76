import test, { type ExecutionContext } from 'ava'
import { execFileSync, spawnSync } from 'node:child_process'
import * as fs from 'node:fs'
import * as os from 'node:os'
import * as path from 'node:path'

const root = path.join(__dirname, '..')
const fixtures = path.join(root, 'fixtures', 'kron')
const script = path.join(root, 'scripts', 'conformance.js')

/** `npm run conformance -- dir`: the dev-only replayer crate, run through cargo. */
function conformance(dir: string) {
  return spawnSync(process.execPath, [script, dir], { cwd: root, encoding: 'utf8' })
}

// serial: each test runs cargo, and concurrent cargo runs only queue on its build lock
for (const [variant, min] of [
  ['kron', 10],
  ['xmat', 6],
  ['lra', 6],
  ['affine', 6],
] as const) {
  test.serial(`every committed ${variant} fixture matches psgd-jax 0.2.9 at tolerance 1e-3`, (t) => {
    const r = conformance(path.join(root, 'fixtures', variant))
    t.is(r.status, 0, r.stdout + r.stderr)
    const lines = r.stdout.trim().split('\n')
    const cases = lines.slice(0, -1)
    t.true(cases.length >= min, `${cases.length} cases`)
    for (const line of cases) t.regex(line, /^PASS {2}\S+ +max rel err \S+ \(tol 0\.001\)/)
    t.is(lines[lines.length - 1], `${cases.length} passed, 0 failed`)
  })
}

/**
 * The cases of `fixtures/<dir>` (at least `min`, named `<prefix>_<rule>_…`,
 * `<prefix>_<rule>_newton_…` or `<prefix>_step_<rule>_…` with `rule` one of `rules`) all
 * pass within 1e-5; returns the output and the rules that have Newton cases.
 */
function checkRules(t: ExecutionContext, dir: string, prefix: string, min: number, rules: string[]) {
  const r = conformance(path.join(root, 'fixtures', dir))
  t.is(r.status, 0, r.stdout + r.stderr)
  const lines = r.stdout.trim().split('\n')
  const cases = lines.slice(0, -1)
  t.true(cases.length >= min, `${cases.length} cases`)
  const newton = new Set<string>()
  for (const line of cases) {
    const m = new RegExp(`^PASS {2}${prefix}_(?:step_)?(${rules.join('|')})_(newton_)?\\S+ +max rel err (\\S+) \\(tol 0\\.001\\)`).exec(line)
    t.truthy(m, line)
    t.true(Number(m?.[3]) <= 1e-5, line)
    if (m?.[2]) newton.add(m[1])
  }
  t.is(lines[lines.length - 1], `${cases.length} passed, 0 failed`)
  return { out: r.stdout, newton }
}

test.serial('every committed kron-torch fixture matches psgd_torch (KronWhiten and KronNewton, every rule, squeezed axes) within 1e-5', (t) => {
  const rules = ['pro', 'quad', 'qeq', 'qep', 'pro4p', 'quad4p']
  const { out, newton } = checkRules(t, 'kron-torch', 'torch', 60, [...rules, 'eq'])
  t.deepEqual([...newton].sort(), [...rules, 'eq'].sort(), 'a Newton case of every rule')
  // size-1 axes (psgd_torch squeezes them) under every rule, in both forms
  for (const rule of [...rules, 'eq']) {
    t.regex(out, new RegExp(`^PASS {2}torch_${rule}_squeeze `, 'm'), rule)
    t.regex(out, new RegExp(`^PASS {2}torch_${rule}_newton_squeeze `, 'm'), rule)
  }
  // torch_eq_*: psgd_torch's EQ through the fit's numerics
  t.true((out.match(/^PASS {2}torch_eq_/gm) ?? []).length >= 10)
  // torch_step_*: the step options (momentum, the fit last, the update clip acting)
  t.true((out.match(/^PASS {2}torch_step_/gm) ?? []).length >= 4)
})

test.serial("every committed kron-dk fixture matches distributed-kron's pro (PRO and QUAD, merged and blocked shapes) within 1e-5", (t) => {
  const { out } = checkRules(t, 'kron-dk', 'dk', 11, ['pro', 'quad'])
  t.regex(out, /^PASS {2}dk_pro_blocks /m)
  t.regex(out, /^PASS {2}dk_pro_scanned_blocks /m)
})

/**
 * A copy of the committed case `fixtures/<dir>/<src>` named `name`, its options changed by
 * `change`, fails the checker with a line matching `expect`.
 */
function refusedCase(t: ExecutionContext, dir: string, src: string, name: string, change: (options: Record<string, unknown>) => void, expect: RegExp) {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'psgd-refused-'))
  try {
    const from = path.join(root, 'fixtures', dir, src)
    const dst = path.join(tmp, name)
    fs.mkdirSync(dst)
    fs.copyFileSync(path.join(from, 'tensors.safetensors'), path.join(dst, 'tensors.safetensors'))
    const meta = JSON.parse(fs.readFileSync(path.join(from, 'case.json'), 'utf8'))
    change(meta.options)
    fs.writeFileSync(path.join(dst, 'case.json'), JSON.stringify(meta))
    const r = conformance(tmp)
    t.not(r.status, 0)
    t.regex(r.stdout, expect)
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true })
  }
}

test.serial('a distributed-kron case with a pro option the checker cannot map yet fails, naming it', (t) => {
  refusedCase(
    t,
    'kron-dk',
    'dk_pro_small_bs4',
    'dk_pro_adam',
    (o) => {
      o.lr_style = 'adam'
    },
    /FAIL {2}dk_pro_adam .*distributed-kron case not replayable: lr_style "adam"/,
  )
})

test.serial("every committed kron-hb fixture matches heavyball's PSGDPRO (its whole step, the Procrustes clamp acting in one) within 1e-5", (t) => {
  const { out } = checkRules(t, 'kron-hb', 'hb', 12, ['pro'])
  t.regex(out, /^PASS {2}hb_pro_clamped /m)
  t.regex(out, /^PASS {2}hb_pro_tree_auto /m)
  t.regex(out, /^PASS {2}hb_pro_prob_half /m)
})

test.serial('a heavyball case with a PSGDPRO option the checker cannot map fails, naming it', (t) => {
  refusedCase(
    t,
    'kron-hb',
    'hb_pro_matrix_auto',
    'hb_pro_caution',
    (o) => {
      o.caution = true
    },
    /FAIL {2}hb_pro_caution .*heavyball case not replayable: caution true/,
  )
})

test.serial('npm run conformance -- fixtures runs the psgd-jax, psgd_torch, distributed-kron and heavyball cases together', (t) => {
  const r = conformance(path.join(root, 'fixtures'))
  t.is(r.status, 0, r.stdout + r.stderr)
  t.regex(r.stdout, /^PASS {2}torch_pro_ranks /m)
  t.regex(r.stdout, /^PASS {2}kron_basic /m)
  t.regex(r.stdout, /^PASS {2}dk_quad_blocks /m)
  t.regex(r.stdout, /^PASS {2}hb_pro_clamped /m)
  t.regex(r.stdout.trim().split('\n').pop() ?? '', /^\d+ passed, 0 failed$/)
})

test.serial('npm run conformance prints one line per case and "N passed, 0 failed"', (t) => {
  const out = execFileSync(process.execPath, [script, fixtures], { cwd: root, encoding: 'utf8' })
  const lines = out.trim().split('\n')
  const n = fs.readdirSync(fixtures).length
  t.is(lines.length, n + 1)
  t.is(lines[lines.length - 1], `${n} passed, 0 failed`)
})

/** A copy of the `kron_basic` case named `name` in a fresh temp dir, with `case.json` edited. */
function editedCase(name: string, edit: (c: { options: Record<string, unknown>; draws: { shape: number[] }[][] }) => void) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'psgd-conf-'))
  const src = path.join(fixtures, 'kron_basic')
  const dst = path.join(dir, name)
  fs.mkdirSync(dst)
  for (const f of fs.readdirSync(src)) fs.copyFileSync(path.join(src, f), path.join(dst, f))
  const casePath = path.join(dst, 'case.json')
  const c = JSON.parse(fs.readFileSync(casePath, 'utf8'))
  edit(c)
  fs.writeFileSync(casePath, JSON.stringify(c))
  return { dir, dst }
}

test.serial('the checker fails a case whose options differ from what the reference ran', (t) => {
  // a wrong formula shows as an O(1) error: run a case with another momentum
  const { dir } = editedCase('kron_basic_wrong', (c) => (c.options.b1 = 0.5))
  const r = conformance(dir)
  t.is(r.status, 1)
  t.regex(r.stdout, /FAIL {2}kron_basic_wrong/)
  t.regex(r.stdout.trim().split('\n').pop() ?? '', /^0 passed, 1 failed$/)
  fs.rmSync(dir, { recursive: true, force: true })
})

test.serial('a replayed draw of the wrong shape fails loudly with step, index and shapes', (t) => {
  // the optimizer asks for a [8, 4] normal draw at step 0 index 2; claim it was [4, 8]
  const { dir, dst } = editedCase('kron_basic_shapes', (c) => (c.draws[0][2].shape = [4, 8]))
  const r = conformance(dst)
  t.is(r.status, 1)
  t.regex(r.stdout, /FAIL {2}kron_basic_shapes .*step 0: draw 2 asked for normal \[8, 4\], the reference drew normal \[4, 8\]/)
  fs.rmSync(dir, { recursive: true, force: true })
})

test.serial('a psgd_torch case with an argument the checker cannot map yet fails, naming it', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'psgd-conf-'))
  const src = path.join(root, 'fixtures', 'kron-torch', 'torch_pro_ranks')
  const dst = path.join(dir, 'torch_pro_whiten_momentum')
  fs.mkdirSync(dst)
  for (const f of fs.readdirSync(src)) fs.copyFileSync(path.join(src, f), path.join(dst, f))
  const casePath = path.join(dst, 'case.json')
  const c = JSON.parse(fs.readFileSync(casePath, 'utf8'))
  // whitening the momentum without one: psgd_torch refuses it, so no run can have it
  c.options.whiten_grad = false
  fs.writeFileSync(casePath, JSON.stringify(c))
  const r = conformance(dir)
  t.is(r.status, 1)
  t.regex(r.stdout, /FAIL {2}torch_pro_whiten_momentum .*psgd-torch case not replayable: whiten_grad false needs a momentum/)
  fs.rmSync(dir, { recursive: true, force: true })
})
