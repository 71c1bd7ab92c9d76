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
export type OptionKind = 'schedule' | 'mask' | 'value'

/** The options of `variant`, by camelCase name, with their kinds. */
export function optionKinds(variant: VariantName): Readonly<Record<string, OptionKind>> {
  return VARIANTS[variant].options
}

/** Whether `variant` fits from Hessian-vector products too. */
export function takesHessian(variant: VariantName): boolean {
  return VARIANTS[variant].hessian
}
