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

/// psgd_torch's `KronWhiten` (`psgd.py` at a8616f1, `Q0.5EQ1.5`, `QUAD` and `EQ`), its recorded
/// runs replayed: every case within 1e-5 of the update's RMS (float32 round-off; the
/// checker's tolerance is 1e-3).
#[test]
fn kron_torch_fixtures_match_psgd_torch() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/kron-torch");
    let results = psgd_conformance::run_dir(&dir).expect("fixture directory");
    assert!(
        results.len() >= 18,
        "only {} kron-torch cases",
        results.len()
    );
    let mut rules = std::collections::BTreeSet::new();
    for r in &results {
        println!(
            "{:<32} max rel err {:.3e}  {}",
            r.name, r.max_rel_err, r.detail
        );
        rules.insert(r.name.split('_').nth(1).unwrap_or_default().to_string());
    }
    assert_eq!(
        rules.into_iter().collect::<Vec<_>>(),
        ["eq", "pro", "quad"],
        "cases of every rule"
    );
    let bad: Vec<String> = results
        .iter()
        .filter(|r| !r.passed || r.max_rel_err > 1e-5)
        .map(|r| format!("{}: {:.3e} {}", r.name, r.max_rel_err, r.detail))
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

/// A psgd-torch case's options map to ours (`dQ` → `updateRule`, the draw decision, …);
/// what has no counterpart here yet is refused with a message naming it.
#[test]
fn psgd_torch_options_map_or_are_refused_by_name() {
    use psgd::LeafSpec;
    use serde_json::json;
    let leaves = vec![LeafSpec::new("b", &[4]), LeafSpec::new("w", &[4, 4])];
    let clip = json!({"acted": false, "max_rms": 0.9, "max_abs": 2.0});
    let map = |o: serde_json::Value, leaves: &[LeafSpec], clip: Option<&serde_json::Value>| {
        psgd_conformance::psgd_torch_options(o.as_object().unwrap(), leaves, clip)
            .map_err(|e| e.to_string())
    };
    let ok = map(
        json!({"dQ": "QUAD", "lr_params": 0.01, "lr_preconditioner": 0.3, "betaL": 0.95,
               "momentum": 0.0, "preconditioner_init_scale": 0.1,
               "preconditioner_update_probability": 0.5}),
        &leaves,
        Some(&clip),
    )
    .unwrap();
    for (k, v) in [
        ("updateRule", json!("QUAD")),
        ("learningRate", json!(0.01)),
        ("preconditionerLr", json!(0.3)),
        ("lipschitzBeta", json!(0.95)),
        ("b1", json!(0.0)),
        ("preconditionerInitScale", json!(0.1)),
        ("preconditionerUpdateProbability", json!(0.5)),
        ("updateDecision", json!("draw")),
    ] {
        assert_eq!(ok.get(k), Some(&v), "{k}");
    }
    let pro = map(
        json!({"dQ": "Q0p5EQ1p5", "preconditioner_init_scale": 1.0}),
        &leaves,
        Some(&clip),
    );
    assert_eq!(pro.unwrap()["updateRule"], json!("Q0.5EQ1.5"));
    // psgd_torch's EQ: the EQ rule with psgd_torch's numerics; its damping is mapped
    let eq = map(
        json!({"dQ": "EQ", "damping": 1e-6, "betaL": 0.8, "preconditioner_init_scale": 1.0}),
        &leaves,
        Some(&clip),
    )
    .unwrap();
    for (k, v) in [
        ("updateRule", json!("EQ")),
        ("lipschitzBeta", json!(0.8)),
        ("damping", json!(1e-6)),
        ("normEstimator", json!("subspace")),
        ("balanceWhen", json!("afterFit")),
    ] {
        assert_eq!(eq.get(k), Some(&v), "{k}");
    }
    assert_eq!(ok["damping"], json!(1e-9));
    assert_eq!(ok.get("normEstimator"), None);
    // one leaf: psgd_torch's automatic scale (the default) is ours
    let one = map(json!({}), &leaves[1..], Some(&clip)).unwrap();
    assert_eq!(one["preconditionerInitScale"], json!(null));

    let scaled = json!({"preconditioner_init_scale": 1.0});
    for (options, leaves, clip, expect) in [
        (
            json!({"momentum": 0.9}),
            &leaves[..],
            Some(&clip),
            "momentum 0.9",
        ),
        (
            json!({"dQ": "Q1EQ1"}),
            &leaves[..],
            Some(&clip),
            "dQ 'Q1EQ1'",
        ),
        (
            json!({"whiten_grad": false}),
            &leaves[..],
            Some(&clip),
            "whiten_grad false",
        ),
        (
            json!({"update_preconditioner_first": false}),
            &leaves[..],
            Some(&clip),
            "update_preconditioner_first false",
        ),
        (
            json!({"damping": -1.0}),
            &leaves[..],
            Some(&clip),
            "damping -1",
        ),
        (
            json!({"lr": 0.1}),
            &leaves[..],
            Some(&clip),
            "'lr' is not a KronWhiten option",
        ),
        (
            json!({}),
            &leaves[..],
            Some(&clip),
            "preconditioner_init_scale null with several",
        ),
        (scaled.clone(), &leaves[..], None, "does not record whether"),
        (
            scaled.clone(),
            &leaves[..],
            Some(&json!({"acted": true, "max_rms": 2.5, "max_abs": 3.0})),
            "update clip (grad_clip_max_amps) acted",
        ),
        (
            scaled.clone(),
            &leaves[..],
            Some(&json!({"acted": false, "max_rms": 1.5, "max_abs": 3.0})),
            "RMS 1.5, above this package's cap 1.1",
        ),
        // [6, 4]: 36 > 24, so psgd_torch makes axis 0 diagonal; ours is dense
        (
            scaled.clone(),
            &[LeafSpec::new("w", &[6, 4])][..],
            Some(&clip),
            "axis 0 of leaf 'w' (shape [6, 4]) diagonal in psgd_torch, dense here",
        ),
        (
            scaled.clone(),
            &[LeafSpec::new("w", &[1, 4])][..],
            Some(&clip),
            "squeezes its size-1 axes",
        ),
    ] {
        let err = map(options.clone(), leaves, clip).unwrap_err();
        assert!(
            err.contains("psgd-torch case not replayable") && err.contains(expect),
            "{options}: {err}"
        );
    }
    // a larger skew makes [6, 4] dense in psgd_torch too
    let skew = json!({"preconditioner_init_scale": 1.0, "preconditioner_max_skew": 1.5});
    assert!(map(skew, &[LeafSpec::new("w", &[6, 4])], Some(&clip)).is_ok());
}
