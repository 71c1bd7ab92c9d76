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

/// psgd_torch's `KronWhiten` and `KronNewton` (`psgd.py` at a8616f1; `Q0.5EQ1.5`, `QUAD`,
/// `QEQ`, `QEP`, `PRO4P`, `QUAD4P`), their recorded runs replayed (the Newton cases feed
/// the recorded probes and Hessian-vector products): every case within 1e-5 of the
/// update's RMS (float32 round-off; the checker's tolerance is 1e-3), the Newton form of
/// every rule among them, and the `torch_step_*` runs of the step options (momentum, the
/// fit last, the update clip acting) under PRO and QUAD.
#[test]
fn kron_torch_fixtures_match_psgd_torch() {
    let rules = ["pro", "pro4p", "qep", "qeq", "quad", "quad4p"];
    let results = check_rules("kron-torch", 36, &rules);
    let newton: std::collections::BTreeSet<&str> = results
        .iter()
        .filter(|r| r.name.contains("_newton_"))
        .filter_map(|r| r.name.split('_').nth(1))
        .collect();
    assert_eq!(
        newton.into_iter().collect::<Vec<_>>(),
        rules,
        "Newton cases"
    );
    let step_rules: std::collections::BTreeSet<&str> = results
        .iter()
        .filter_map(|r| r.name.strip_prefix("torch_step_"))
        .map(|rest| rest.split('_').next().unwrap_or_default())
        .collect();
    assert_eq!(
        step_rules.into_iter().collect::<Vec<_>>(),
        ["pro", "quad"],
        "torch_step_* cases of both rules"
    );
}

/// The cases under `fixtures/<dir>` (at least `min`), of exactly the rules `rules` (named
/// `<reference>_<rule>_…` or `<reference>_step_<rule>_…`), each within 1e-5 of the
/// update's RMS.
fn check_rules(dir: &str, min: usize, rules: &[&str]) -> Vec<psgd_conformance::CaseResult> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(dir);
    let results = psgd_conformance::run_dir(&path).expect("fixture directory");
    assert!(results.len() >= min, "only {} {dir} cases", results.len());
    let mut seen = std::collections::BTreeSet::new();
    for r in &results {
        println!(
            "{:<32} max rel err {:.3e}  {}",
            r.name, r.max_rel_err, r.detail
        );
        let words: Vec<&str> = r.name.split('_').filter(|w| *w != "step").collect();
        seen.insert(words.get(1).copied().unwrap_or_default().to_string());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        rules,
        "cases of every rule"
    );
    let bad: Vec<String> = results
        .iter()
        .filter(|r| !r.passed || r.max_rel_err > 1e-5)
        .map(|r| format!("{}: {:.3e} {}", r.name, r.max_rel_err, r.detail))
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
    results
}

/// A psgd-torch case's options map to ours (`dQ` → `updateRule`, the draw decision, the
/// momentum with its warm-up, what is whitened, the fit's order, the update clip, the
/// global initial scale, the skew rule); what has no counterpart here yet is refused with
/// a message naming it.
#[test]
fn psgd_torch_options_map_or_are_refused_by_name() {
    use psgd::LeafSpec;
    use serde_json::json;
    let leaves = vec![LeafSpec::new("b", &[4]), LeafSpec::new("w", &[4, 4])];
    let map = |o: serde_json::Value, leaves: &[LeafSpec]| {
        psgd_conformance::psgd_torch_options(o.as_object().unwrap(), leaves)
            .map_err(|e| e.to_string())
    };
    let ok = map(
        json!({"dQ": "QUAD", "lr_params": 0.01, "lr_preconditioner": 0.3, "betaL": 0.95,
               "momentum": 0.0, "preconditioner_init_scale": 0.1,
               "preconditioner_update_probability": 0.5}),
        &leaves,
    )
    .unwrap();
    for (k, v) in [
        ("updateRule", json!("QUAD")),
        ("learningRate", json!(0.01)),
        ("preconditionerLr", json!(0.3)),
        ("lipschitzBeta", json!(0.95)),
        ("b1", json!(0.0)),
        ("momentumIntoPrecondUpdate", json!(false)),
        ("updatePreconditionerFirst", json!(true)),
        ("updateClipRms", json!(2.0)),
        ("updateClipElement", json!(10.0)),
        ("maxSkew", json!(1.0)),
        ("preconditionerInitScale", json!(0.1)),
        ("preconditionerUpdateProbability", json!(0.5)),
        ("updateDecision", json!("draw")),
    ] {
        assert_eq!(ok.get(k), Some(&v), "{k}");
    }
    let pro = map(
        json!({"dQ": "Q0p5EQ1p5", "preconditioner_init_scale": 1.0}),
        &leaves,
    );
    assert_eq!(pro.unwrap()["updateRule"], json!("Q0.5EQ1.5"));
    for rule in ["QEQ", "QEP", "PRO4P", "QUAD4P"] {
        let o = json!({"dQ": rule, "preconditioner_init_scale": 1.0});
        assert_eq!(map(o, &leaves).unwrap()["updateRule"], json!(rule));
    }
    // KronNewton's global-norm clip has no counterpart; its default (none) maps
    let o = json!({"preconditioner_init_scale": 1.0, "grad_clip_max_norm": null});
    assert!(map(o, &leaves).is_ok());
    let o = json!({"preconditioner_init_scale": 1.0, "grad_clip_max_norm": 1.0});
    assert!(map(o, &leaves).unwrap_err().contains("grad_clip_max_norm"));
    // psgd_torch's automatic scale (the default) is one scale over every leaf
    let auto = map(json!({}), &leaves).unwrap();
    assert_eq!(auto["preconditionerInitScale"], json!(null));
    assert_eq!(auto["initScaleScope"], json!("global"));
    // momentum with its warm-up, whitening the momentum, the fit last, another clip
    let torch = map(
        json!({"momentum": 0.9, "whiten_grad": false, "update_preconditioner_first": false,
               "grad_clip_max_amps": [1.5, 3.0], "preconditioner_max_skew": 2.0}),
        &leaves,
    )
    .unwrap();
    for (k, v) in [
        ("b1", json!(0.9)),
        ("momentumWarmup", json!("psgdTorch")),
        ("momentumIntoPrecondUpdate", json!(true)),
        ("updatePreconditionerFirst", json!(false)),
        ("updateClipRms", json!(1.5)),
        ("updateClipElement", json!(3.0)),
        ("maxSkew", json!(2.0)),
    ] {
        assert_eq!(torch.get(k), Some(&v), "{k}");
    }
    // whitening the gradient with momentum: the momentum is only preconditioned
    let grad = map(json!({"momentum": 0.5}), &leaves).unwrap();
    assert_eq!(grad["momentumIntoPrecondUpdate"], json!(false));
    assert_eq!(grad["b1"], json!(0.5));

    let scaled = json!({"preconditioner_init_scale": 1.0});
    for (options, leaves, expect) in [
        (json!({"dQ": "EQ"}), &leaves[..], "dQ 'EQ'"),
        (
            json!({"whiten_grad": false}),
            &leaves[..],
            "whiten_grad false needs a momentum",
        ),
        (json!({"damping": 1e-6}), &leaves[..], "damping"),
        (
            json!({"lr": 0.1}),
            &leaves[..],
            "'lr' is not a KronWhiten option",
        ),
        (
            json!({"grad_clip_max_amps": [2.0]}),
            &leaves[..],
            "grad_clip_max_amps [2.0] is not two numbers",
        ),
        (
            scaled.clone(),
            &[LeafSpec::new("w", &[1, 4])][..],
            "squeezes its size-1 axes",
        ),
    ] {
        let err = map(options.clone(), leaves).unwrap_err();
        assert!(
            err.contains("psgd-torch case not replayable") && err.contains(expect),
            "{options}: {err}"
        );
    }
    // [6, 4]: 36 > 24, so maxSkew 1 makes axis 0 diagonal, as psgd_torch does
    let skew = json!({"preconditioner_init_scale": 1.0, "preconditioner_max_skew": 1.0});
    assert_eq!(
        map(skew, &[LeafSpec::new("w", &[6, 4])]).unwrap()["maxSkew"],
        json!(1.0)
    );
}

/// distributed-kron 2.0.0's `pro` (PRO and QUAD styles) on merged and blocked shapes
/// (`[2, 3, 4]` → `[6, 4]`, `[4, 3]` with blocks of 4 and 256, `[10, 7]` and `[9, 5]` in
/// several blocks of 4, scanned layers in blocks, 1-D leaves, momentum), its runs replayed
/// with its own draws: every case within 1e-5 of the update's RMS.
#[test]
fn kron_dk_fixtures_match_distributed_kron() {
    check_rules("kron-dk", 11, &["pro", "quad"]);
}

/// A distributed-kron case's options map to ours (`mergeDims: 'twoD'`, `blockSize`, the
/// Lipschitz smoothing 0.95); what has no counterpart here yet is refused by name.
#[test]
fn distributed_kron_options_map_or_are_refused_by_name() {
    use serde_json::json;
    let map = |o: serde_json::Value| {
        psgd_conformance::distributed_kron_options(o.as_object().unwrap())
            .map_err(|e| e.to_string())
    };
    let ok = map(
        json!({"lr_style": null, "weight_decay": 0.0, "block_size": 4,
                        "preconditioner_update_style": "QUAD"}),
    )
    .unwrap();
    assert_eq!(ok["mergeDims"], json!("twoD"));
    assert_eq!(ok["blockSize"], json!(4));
    assert_eq!(ok["updateRule"], json!("QUAD"));
    assert_eq!(ok["lipschitzBeta"], json!(0.95));
    assert_eq!(ok["preconditionerLr"], json!(0.5));
    assert_eq!(ok["b1"], json!(0.95));
    let base = json!({"lr_style": null, "weight_decay": 0.0});
    let with = |k: &str, v: serde_json::Value| {
        let mut o = base.clone();
        o[k] = v;
        o
    };
    for (options, expect) in [
        (json!({"weight_decay": 0.0}), "lr_style absent"),
        (with("lr_style", json!("adam")), "lr_style \"adam\""),
        (with("weight_decay", json!(0.1)), "weight_decay 0.1"),
        (
            with("preconditioner_init_scale", json!(0.5)),
            "preconditioner_init_scale 0.5",
        ),
        (with("noise_scale", json!(1e-6)), "noise_scale"),
        (with("normalize_grads", json!(true)), "'normalize_grads'"),
        (with("pipeline_axis_size", json!(2)), "'pipeline_axis_size'"),
        (with("preconditioner_update_style", json!("EQ")), "'EQ'"),
    ] {
        let err = map(options.clone()).unwrap_err();
        assert!(
            err.contains("distributed-kron case not replayable") && err.contains(expect),
            "{options}: {err}"
        );
    }
}
