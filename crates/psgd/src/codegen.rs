//! The files generated from the option declarations (each variant's `declare_options!`):
//! the TypeScript option types, `src/options.generated.ts`, and the options reference, the
//! tables of `docs/options.md`. It lists every variant, so it stands above them; the
//! option machinery in `options` knows none of them. Tests fail when a checked-in file
//! differs from what the declarations give (`PSGD_WRITE_GENERATED=1` rewrites them).

use crate::options::{OptionInfo, Options};

/// Each variant's name and its options, in the order the generated files list them.
fn variants() -> [(&'static str, Vec<OptionInfo>); 4] {
    [
        ("Kron", <crate::kron::KronOptions as Options>::info()),
        ("XMat", <crate::xmat::XMatOptions as Options>::info()),
        ("LRA", <crate::lra::LraOptions as Options>::info()),
        ("Affine", <crate::affine::AffineOptions as Options>::info()),
    ]
}

/// Whether two variants declare an option alike (name, type and doc).
fn same(a: &OptionInfo, b: &OptionInfo) -> bool {
    a.name == b.name && a.ts == b.ts && a.doc == b.doc
}

/// The options XMat, LRA and Affine declare alike (psgd-jax's common arguments of `xmat`,
/// `low_rank_approximation` and `affine`): written once in each generated file.
fn shared(variants: &[(&'static str, Vec<OptionInfo>); 4]) -> Vec<OptionInfo> {
    variants[1]
        .1
        .iter()
        .filter(|i| {
            variants[2..]
                .iter()
                .all(|(_, v)| v.iter().any(|j| same(i, j)))
        })
        .cloned()
        .collect()
}

/// One option of a generated interface: its doc comment, then `name?: type`.
fn push_option(out: &mut String, i: &OptionInfo) {
    let doc = i.doc.trim();
    if !doc.is_empty() {
        out.push_str("  /**\n");
        for line in doc.lines() {
            let line = line.strip_prefix(' ').unwrap_or(line);
            if line.is_empty() {
                out.push_str("   *\n");
            } else {
                out.push_str(&format!("   * {line}\n"));
            }
        }
        out.push_str("   */\n");
    }
    out.push_str(&format!("  {}?: {}\n", i.name, i.ts));
}

/// The generated TypeScript file: one interface of option fields per variant, with docs.
pub fn typescript() -> String {
    let mut out = String::from(
        "// Generated from the Rust option declarations (crates/psgd/src/options.rs and each\n\
         // variant's `declare_options!`) by `cargo test -p psgd generated_typescript`; do not\n\
         // edit. A test fails when this file and the declarations differ; rerun with\n\
         // PSGD_WRITE_GENERATED=1 to rewrite it.\n\
         import type { WarningHook } from './guard'\n\
         import type { Schedule } from './schedule'\n\
         import type { Mask } from './tree'\n",
    );
    let variants = variants();
    // The options XMat, LRA and Affine declare alike (psgd_options!) are written once, as
    // `PsgdNativeOptions`, which their interfaces extend: the same text is not generated
    // three times.
    let shared = shared(&variants);
    out.push_str(
        "\n/** The options XMat, LRA and Affine share (psgd-jax's common arguments of `xmat`, `low_rank_approximation` and `affine`). */\nexport interface PsgdNativeOptions {\n",
    );
    shared.iter().for_each(|i| push_option(&mut out, i));
    out.push_str("}\n");
    for (k, (name, info)) in variants.iter().enumerate() {
        let about = format!(
            "\n/** The options of `{}` declared in Rust (see the variant's options type). */\n",
            name.to_lowercase()
        );
        out.push_str(&about);
        let own: Vec<&OptionInfo> = if k == 0 {
            info.iter().collect()
        } else {
            info.iter()
                .filter(|i| !shared.iter().any(|s| same(i, s)))
                .collect()
        };
        match (k, own.is_empty()) {
            (0, _) => out.push_str(&format!("export interface {name}NativeOptions {{\n")),
            (_, true) => {
                out.push_str(&format!(
                    "export type {name}NativeOptions = PsgdNativeOptions\n"
                ));
                continue;
            }
            (_, false) => out.push_str(&format!(
                "export interface {name}NativeOptions extends PsgdNativeOptions {{\n"
            )),
        }
        own.iter().for_each(|i| push_option(&mut out, i));
        out.push_str("}\n");
    }
    out.push_str(
        "\n/**\n * Per variant: whether `update` takes Hessian-vector products, and each option's kind:\n * `'schedule'` (a number, or a function of the step evaluated in TypeScript), `'mask'`\n * (resolved in TypeScript), `'hook'` (a function TypeScript calls) or `'value'` (read and checked by the native core).\n */\n",
    );
    out.push_str("export const VARIANTS = {\n");
    let hessian = [
        <crate::kron::KronPreconditioner as crate::step::Preconditioner>::HESSIAN,
        <crate::xmat::XMatPreconditioner as crate::step::Preconditioner>::HESSIAN,
        <crate::lra::LraPreconditioner as crate::step::Preconditioner>::HESSIAN,
        <crate::affine::AffinePreconditioner as crate::step::Preconditioner>::HESSIAN,
    ];
    for ((name, info), h) in variants.iter().zip(hessian) {
        out.push_str(&format!(
            "  {}: {{\n    hessian: {h},\n    options: {{\n",
            name.to_lowercase()
        ));
        for i in info {
            let kind = if i.ts_only && i.ts.contains("Hook") {
                "hook"
            } else if i.ts_only {
                "mask"
            } else if i.ts.contains("Schedule") {
                "schedule"
            } else {
                "value"
            };
            out.push_str(&format!("      {}: '{kind}',\n", i.name));
        }
        out.push_str("    },\n  },\n");
    }
    out.push_str("} as const\n");
    out
}

/// A paragraph on one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A markdown table cell: one line, `|` escaped.
fn cell(s: &str) -> String {
    one_line(s).replace('|', "\\|")
}

/// One options table: TypeScript name, psgd-jax / Rust name, type, what it does.
fn push_table(out: &mut String, infos: &[&OptionInfo]) {
    out.push_str("| option | psgd-jax / Rust | type | meaning and default |\n|---|---|---|---|\n");
    for i in infos {
        out.push_str(&format!(
            "| `{}` | `{}` | `{}` | {} |\n",
            i.name,
            i.snake,
            cell(&i.ts),
            cell(&i.doc)
        ));
    }
}

/// The options reference: a table per variant (the options XMat, LRA and Affine share in
/// one table, then each one's own), from the same declarations as the TypeScript types.
pub fn options_reference() -> String {
    let variants = variants();
    let shared = shared(&variants);
    let mut out = String::from(
        "<!-- generated from the Rust option declarations by `cargo test -p psgd generated_options_reference`; do not edit between these markers -->\n",
    );
    out.push_str("\n## Kron options\n\n");
    push_table(&mut out, &variants[0].1.iter().collect::<Vec<_>>());
    out.push_str("\n## XMat, LRA and Affine options\n\nThe options the three share (psgd-jax's common arguments of `xmat`, `low_rank_approximation` and `affine`):\n\n");
    push_table(&mut out, &shared.iter().collect::<Vec<_>>());
    for (name, info) in &variants[1..] {
        let own: Vec<&OptionInfo> = info
            .iter()
            .filter(|i| !shared.iter().any(|s| same(i, s)))
            .collect();
        if own.is_empty() {
            continue;
        }
        out.push_str(&format!("\n{name} also takes:\n\n"));
        push_table(&mut out, &own);
    }
    out.push_str("<!-- end of generated options -->\n");
    out
}

/// A JSON value as TypeScript source (JSON is TypeScript; integers stay integers).
fn ts_value(v: &serde_json::Value) -> String {
    v.to_string()
}

/// The generated `src/presets.generated.ts`: Kron's presets ([`crate::kron::kron_presets`])
/// as frozen option objects, with the anneal of a preset's fit probability written as the
/// `precondUpdateProbSchedule` call that makes it.
pub fn presets_typescript() -> String {
    let presets = crate::kron::kron_presets();
    let mut out = String::from(
        "// Generated from Kron's presets (crates/psgd/src/variants/kron/presets.rs) by\n\
         // `cargo test -p psgd generated_presets`; do not edit. A test fails when this file and\n\
         // the presets differ; rerun with PSGD_WRITE_GENERATED=1 to rewrite it.\n\
         import type { KronOptions } from './kron'\n\
         import { precondUpdateProbSchedule } from './schedule'\n\n\
         /**\n * Kron's presets: option sets under which Kron behaves like another PSGD library.\n * Every preset sets the same options, so a spread of one replaces an earlier one whole;\n * put your own values after it: `kron({ ...kronPresets.psgdTorch, learningRate: 3e-4 })`.\n * What each still does differently is listed in the options reference (docs/options.md).\n */\nexport interface KronPresets {\n",
    );
    for p in &presets {
        out.push_str("  /**\n");
        for line in wrap(p.doc, 88) {
            out.push_str(&format!("   * {line}\n"));
        }
        out.push_str(&format!(
            "   */\n  readonly {}: Readonly<KronOptions>\n",
            p.name
        ));
    }
    out.push_str("}\n\n/** See {@link KronPresets}. */\nexport const kronPresets: KronPresets = Object.freeze({\n");
    for p in &presets {
        out.push_str(&format!("  {}: Object.freeze({{\n", p.name));
        for (k, v) in &p.options {
            let value = match (k.as_str(), p.anneal) {
                ("preconditionerUpdateProbability", Some(a)) => format!(
                    "precondUpdateProbSchedule({{ maxProb: {}, minProb: {}, decay: {}, flatStart: {} }})",
                    a.max_prob, a.min_prob, a.decay, a.flat_start
                ),
                _ => ts_value(v),
            };
            out.push_str(&format!("    {k}: {value},\n"));
        }
        out.push_str("  }),\n");
    }
    out.push_str("})\n");
    out
}

/// The presets' reference in docs/options.md: per preset what it reproduces, the options
/// it sets beyond psgd-jax's defaults, and what still differs.
pub fn presets_reference() -> String {
    let presets = crate::kron::kron_presets();
    let base = &presets[0].options;
    let mut out = String::from(
        "<!-- generated from Kron's presets by `cargo test -p psgd generated_presets`; do not edit between these markers -->\n",
    );
    for p in &presets {
        out.push_str(&format!(
            "\n### `kronPresets.{}`\n\n{}\n",
            p.name,
            one_line(p.doc)
        ));
        let changed: Vec<String> = p
            .options
            .iter()
            .filter(|(k, v)| {
                base.get(k.as_str()) != Some(v)
                    || (k.as_str() == "preconditionerUpdateProbability" && p.anneal.is_some())
            })
            .map(|(k, v)| match (k.as_str(), p.anneal) {
                ("preconditionerUpdateProbability", Some(a)) => format!(
                    "`{k}: precondUpdateProbSchedule({{ flatStart: {}, decay: {:.7}, minProb: {} }})`",
                    a.flat_start, a.decay, a.min_prob
                ),
                _ => format!("`{k}: {}`", ts_value(v)),
            })
            .collect();
        if !changed.is_empty() {
            out.push_str(&format!(
                "\nSets, beyond the defaults: {}.\n",
                changed.join(", ")
            ));
        }
        if !p.differs.is_empty() {
            out.push_str("\nStill different:\n\n");
            for d in p.differs {
                out.push_str(&format!("- {}\n", one_line(d)));
            }
        }
    }
    out.push_str("<!-- end of generated presets -->\n");
    out
}

/// `text` (one paragraph) in lines of at most `width` characters.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let last = lines.last_mut().expect("one line");
        if !last.is_empty() && last.chars().count() + 1 + word.chars().count() > width {
            lines.push(word.to_string());
        } else {
            if !last.is_empty() {
                last.push(' ');
            }
            last.push_str(word);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks (or, with `PSGD_WRITE_GENERATED` set, rewrites) the part of `path` (relative
    /// to the repository root) from `start` to `end` inclusive, or the whole file.
    fn check_generated(path: &str, want: &str, markers: Option<(&str, &str)>) {
        // two tests rewrite parts of docs/options.md: one at a time, or one reads the
        // other's half-written file
        static FILES: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = FILES.lock().unwrap_or_else(|e| e.into_inner());
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(path);
        let got = std::fs::read_to_string(&path).unwrap_or_default();
        let (before, now, after) = match markers {
            None => ("", got.as_str(), ""),
            Some((start, end)) => {
                let a = got.find(start).expect("the start marker");
                let b = got[a..].find(end).expect("the end marker") + a;
                let b = b + got[b..].find('\n').map_or(got.len() - b, |n| n + 1);
                (&got[..a], &got[a..b], &got[b..])
            }
        };
        if std::env::var_os("PSGD_WRITE_GENERATED").is_some() {
            std::fs::write(&path, format!("{before}{want}{after}")).unwrap();
            return;
        }
        assert!(
            now == want,
            "{} is out of date: run `PSGD_WRITE_GENERATED=1 cargo test -p psgd generated_`",
            path.display()
        );
    }

    /// The checked-in TypeScript types are the ones the declarations give.
    #[test]
    fn generated_typescript_is_current() {
        check_generated("src/options.generated.ts", &typescript(), None);
    }

    /// The options reference in the docs is the one the declarations give.
    #[test]
    fn generated_options_reference_is_current() {
        check_generated(
            "docs/options.md",
            &options_reference(),
            Some((
                "<!-- generated from the Rust",
                "<!-- end of generated options -->",
            )),
        );
    }
    /// The checked-in TypeScript presets are the ones the Rust presets give.
    #[test]
    fn generated_presets_typescript_is_current() {
        check_generated("src/presets.generated.ts", &presets_typescript(), None);
    }

    /// The presets' reference in the docs is the one the Rust presets give.
    #[test]
    fn generated_presets_reference_is_current() {
        check_generated(
            "docs/options.md",
            &presets_reference(),
            Some((
                "<!-- generated from Kron's presets",
                "<!-- end of generated presets -->",
            )),
        );
    }
}
