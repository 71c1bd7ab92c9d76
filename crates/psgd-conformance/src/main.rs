//! The conformance checker: `cargo run --release -p psgd-conformance -- DIR` (or `npm run
//! conformance -- DIR`) replays every fixture case under DIR (see `conformance.md`), prints
//! one line per case and `N passed, M failed`, and exits 1 when any case fails.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir] = args.as_slice() else {
        eprintln!("usage: psgd-conformance DIR");
        return ExitCode::from(2);
    };
    let results = match psgd_conformance::run_dir(Path::new(dir)) {
        Ok(r) if !r.is_empty() => r,
        Ok(_) => {
            eprintln!("conformance: no case (a directory with case.json) under '{dir}'");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("conformance: {e}");
            return ExitCode::from(2);
        }
    };
    let width = results.iter().map(|r| r.name.len()).max().unwrap_or(0);
    for r in &results {
        let err = if r.max_rel_err.is_finite() {
            format!("{:.2e}", r.max_rel_err)
        } else {
            "error".to_string()
        };
        println!(
            "{}  {:<width$}  max rel err {err} (tol {})  {}",
            if r.passed { "PASS" } else { "FAIL" },
            r.name,
            psgd_conformance::TOLERANCE,
            r.detail
        );
    }
    let passed = results.iter().filter(|r| r.passed).count();
    println!("{passed} passed, {} failed", results.len() - passed);
    if passed == results.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
