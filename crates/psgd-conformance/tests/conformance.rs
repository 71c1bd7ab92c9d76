//! The committed psgd-jax 0.2.9 fixtures, replayed through our optimizers.

use std::path::Path;

fn check(variant: &str, min_cases: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(variant);
    let results = psgd_conformance::run_dir(&dir).expect("fixture directory");
    assert!(
        results.len() >= min_cases,
        "expected at least {min_cases} {variant} cases, found {}",
        results.len()
    );
    let mut failed = 0;
    for r in &results {
        println!(
            "{:<32} max rel err {:.3e}  {}  {}",
            r.name,
            r.max_rel_err,
            if r.passed { "ok" } else { "FAIL" },
            r.detail
        );
        if !r.passed {
            failed += 1;
        }
    }
    assert_eq!(
        failed,
        0,
        "{failed} of {} {variant} cases failed",
        results.len()
    );
}

#[test]
fn kron_fixtures_match_psgd_jax() {
    check("kron", 10);
}

#[test]
fn xmat_fixtures_match_psgd_jax() {
    check("xmat", 6);
}

#[test]
fn lra_fixtures_match_psgd_jax() {
    check("lra", 6);
}

#[test]
fn affine_fixtures_match_psgd_jax() {
    check("affine", 6);
}
