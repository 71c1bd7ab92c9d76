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
/// `QEQ`, `QEP`, `PRO4P`, `QUAD4P`, and `EQ` through the fit's numerics), their recorded
/// runs replayed (the Newton cases feed the recorded probes and Hessian-vector products):
/// every case within 1e-5 of the update's RMS (float32 round-off; the checker's tolerance
/// is 1e-3), the Newton form of every inverse-free rule among them, and the `torch_step_*`
/// runs of the step options (momentum, the fit last, the update clip acting) under PRO and
/// QUAD.
#[test]
fn kron_torch_fixtures_match_psgd_torch() {
    let rules = ["eq", "pro", "pro4p", "qep", "qeq", "quad", "quad4p"];
    let results = check_rules("kron-torch", 60, &rules);
    // every rule in its Newton form, and with size-1 axes (psgd_torch squeezes them) in
    // both forms
    let of = |pattern: &str| -> Vec<&str> {
        let set: std::collections::BTreeSet<&str> = results
            .iter()
            .filter(|r| r.name.contains(pattern))
            .filter_map(|r| r.name.split('_').nth(1))
            .collect();
        set.into_iter().collect()
    };
    assert_eq!(of("_newton_"), rules, "Newton cases");
    assert_eq!(of("_newton_squeeze"), rules, "squeezed Newton cases");
    let whitening_squeeze: std::collections::BTreeSet<&str> = results
        .iter()
        .filter(|r| r.name.ends_with("_squeeze") && !r.name.contains("_newton_"))
        .filter_map(|r| r.name.split('_').nth(1))
        .collect();
    assert_eq!(
        whitening_squeeze.into_iter().collect::<Vec<_>>(),
        rules,
        "squeezed whitening cases"
    );
    let eq = results
        .iter()
        .filter(|r| r.name.starts_with("torch_eq_"))
        .count();
    assert!(eq >= 10, "only {eq} torch_eq_* cases");
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

    // psgd_torch's EQ: the EQ rule with psgd_torch's numerics; its damping is mapped
    let eq = map(
        json!({"dQ": "EQ", "damping": 1e-6, "betaL": 0.8, "preconditioner_init_scale": 1.0}),
        &leaves,
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
    // size-1 axes: psgd_torch squeezes them, mergeDims 'twoD' does the same here
    let squeezed = map(
        json!({"preconditioner_init_scale": 1.0}),
        &[LeafSpec::new("w", &[1, 4, 1]), LeafSpec::new("m", &[4, 3])],
    )
    .unwrap();
    assert_eq!(squeezed["mergeDims"], json!("twoD"));
    assert_eq!(ok.get("mergeDims"), None);
    assert_eq!(ok.get("normEstimator"), None);

    let scaled = json!({"preconditioner_init_scale": 1.0});
    for (options, leaves, expect) in [
        (json!({"dQ": "Q1EQ1"}), &leaves[..], "dQ 'Q1EQ1'"),
        (
            json!({"whiten_grad": false}),
            &leaves[..],
            "whiten_grad false needs a momentum",
        ),
        (json!({"damping": -1.0}), &leaves[..], "damping -1"),
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
            &[LeafSpec::new("w", &[1, 2, 3, 4])][..],
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

/// heavyball 3.2.1's `PSGDPRO` (its whole step: momentum, fit, preconditioning, weight
/// decay, learning rate), run eagerly with its single-argument `stochastic_round_` the
/// identity, replayed under the `heavyballPro` preset: 2-D, 3-D, 1-D, scalar and
/// non-square leaves, the automatic initial scale (powers 0.5 and 1) and fixed ones, weight
/// decay, a constant fit probability under the cumulative decision, momentum options,
/// diagonal axes, and a run whose Procrustes step heavyball clamps: every case within 1e-5
/// of the update's RMS.
#[test]
fn kron_hb_fixtures_match_heavyball() {
    let results = check_rules("kron-hb", 12, &["pro"]);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/kron-hb");
    let meta = |name: &str| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join(name).join("case.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    // the clamp of the Procrustes step (heavyball's 0.5) acted in the clamped case
    let clamped = meta("hb_pro_clamped")["procrustes_clamped_steps"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(clamped >= 5, "the clamp acted on {clamped} steps");
    // automatic and fixed initial scales, a scalar leaf, and a step that did not fit
    let mut auto = 0;
    let mut scalar = false;
    for r in &results {
        let m = meta(&r.name);
        assert_eq!(m["reference"], "heavyball", "{}", r.name);
        auto += m["options"].get("precond_init_scale").is_none() as usize;
        scalar |= m["params"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["shape"].as_array().is_some_and(Vec::is_empty));
    }
    assert!(auto >= 3 && auto < results.len(), "{auto} automatic scales");
    assert!(scalar, "no scalar leaf");
    let half = meta("hb_pro_prob_half");
    let draws = half["draws"].as_array().unwrap();
    assert!(draws.iter().any(|d| d.as_array().unwrap().is_empty()));
}

/// A heavyball case's options map onto the `heavyballPro` preset (`lr`, `betas`/`beta`,
/// the fit's step, bounds and damping, the initial scale, the factor kinds, the
/// probability: null is heavyball's anneal); what has no counterpart is refused by name.
#[test]
fn heavyball_options_map_or_are_refused_by_name() {
    use psgd::kron::{MemorySaveMode, NormEstimator};
    use psgd::{LeafSpec, UpdateRule};
    use serde_json::json;
    let leaves = vec![LeafSpec::new("w", &[4, 3]), LeafSpec::new("b", &[5])];
    let map = |o: serde_json::Value| {
        psgd_conformance::heavyball_options(o.as_object().unwrap(), &leaves)
            .map_err(|e| e.to_string())
    };
    // the defaults: the preset itself
    let defaults = map(json!({})).unwrap();
    assert_eq!(
        format!("{defaults:?}"),
        format!("{:?}", psgd::KronOptions::preset("heavyballPro").unwrap())
    );
    let p = defaults.preconditioner_update_probability.clone().unwrap();
    assert_eq!(p.at(1000), 1.0);
    assert!((p.at(2000) - 0.999f64.powi(1000)).abs() < 1e-6);
    let o = map(json!({
        "lr": 0.01, "betas": [0.95, 0.999], "weight_decay": 0.1, "precond_lr": 0.3,
        "lower_bound_beta": 0.8, "dampening": 1e-6, "precond_init_scale": 2.0,
        "precond_init_scale_power": 1.0, "max_size_triangular": 5, "min_ndim_triangular": 3,
        "memory_save_mode": "one_diag", "momentum_into_precond_update": false,
        "preconditioner_update_probability": 0.5, "precond_update_power_iterations": 2,
        "multi_tensor": true, "warmup_steps": 0, "cached": null
    }))
    .unwrap();
    assert_eq!(o.update_rule, UpdateRule::Pro);
    assert_eq!(o.norm_estimator, Some(NormEstimator::Power));
    assert_eq!(o.learning_rate.at(0), 0.01);
    assert_eq!((o.b1, o.weight_decay), (0.95, 0.1));
    assert_eq!((o.preconditioner_lr, o.lipschitz_beta), (0.3, Some(0.8)));
    assert_eq!(o.damping, Some(1e-6));
    assert_eq!(o.preconditioner_init_scale, Some(2.0));
    assert_eq!((o.max_size_triangular, o.min_ndim_triangular), (5, 3));
    assert_eq!(o.memory_save_mode, Some(MemorySaveMode::OneDiag));
    assert!(!o.momentum_into_precond_update);
    let p = o.preconditioner_update_probability.unwrap();
    assert_eq!((p.at(1), p.at(5000)), (0.5, 0.5));
    // `beta` wins over `betas`; the automatic scale keeps its power
    let o =
        map(json!({"beta": 0.5, "betas": [0.9, 0.99], "precond_init_scale_power": 1.0})).unwrap();
    assert_eq!(o.b1, 0.5);
    assert_eq!(o.preconditioner_init_scale, None);
    assert_eq!(o.init_scale_power, 1.0);
    for (options, expect) in [
        (
            json!({"memory_save_mode": "smart_one_diag"}),
            "memory_save_mode \"smart_one_diag\"",
        ),
        (
            json!({"memory_save_mode": "one_triu"}),
            "memory_save_mode \"one_triu\"",
        ),
        (
            json!({"precond_init_scale_scale": 2.0}),
            "precond_init_scale_scale 2",
        ),
        (
            json!({"precond_update_power_iterations": 4}),
            "precond_update_power_iterations 4",
        ),
        (json!({"caution": true}), "caution true"),
        (json!({"mars": true}), "mars true"),
        (json!({"warmup_steps": 10}), "warmup_steps 10"),
        (json!({"merge_dims": true}), "merge_dims true"),
        (
            json!({"update_clipping": "l2_clip_"}),
            "update_clipping \"l2_clip_\"",
        ),
        (json!({"q_dtype": "bfloat16"}), "q_dtype \"bfloat16\""),
        (json!({"exp_avg_input": false}), "exp_avg_input false"),
        (
            json!({"preconditioner_max_size": 8}),
            "'preconditioner_max_size'",
        ),
    ] {
        let err = map(options.clone()).unwrap_err();
        assert!(
            err.contains("heavyball case not replayable") && err.contains(expect),
            "{options}: {err}"
        );
    }
    // leaves Kron lays out otherwise than heavyball
    for (shapes, expect) in [
        (vec![vec![1, 4, 3]], "size-1 axes"),
        (vec![vec![4, 3], vec![4, 3]], "one bucket"),
    ] {
        let leaves: Vec<LeafSpec> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| LeafSpec::new(format!("p{i}"), s))
            .collect();
        let err = psgd_conformance::heavyball_options(&serde_json::Map::new(), &leaves)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect), "{shapes:?}: {err}");
    }
}

/// Kron's presets run exactly as the checkers' mappings of their libraries' defaults, the
/// mappings the recorded fixtures verify: `psgdTorch` as psgd_torch's `KronWhiten()` and
/// `distributedKronPro` as distributed-kron's `pro()` (with `lr_style` and weight decay off:
/// the preset folds them into its learning rate and weight decay, which this compares
/// apart). Bit for bit over steps that fit and balance, with the same seed.
#[test]
fn presets_run_as_the_checkers_mappings_of_their_libraries_defaults() {
    use candle_core::{Device, Tensor};
    use psgd::{AnyTransform, KronOptions, LeafSpec};
    use serde_json::{json, Map, Value};
    let leaves = vec![
        LeafSpec::new("w", &[4, 6]),
        LeafSpec::new("b", &[5]),
        LeafSpec::new("t", &[3, 4, 2]),
    ];
    let run = |options: &Map<String, Value>| -> Vec<u8> {
        let opt = AnyTransform::new("kron", leaves.clone(), options).unwrap();
        let params: Vec<Tensor> = leaves
            .iter()
            .map(|l| Tensor::zeros(l.shape.as_slice(), candle_core::DType::F32, &Device::Cpu))
            .collect::<candle_core::Result<_>>()
            .unwrap();
        let mut state = opt.init(&params).unwrap();
        for step in 0..6 {
            let grads: Vec<Tensor> = leaves
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let n = l.numel();
                    let v: Vec<f32> = (0..n)
                        .map(|k| ((k * 7 + i * 3 + step * 5) as f32 * 0.37).sin())
                        .collect();
                    Tensor::from_vec(v, l.shape.as_slice(), &Device::Cpu)
                })
                .collect::<candle_core::Result<_>>()
                .unwrap();
            let hyper = opt.hyper(&state).unwrap();
            state = opt
                .update_seeded(&grads, &state, Some(&params), hyper, None)
                .unwrap()
                .1;
        }
        opt.state_to_bytes(&state).unwrap()
    };
    let preset = |name: &str| -> Map<String, Value> {
        psgd::kron_presets()
            .into_iter()
            .find(|p| p.name == name)
            .unwrap()
            .options
    };
    // every key the preset sets, with the mapping's values where it has them; `seed` and
    // the keys a mapping leaves to the defaults come from the preset
    let over = |mut p: Map<String, Value>, m: Map<String, Value>| {
        p.extend(m);
        p
    };
    let torch = psgd_conformance::psgd_torch_options(&Map::new(), &leaves).unwrap();
    // psgd_torch's infinite preconditioner_max_size maps to the largest axis here
    let mut torch_preset = preset("psgdTorch");
    torch_preset.insert(
        "maxSizeTriangular".into(),
        torch["maxSizeTriangular"].clone(),
    );
    assert_eq!(
        run(&torch_preset),
        run(&over(preset("psgdJax"), torch)),
        "psgdTorch"
    );
    let dk = psgd_conformance::distributed_kron_options(
        json!({"lr_style": null, "weight_decay": 0.0})
            .as_object()
            .unwrap(),
    )
    .unwrap();
    let mut dk_preset = preset("distributedKronPro");
    dk_preset.insert("learningRate".into(), json!(0.001));
    dk_preset.insert("weightDecay".into(), json!(0.0));
    assert_eq!(
        run(&dk_preset),
        run(&over(preset("psgdJax"), dk)),
        "distributedKronPro"
    );
    // and the presets differ from each other where their libraries do
    assert_ne!(run(&preset("psgdTorch")), run(&preset("psgdJax")));
    let _ = KronOptions::preset("heavyballPro").unwrap();
}
