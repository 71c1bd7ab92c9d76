/**
 * The options as the TypeScript layer handles them. Every option is declared once, in
 * Rust (`crates/psgd/src/options.rs`); the types and the table of kinds come from there
 * (`options.generated.ts`). Here only what JavaScript alone can hold is resolved: masks
 * (trees or predicates) and schedules given as functions. Every other value goes to the
 * native core as JSON, which checks it.
 */
import { VARIANTS } from './options.generated'

/** A variant's name (`kron`, `xmat`, `lra`, `affine`). */
export type VariantName = keyof typeof VARIANTS

/** How the TypeScript layer treats an option (see `options.generated.ts`). */
export type OptionKind = 'schedule' | 'mask' | 'hook' | 'value'

/** The options of `variant`, by camelCase name, with their kinds. */
export function optionKinds(variant: VariantName): Readonly<Record<string, OptionKind>> {
  return VARIANTS[variant].options
}

/** Whether `variant` fits from Hessian-vector products too. */
export function takesHessian(variant: VariantName): boolean {
  return VARIANTS[variant].hessian
}

/**
 * Other optimizers' and libraries' names for the options, in normalised form (lower case,
 * no `_` or `-`), each with the names it may mean, in order: the first one the variant
 * has is suggested.
 */
const ALIASES: Readonly<Record<string, readonly string[]>> = {
  lr: ['learningRate'],
  stepsize: ['learningRate'],
  eta: ['learningRate'],
  beta: ['b1'],
  beta1: ['b1'],
  betas: ['b1'],
  momentum: ['b1'],
  mu: ['b1'],
  wd: ['weightDecay'],
  decay: ['weightDecay'],
  l2: ['weightDecay'],
  precondlr: ['precondLr', 'preconditionerLr'],
  preconditionerlr: ['preconditionerLr', 'precondLr'],
  preclr: ['precondLr', 'preconditionerLr'],
  precondinitscale: ['precondInitScale', 'preconditionerInitScale'],
  preconditionerinitscale: ['preconditionerInitScale', 'precondInitScale'],
  initscale: ['preconditionerInitScale', 'precondInitScale'],
  updateprobability: ['preconditionerUpdateProbability'],
  precondupdateprobability: ['preconditionerUpdateProbability'],
  updateprob: ['preconditionerUpdateProbability'],
  clipnorm: ['gradClip'],
  maxgradnorm: ['gradClip'],
  gradclipping: ['gradClip'],
  clipgradnorm: ['gradClip'],
  gradclipnorm: ['gradClip'],
  weightdecaymask: ['weightDecayMask', 'mask'],
  mask: ['mask', 'weightDecayMask'],
  rank: ['uvdRankOfApproximation'],
  randomseed: ['seed'],
}

/** `name` lower-cased without `_` and `-`: `learning_rate`, `LearningRate` → `learningrate`. */
function normalise(name: string): string {
  return name.toLowerCase().replace(/[_-]/g, '')
}

/** Levenshtein distance, bounded: anything above `max` counts as `max + 1`. */
function distance(a: string, b: string, max: number): number {
  if (Math.abs(a.length - b.length) > max) return max + 1
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j)
  for (let i = 1; i <= a.length; i++) {
    const row = [i]
    for (let j = 1; j <= b.length; j++) row.push(Math.min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1)))
    prev = row
  }
  return prev[b.length]
}

/**
 * The option of `variant` that an unknown name most likely means, or null: the same name
 * in another case or in snake_case (`learning_rate` → `learningRate`), a common name from
 * other optimizers (`lr` → `learningRate`, `beta1` → `b1`, `weight_decay`/`wd` →
 * `weightDecay`, `precond_lr` → this variant's preconditioner step size), else the
 * closest name by edit distance (at most 1 edit for names of up to 3 letters, 3 for
 * names of 10 or more, else 2).
 */
export function suggestOption(variant: VariantName, name: string): string | null {
  const names = Object.keys(optionKinds(variant))
  const key = normalise(name)
  const same = names.find((n) => normalise(n) === key)
  if (same !== undefined) return same
  const alias = ALIASES[key]?.find((n) => names.includes(n))
  if (alias !== undefined) return alias
  const max = key.length <= 3 ? 1 : key.length >= 10 ? 3 : 2
  let best: string | null = null
  let bestD = max + 1
  for (const n of names) {
    const d = distance(key, normalise(n), max)
    if (d < bestD) [best, bestD] = [n, d]
  }
  return best
}
