//! The crate's module graph keeps its layers: kernels, then the core, then the variants,
//! then the top (the variant list, the generators, the candle optimizer). A module's
//! imports are the `crate::…`/`super::…` paths in its code (doc comments and test modules
//! left out). No import circle is allowed, and only the listed imports may run upwards.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Imports that run against the layers, with the reason each is kept.
const UPWARD: &[(&str, &str)] = &[
    // the fused passes name the leaf (path and shape) in their errors
    ("kernels::fused", "transform"),
];

fn modules(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            modules(&path, &format!("{prefix}{stem}::"), out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let name = match stem.as_str() {
                "mod" => prefix.trim_end_matches("::").to_string(),
                "lib" => "lib".to_string(),
                _ => format!("{prefix}{stem}"),
            };
            out.insert(name, std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// The code of a module: no test module, no comments.
fn code(src: &str) -> String {
    let end = [
        "#[cfg(test)]\nmod tests",
        "#[cfg(test)]\npub(crate) mod tests",
    ]
    .iter()
    .filter_map(|m| src.find(m))
    .min()
    .unwrap_or(src.len());
    src[..end]
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn layer(m: &str) -> u8 {
    match m {
        "error" => 0,
        _ if m.starts_with("kernels") => 1,
        _ if m.starts_with("variants") => 3,
        "any" | "codegen" | "optimizer" | "lib" => 4,
        _ => 2,
    }
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut srcs = BTreeMap::new();
    modules(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        "",
        &mut srcs,
    );
    let names: Vec<String> = srcs.keys().cloned().collect();
    // the crate root's re-exports (`crate::kron` is `variants::kron`)
    let alias = |m: &str| {
        for v in ["kron", "xmat", "lra", "affine", "common"] {
            if m == v || m.starts_with(&format!("{v}::")) {
                return format!("variants::{m}");
            }
        }
        m.to_string()
    };
    let mut edges = BTreeMap::new();
    for (m, src) in &srcs {
        let mut to = BTreeSet::new();
        let text = code(src);
        for prefix in ["crate::", "super::"] {
            for (at, _) in text.match_indices(prefix) {
                let rest = &text[at + prefix.len()..];
                let path: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let path = if prefix == "super::" {
                    let parent = m.rsplit_once("::").map_or("", |(p, _)| p);
                    if parent.is_empty() {
                        path
                    } else {
                        format!("{parent}::{path}")
                    }
                } else {
                    alias(&path)
                };
                let parts: Vec<&str> = path.split("::").collect();
                if let Some(found) = (1..=parts.len())
                    .rev()
                    .map(|k| parts[..k].join("::"))
                    .find(|c| names.contains(c) && c != m)
                {
                    to.insert(found);
                }
            }
        }
        edges.insert(m.clone(), to);
    }
    edges
}

#[test]
fn the_module_graph_has_no_circle_and_keeps_its_layers() {
    let edges = graph();
    assert!(edges.contains_key("variants::kron") && edges.contains_key("kernels::fused"));
    // a circle shows as a module reachable from itself
    for start in edges.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&String> = edges[start].iter().collect();
        while let Some(m) = todo.pop() {
            assert!(m != start, "import circle through {start}");
            if seen.insert(m) {
                todo.extend(edges.get(m).into_iter().flatten());
            }
        }
    }
    let upward: Vec<(String, String)> = edges
        .iter()
        .flat_map(|(m, to)| {
            to.iter()
                .filter(|t| layer(t) > layer(m))
                .map(move |t| (m.clone(), t.clone()))
        })
        .collect();
    let allowed: Vec<(String, String)> = UPWARD
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(upward, allowed, "imports against the layers");
}
