//! Kron's dimension merging and blocks (`mergeDims`, `targetMergedDimSize`, `blockSize`):
//! a blocked leaf fits as its blocks would alone, every update rule runs on merged and
//! blocked (and scanned) leaves, states follow the layout and refuse another one, and the
//! state size is reported from the real factor shapes before anything is allocated.

use candle_core::{DType, Device, Tensor};
use psgd::kron::{kron_state_size, MergeDims};
use psgd::options::Choice;
use psgd::{
    Kron, KronOptions, LeafSpec, Preconditioner, RandomSource, Schedule, SeededRandom, Transform,
    UpdateRule,
};

/// Every update rule, once each (aliases dropped).
fn rules() -> Vec<UpdateRule> {
    let mut out: Vec<UpdateRule> = vec![];
    for (_, r) in UpdateRule::CHOICES {
        if !out.contains(r) {
            out.push(*r);
        }
    }
    out
}

fn options(rule: UpdateRule) -> KronOptions {
    KronOptions {
        update_rule: rule,
        preconditioner_update_probability: Some(Schedule::Constant(1.0)),
        ..Default::default()
    }
}

/// Draws that depend on nothing but the count of values asked for: a leaf's blocks get the
/// same numbers whether drawn as one stacked part or as leaves of their own.
struct Constant;

impl RandomSource for Constant {
    fn uniform(&mut self) -> psgd::Result<f32> {
        Ok(0.5)
    }
    fn normal(&mut self, shape: &[usize], device: &Device) -> psgd::Result<Tensor> {
        Ok(Tensor::full(0.75f32, shape, device)?)
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1e-30f32, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

/// A gradient of `shape` for step `k`.
fn grad(shape: &[usize], k: u64) -> Tensor {
    SeededRandom::for_step(k, 3)
        .normal(shape, &Device::Cpu)
        .unwrap()
}

/// An `[8, 6]` leaf cut into blocks of 3 (`3×3` four times, `2×3` twice) fits each block
/// exactly as a leaf of the block's shape alone does, under every rule: the blocks are not
/// padded, so nothing of one block reaches another.
#[test]
fn a_blocked_leaf_fits_as_its_blocks_alone() {
    let dev = Device::Cpu;
    let rows = [(0, 3), (3, 3), (6, 2)];
    let cols = [(0, 3), (3, 3)];
    for rule in rules() {
        let blocked = Kron::new(
            vec![LeafSpec::new("w", &[8, 6])],
            KronOptions {
                block_size: Some(3),
                b1: 0.0,
                ..options(rule)
            },
        )
        .unwrap();
        let mut alone_leaves = vec![];
        for (r, (_, h)) in rows.iter().enumerate() {
            for (c, (_, w)) in cols.iter().enumerate() {
                alone_leaves.push(LeafSpec::new(format!("b{r}{c}"), &[*h, *w]));
            }
        }
        let alone = Kron::new(
            alone_leaves.clone(),
            KronOptions {
                b1: 0.0,
                ..options(rule)
            },
        )
        .unwrap();
        let params = vec![Tensor::zeros((8, 6), DType::F32, &dev).unwrap()];
        let params_alone: Vec<Tensor> = alone_leaves
            .iter()
            .map(|l| Tensor::zeros(l.shape.as_slice(), DType::F32, &dev).unwrap())
            .collect();
        let (mut sb, mut sa) = (
            blocked.init(&params).unwrap(),
            alone.init(&params_alone).unwrap(),
        );
        for k in 0..4 {
            let g = grad(&[8, 6], k);
            let pieces: Vec<Tensor> = rows
                .iter()
                .flat_map(|&(r0, h)| {
                    let g = g.clone();
                    cols.iter()
                        .map(move |&(c0, w)| g.narrow(0, r0, h).unwrap().narrow(1, c0, w).unwrap())
                })
                .collect();
            let (ub, nb) = blocked
                .update_with(
                    std::slice::from_ref(&g),
                    &sb,
                    None,
                    blocked.hyper(&sb),
                    None,
                    &mut Constant,
                )
                .unwrap();
            let (ua, na) = alone
                .update_with(&pieces, &sa, None, alone.hyper(&sa), None, &mut Constant)
                .unwrap();
            (sb, sa) = (nb, na);
            // the blocks' factors: part 0 stacks blocks 00, 01, 10, 11 (3×3), part 1
            // blocks 20, 21 (2×3)
            let stacked = [(0, [0, 1, 2, 3].as_slice()), (1, [4, 5].as_slice())];
            for (part, blocks) in stacked {
                for (i, q) in sb.precond.qs[part].iter().enumerate() {
                    for (j, &b) in blocks.iter().enumerate() {
                        let mine = values(&q.get(j).unwrap());
                        let theirs = values(&sa.precond.qs[b][i]);
                        let d = rel_diff(&theirs, &mine);
                        assert!(d < 1e-5, "{rule:?} step {k} block {b} factor {i}: {d}");
                    }
                }
            }
            // before the update clip the preconditioned blocks are the blocks' own; the
            // clip acts on the whole leaf, so compare the directions block by block
            let ub = &ub[0];
            for (b, piece) in ua.iter().enumerate() {
                let (r0, h) = rows[b / 2];
                let (c0, w) = cols[b % 2];
                let mine = ub.narrow(0, r0, h).unwrap().narrow(1, c0, w).unwrap();
                let (m, t) = (values(&mine), values(piece));
                let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
                let (m, t): (Vec<f32>, Vec<f32>) = (
                    m.iter().map(|x| x / norm(&m)).collect(),
                    t.iter().map(|x| x / norm(&t)).collect(),
                );
                let d = rel_diff(&t, &m);
                assert!(d < 1e-4, "{rule:?} step {k} block {b} update: {d}");
            }
        }
    }
}

/// Blocks of 4 and of 256 give the same numbers on a `[4, 3]` leaf (neither cuts it), and
/// the same as no blocks at all.
#[test]
fn block_size_above_a_leaf_changes_nothing() {
    let dev = Device::Cpu;
    let leaves = vec![LeafSpec::new("w", &[4, 3])];
    let params = vec![Tensor::zeros((4, 3), DType::F32, &dev).unwrap()];
    for rule in rules() {
        let run = |bs: Option<usize>| {
            let kron = Kron::new(
                leaves.clone(),
                KronOptions {
                    block_size: bs,
                    ..options(rule)
                },
            )
            .unwrap();
            let mut s = kron.init(&params).unwrap();
            let mut out = vec![];
            for k in 0..3 {
                let (u, n) = kron.update(&[grad(&[4, 3], k)], &s, None).unwrap();
                out.push(values(&u[0]));
                s = n;
            }
            out.push(values(&s.precond.qs[0][1]));
            out
        };
        let (b4, b256, none) = (run(Some(4)), run(Some(256)), run(None));
        assert_eq!(b4, b256, "{rule:?}");
        assert_eq!(b4, none, "{rule:?}");
    }
}

/// Every rule runs on merged, blocked and scanned leaves (finite updates, several steps,
/// with `laxMapScannedLayers` slicing the stacked blocks), and the state round-trips
/// through its bytes to the same next step.
#[test]
fn every_rule_runs_on_merged_and_blocked_leaves() {
    let dev = Device::Cpu;
    let mut scanned = LeafSpec::new("layers", &[2, 3, 2, 5]);
    scanned.scanned = true;
    let leaves = vec![
        scanned,
        LeafSpec::new("conv", &[2, 3, 4, 5]),
        LeafSpec::new("w", &[11, 7]),
        LeafSpec::new("bias", &[9]),
        LeafSpec::new("scale", &[]),
    ];
    let params: Vec<Tensor> = leaves.iter().map(|l| grad(&l.shape, 99)).collect();
    for rule in rules() {
        for (merge, bs) in [
            (Some(MergeDims::TwoD), Some(4)),
            (Some(MergeDims::Small), Some(5)),
            (Some(MergeDims::TwoD), None),
            (None, Some(3)),
        ] {
            let o = KronOptions {
                merge_dims: merge,
                target_merged_dim_size: 16,
                block_size: bs,
                lax_map_scanned_layers: true,
                lax_map_batch_size: 2,
                preconditioner_init_scale: None,
                ..options(rule)
            };
            let kron = Kron::new(leaves.clone(), o).unwrap();
            let mut state = kron.init(&params).unwrap();
            for k in 0..3 {
                let grads: Vec<Tensor> = leaves.iter().map(|l| grad(&l.shape, k)).collect();
                let (u, s) = kron
                    .update(&grads, &state, Some(&params))
                    .unwrap_or_else(|e| panic!("{rule:?} {merge:?} {bs:?}: {e}"));
                for (t, l) in u.iter().zip(&leaves) {
                    assert_eq!(t.dims(), l.shape.as_slice());
                    assert!(values(t).iter().all(|x| x.is_finite()), "{rule:?}");
                }
                state = s;
            }
            let bytes = kron.state_to_bytes(&state).unwrap();
            let loaded = kron.state_from_bytes(&bytes, &dev).unwrap();
            let g: Vec<Tensor> = leaves.iter().map(|l| grad(&l.shape, 7)).collect();
            let (u1, _) = kron.update(&g, &state, Some(&params)).unwrap();
            let (u2, _) = kron.update(&g, &loaded, Some(&params)).unwrap();
            for (a, b) in u1.iter().zip(&u2) {
                assert_eq!(values(a), values(b), "{rule:?} {merge:?} {bs:?}");
            }
        }
    }
}

/// A state saved under one layout does not load under another: the error names the
/// options; the default layout's state files are unchanged (no layout entry).
#[test]
fn a_state_of_another_layout_is_refused() {
    let dev = Device::Cpu;
    let leaves = vec![LeafSpec::new("w", &[2, 3, 4])];
    let params = vec![Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap()];
    let make = |merge: Option<MergeDims>, bs: Option<usize>| {
        Kron::new(
            leaves.clone(),
            KronOptions {
                merge_dims: merge,
                block_size: bs,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let plain = make(None, None);
    let two_d = make(Some(MergeDims::TwoD), None);
    let blocked = make(Some(MergeDims::TwoD), Some(4));
    let bytes = |k: &Kron| k.state_to_bytes(&k.init(&params).unwrap()).unwrap();
    for (from, to) in [(&plain, &two_d), (&two_d, &plain), (&two_d, &blocked)] {
        let e = to
            .state_from_bytes(&bytes(from), &dev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("mergeDims") && e.contains("blockSize"), "{e}");
    }
    assert!(two_d.state_from_bytes(&bytes(&two_d), &dev).is_ok());
    let raw = bytes(&plain);
    assert!(!String::from_utf8_lossy(&raw).contains("kron_layout"));
    // the merged leaf's factors are those of [6, 4]
    let shapes: Vec<Vec<usize>> = two_d.init(&params).unwrap().precond.qs[0]
        .iter()
        .map(|q| q.dims().to_vec())
        .collect();
    assert_eq!(shapes, vec![vec![6, 6], vec![4, 4]]);
}

/// The size report gives the real factor shapes and bytes, without allocating; the
/// optimizer's own check before allocating counts the same shapes.
#[test]
fn state_size_follows_the_layout() {
    let mut scanned = LeafSpec::new("layers", &[3, 10, 6]);
    scanned.scanned = true;
    let leaves = vec![
        LeafSpec::new("w", &[4096, 64]),
        scanned,
        LeafSpec::new("b", &[5]),
    ];
    let plain = kron_state_size(&leaves, &KronOptions::default()).unwrap();
    assert_eq!(plain[0].factors, vec![vec![4096, 4096], vec![64, 64]]);
    assert_eq!(plain[0].bytes, 4 * (4096 * 4096 + 64 * 64));
    assert_eq!(plain[1].factors, vec![vec![3, 10, 10], vec![3, 6, 6]]);
    assert_eq!(plain[2].factors, vec![vec![5]]);
    let o = KronOptions {
        block_size: Some(256),
        ..Default::default()
    };
    let blocked = kron_state_size(&leaves, &o).unwrap();
    assert_eq!(
        blocked[0].factors,
        vec![vec![16, 256, 256], vec![16, 64, 64]]
    );
    assert_eq!(blocked[0].bytes, 4 * 16 * (256 * 256 + 64 * 64));
    let o4 = KronOptions {
        block_size: Some(4),
        update_rule: UpdateRule::Pro,
        ..Default::default()
    };
    let small = kron_state_size(&leaves[1..2], &o4).unwrap();
    // [10, 6] in blocks of 4: rows 4, 4, 2 and columns 4, 2, so 4×4 and 4×2 twice per
    // layer, 2×4 and 2×2 once, each with a factor per axis
    assert_eq!(
        small[0].factors,
        vec![
            vec![6, 4, 4],
            vec![6, 4, 4],
            vec![6, 4, 4],
            vec![6, 2, 2],
            vec![3, 2, 2],
            vec![3, 4, 4],
            vec![3, 2, 2],
            vec![3, 2, 2]
        ]
    );
    let elems: usize = small[0]
        .factors
        .iter()
        .map(|f| f.iter().product::<usize>())
        .sum();
    // the factors and a float32 bound per layer and block and factor
    assert_eq!(small[0].bytes as usize, 4 * elems + 4 * (4 * 6 + 4 * 3));
    // the optimizer's own estimate counts the same factors (dense ones with their QᵀQ)
    let kron = Kron::new(leaves.clone(), o).unwrap();
    let counted: u128 = kron
        .preconditioner()
        .state_sizes()
        .iter()
        .map(|s| s.elems)
        .sum();
    assert_eq!(
        counted,
        2 * 16 * (256 * 256 + 64 * 64) + 2 * 3 * (100 + 36) + 5
    );
    // bad options and leaves fail as the optimizer would
    let bad = KronOptions {
        block_size: Some(0),
        ..Default::default()
    };
    let e = kron_state_size(&leaves, &bad).unwrap_err().to_string();
    assert!(e.contains("blockSize"), "{e}");
    assert!(Kron::new(leaves.clone(), bad).is_err());
}
