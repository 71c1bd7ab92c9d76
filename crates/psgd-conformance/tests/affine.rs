//! Affine against psgd-jax 0.2.9: its fixtures and the branches they reach, Newton's step
//! on quadratics in Hessian mode, state I/O, and the matrix view of a leaf.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use psgd::affine::shape_as_matrix;
use psgd::{
    Affine, AffineOptions, Curvature, LeafSpec, RandomSource, Schedule, SeededRandom, StepHyper,
    Transform,
};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/affine")
}

#[test]
fn fixtures_pass_with_float32_round_off_only() {
    let results = psgd_conformance::run_dir(&fixture_dir()).expect("fixtures/affine");
    assert!(results.len() >= 6, "only {} affine cases", results.len());
    let bad: Vec<String> = results
        .iter()
        // the conformance tolerance is 1e-3; a matching port lands near 1e-6, so a
        // drift well above that is a bug even when it still passes
        .filter(|r| !r.passed || r.max_rel_err > 1e-4)
        .map(|r| format!("{}: {:.3e} {}", r.name, r.max_rel_err, r.detail))
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

/// Which fit a leaf takes: psgd-jax picks the branch from the factor kinds and, for the
/// whitening fit, the matrix's orientation.
fn branch(dense_l: bool, dense_r: bool, rows: usize, cols: usize, hessian: bool) -> String {
    let kind = |d: bool| if d { "dense" } else { "diag" };
    let sides = format!("{}/{}", kind(dense_l), kind(dense_r));
    if hessian {
        return format!("hessian {sides}");
    }
    // orientation only matters when exactly one side is diagonal
    let (closed_form, orientation) = match (dense_l, dense_r) {
        (false, false) => (true, ""),
        (true, true) => (false, ""),
        (false, true) => (rows >= cols, if rows >= cols { " tall" } else { " wide" }),
        (true, false) => (cols >= rows, if cols >= rows { " wide" } else { " tall" }),
    };
    let fit = if closed_form { "" } else { "fallback " };
    format!("whitening {fit}{sides}{orientation}")
}

/// The committed cases must keep reaching every branch of both fits and every option the
/// step shares, so that the conformance run means what it claims.
#[test]
fn fixtures_cover_every_branch() {
    let mut seen = BTreeSet::new();
    for dir in psgd_conformance::case_dirs(&fixture_dir()).unwrap() {
        let text = std::fs::read_to_string(dir.join("case.json")).unwrap();
        let case: Value = serde_json::from_str(&text).unwrap();
        let options = case["options"].as_object().unwrap();
        let hessian = case["hessian"].as_bool().unwrap();
        let leaves: Vec<LeafSpec> = case["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let shape: Vec<usize> = p["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                LeafSpec::new(p["path"].as_str().unwrap(), &shape)
            })
            .collect();
        let opt = Affine::new(
            leaves.clone(),
            <psgd::AffineOptions as psgd::Options>::from_json(&psgd::options::from_psgd_jax_names(
                options,
            ))
            .unwrap(),
        )
        .unwrap();
        let params: Vec<Tensor> = leaves
            .iter()
            .map(|l| Tensor::zeros(l.shape.as_slice(), candle_core::DType::F32, &Device::Cpu))
            .collect::<candle_core::Result<_>>()
            .unwrap();
        let state = opt.init(&params).unwrap();
        for (leaf, f) in leaves.iter().zip(&state.precond) {
            let m = shape_as_matrix(&leaf.shape);
            seen.insert(branch(
                f.ql.rank() == 2,
                f.qr.rank() == 2,
                m.rows,
                m.cols,
                hessian,
            ));
            match leaf.shape.len() {
                0 => seen.insert("leaf 0-d".into()),
                1 => seen.insert("leaf vector".into()),
                2 => seen.insert("leaf matrix".into()),
                _ if m.perm.iter().enumerate().any(|(i, &p)| i != p) => {
                    seen.insert("leaf permuted".into())
                }
                _ => seen.insert("leaf reshaped".into()),
            };
        }
        let has = |k: &str| options.get(k).is_some_and(|v| !v.is_null());
        let num = |k: &str| options.get(k).and_then(Value::as_f64);
        for (flag, on) in [
            ("hessian", hessian),
            ("whitening", !hessian),
            ("momentum", num("b1") != Some(0.0)),
            ("no momentum", num("b1") == Some(0.0)),
            (
                "nesterov",
                options.get("nesterov") == Some(&Value::Bool(true)),
            ),
            ("clip", has("update_global_norm_clip")),
            (
                "1st",
                options.get("step_normalizer_order") == Some(&Value::from("1st")),
            ),
            (
                "2nd",
                options.get("step_normalizer_order") != Some(&Value::from("1st")),
            ),
            (
                "probability < 1",
                num("preconditioner_update_probability").is_some_and(|p| p < 1.0),
            ),
            ("150+ steps", case["steps"].as_u64().unwrap() >= 150),
        ] {
            if on {
                seen.insert(flag.to_string());
            }
        }
    }
    let mut missing: Vec<&str> = [
        "hessian diag/diag",
        "hessian diag/dense",
        "hessian dense/diag",
        "hessian dense/dense",
        "whitening diag/diag",
        "whitening diag/dense tall",
        "whitening dense/diag wide",
        "whitening fallback dense/dense",
        "whitening fallback diag/dense wide",
        "whitening fallback dense/diag tall",
        "leaf 0-d",
        "leaf vector",
        "leaf matrix",
        "leaf permuted",
        "leaf reshaped",
        "hessian",
        "whitening",
        "momentum",
        "no momentum",
        "nesterov",
        "clip",
        "1st",
        "2nd",
        "probability < 1",
        "150+ steps",
    ]
    .into();
    missing.retain(|k| !seen.contains(*k));
    assert!(
        missing.is_empty(),
        "not covered: {missing:?} (seen {seen:?})"
    );
}

/// One Hessian-mode step with `learning_rate 1, b1 0` on `Σ_l c_l·Σp_l²` (exact
/// Hessian-vector products `2·c_l·v`); returns the loss before and after.
fn newton_step(shapes: &[&[usize]], curvatures: &[f64]) -> (f64, f64) {
    let dev = Device::Cpu;
    let leaves: Vec<LeafSpec> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| LeafSpec::new(format!("p{i}"), s))
        .collect();
    let opt = Affine::new(
        leaves.clone(),
        AffineOptions {
            learning_rate: Schedule::Constant(1.0),
            b1: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = SeededRandom::for_step(11, 1);
    let params: Vec<Tensor> = leaves
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let n = l.shape.iter().product::<usize>();
            Tensor::arange(1f32, n as f32 + 1.0, &dev)
                .unwrap()
                .affine(1.0, i as f64)
                .unwrap()
                .reshape(l.shape.as_slice())
                .unwrap()
        })
        .collect();
    let loss = |ps: &[Tensor]| -> f64 {
        ps.iter()
            .zip(curvatures)
            .map(|(p, c)| {
                c * p
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64
            })
            .sum()
    };
    let vector: Vec<Tensor> = leaves
        .iter()
        .map(|l| rng.normal(&l.shape, &dev).unwrap())
        .collect();
    let scaled = |ts: &[Tensor]| -> Vec<Tensor> {
        ts.iter()
            .zip(curvatures)
            .map(|(t, c)| (t * (2.0 * c)).unwrap())
            .collect()
    };
    let curvature = Curvature {
        hvp: scaled(&vector),
        vector,
        update_preconditioner: true,
    };
    let state = opt.init(&params).unwrap();
    let (updates, _) = opt
        .update_with(
            &scaled(&params),
            &state,
            None,
            StepHyper::new(1.0, 1.0),
            Some(&curvature),
            &mut rng,
        )
        .unwrap();
    let next = psgd::apply_updates(&params, &updates).unwrap();
    (loss(&params), loss(&next))
}

#[test]
fn one_hessian_step_solves_the_readme_quadratic() {
    // both factors start at the square root of (Σv²/Σ(Hv)²)^¼ times the identity, so
    // Qlᵀ·Ql ⊗ Qrᵀ·Qr = H⁻¹ and the fit's gradients vanish
    let (before, after) = newton_step(&[&[3]], &[1.0]);
    assert_eq!(before, 14.0);
    assert!(after < 1e-6, "14 -> {after}");
}

#[test]
fn the_initial_scale_is_per_leaf() {
    // curvatures 100× apart: one global scale (XMat's) could not be exact for all three
    let (before, after) = newton_step(&[&[], &[2, 3], &[2, 8, 2]], &[0.1, 1.0, 10.0]);
    assert!(before > 1e5, "{before}");
    assert!(after < 1e-6, "{before} -> {after}");
}

fn skewed_affine(max_skew: usize) -> Affine {
    let leaves = vec![
        LeafSpec::new("tall", &[12, 3]),
        LeafSpec::new("wide", &[3, 12]),
        LeafSpec::new("s", &[]),
        LeafSpec::new("t", &[2, 8, 2]),
    ];
    Affine::new(
        leaves,
        AffineOptions {
            learning_rate: Schedule::Constant(0.1),
            max_skew_triangular: max_skew,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn state_bytes_round_trip_and_are_checked() {
    let dev = Device::Cpu;
    let opt = skewed_affine(2);
    let params: Vec<Tensor> = opt
        .leaves()
        .iter()
        .map(|l| {
            let n = l.shape.iter().product::<usize>();
            Tensor::arange(0f32, n as f32, &dev)
                .unwrap()
                .affine(0.1, -0.4)
                .unwrap()
                .reshape(l.shape.as_slice())
                .unwrap()
        })
        .collect();
    let mut state = opt.init(&params).unwrap();
    for _ in 0..3 {
        state = opt.update(&params, &state, Some(&params)).unwrap().1;
    }
    let bytes = opt.state_to_bytes(&state).unwrap();

    // the factors are stored per leaf index, diagonal ones as vectors
    let stored = candle_core::safetensors::load_buffer(&bytes, &dev).unwrap();
    let dims = |k: &str| stored.get(k).map(|t| t.dims().to_vec());
    for (k, want) in [
        ("Ql.0", vec![12]),
        ("Qr.0", vec![3, 3]),
        ("Ql.1", vec![3, 3]),
        ("Qr.1", vec![12]),
        ("Ql.2", vec![1]),
        ("Qr.2", vec![1]),
        ("Ql.3", vec![4, 4]),
        ("Qr.3", vec![8, 8]),
    ] {
        assert_eq!(dims(k), Some(want), "{k}");
    }

    let loaded = opt.state_from_bytes(&bytes, &dev).unwrap();
    assert_eq!(opt.state_to_bytes(&loaded).unwrap(), bytes);
    let next = |s| -> Vec<Vec<f32>> {
        opt.update(&params, s, Some(&params))
            .unwrap()
            .0
            .iter()
            .map(|u| u.flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    assert_eq!(next(&state), next(&loaded));

    // with the default skew limit the tall and wide leaves get two triangular factors
    let err = skewed_affine(128)
        .state_from_bytes(&bytes, &dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tall") && err.contains("[12]"), "{err}");
}

#[test]
fn shape_as_matrix_matches_psgd_jax() {
    // (shape, permutation, rows, cols) as psgd-jax 0.2.9's `_shape_as_matrix` returns them
    let identity = |n: usize| (0..n).collect::<Vec<_>>();
    let cases: Vec<(Vec<usize>, Vec<usize>, usize, usize)> = vec![
        (vec![], vec![], 1, 1),
        (vec![7], vec![0], 1, 7),
        (vec![4, 3], vec![0, 1], 4, 3),
        (vec![1, 9], vec![0, 1], 1, 9),
        (vec![2, 8, 2], vec![0, 2, 1], 4, 8),
        // 12|5 ties with 5|12 of the permutation (2, 0, 1); the first one found wins
        (vec![3, 4, 5], identity(3), 12, 5),
        (vec![2, 3, 4, 5], vec![0, 3, 1, 2], 10, 12),
        (vec![2, 6, 3, 1], vec![0, 2, 1, 3], 6, 6),
        (vec![5, 1, 5], identity(3), 5, 5),
        (vec![1, 1, 6], identity(3), 1, 6),
        (vec![2, 2, 2], identity(3), 2, 4),
        (vec![6, 2, 3], identity(3), 6, 6),
        (vec![4, 1, 2, 8], identity(4), 8, 8),
    ];
    for (shape, perm, rows, cols) in cases {
        let m = shape_as_matrix(&shape);
        assert_eq!(
            (m.perm.clone(), m.rows, m.cols),
            (perm, rows, cols),
            "{shape:?}"
        );
        let permuted: Vec<usize> = m.perm.iter().map(|&p| shape[p]).collect();
        assert_eq!(m.permuted, permuted, "{shape:?}");
    }
}
