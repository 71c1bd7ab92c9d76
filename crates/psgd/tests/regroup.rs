//! `state_io::regroup`: a state for a new set of leaves from other states' per-leaf tensors.

use candle_core::{Device, Tensor};
use psgd::state_io::{regroup, LeafSource};
use psgd::{
    Affine, Kron, KronOptions, LeafSpec, Lra, Preconditioner, Psgd, Transform, UpdateRule, XMat,
};
use std::collections::HashMap;

fn tensors(bytes: &[u8]) -> HashMap<String, Vec<u8>> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect()
}

fn values(u: &[Tensor]) -> Vec<Vec<f32>> {
    u.iter()
        .map(|x| x.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// A state of `[s, t]` after three steps, moved leaf by leaf onto `[t', s']` (swapped),
/// and whole onto other names.
fn check<P: Preconditioner>(make: impl Fn(Vec<LeafSpec>) -> Psgd<P>, per_leaf_factors: bool) {
    let dev = Device::Cpu;
    let s = Tensor::new(&[0.5f32, -1.0], &dev).unwrap();
    let t = Tensor::arange(-6f32, 6., &dev)
        .unwrap()
        .reshape((3, 4))
        .unwrap();
    let old = make(vec![LeafSpec::new("s", &[2]), LeafSpec::new("t", &[3, 4])]);
    let params = vec![s.clone(), t.clone()];
    let grads: Vec<Tensor> = params.iter().map(|p| (p * 0.3).unwrap()).collect();
    let mut st = old.init(&params).unwrap();
    for _ in 0..3 {
        st = old.update(&grads, &st, Some(&params)).unwrap().1;
    }
    let saved = old.state_to_bytes(&st).unwrap();
    let was = tensors(&saved);

    // leaf by leaf, swapped, onto a new set
    let new = make(vec![
        LeafSpec::new("t2", &[3, 4]),
        LeafSpec::new("s2", &[2]),
    ]);
    let fresh = new
        .state_to_bytes(&new.init(&[t.clone(), s.clone()]).unwrap())
        .unwrap();
    let picks = [
        LeafSource {
            leaf: 0,
            source: 0,
            source_leaf: 1,
        },
        LeafSource {
            leaf: 1,
            source: 0,
            source_leaf: 0,
        },
    ];
    let bytes = regroup(&fresh, &[&saved], &picks, None, 7).unwrap();
    let moved = new.state_from_bytes(&bytes, &dev).unwrap();
    assert_eq!(Psgd::<P>::count(&moved), 7);
    let got = tensors(&bytes);
    assert_eq!(got["mu.0"], was["mu.1"]);
    assert_eq!(got["mu.1"], was["mu.0"]);
    let fresh_tensors = tensors(&fresh);
    for (name, data) in &got {
        if !name.contains('.') {
            // spanning all leaves: the new set's own, fresh
            assert_eq!(data, &fresh_tensors[name], "{name}");
        } else if per_leaf_factors {
            let (kind, rest) = name.split_once('.').unwrap();
            let (l, more) = rest.split_once('.').map_or((rest, ""), |(l, m)| (l, m));
            let from = if l == "0" { "1" } else { "0" };
            let dot = if more.is_empty() { "" } else { "." };
            assert_eq!(data, &was[&format!("{kind}.{from}{dot}{more}")], "{name}");
        }
    }

    // whole, onto other names: the next step is the one the old state takes
    let renamed = make(vec![LeafSpec::new("a", &[2]), LeafSpec::new("b", &[3, 4])]);
    let fresh = renamed
        .state_to_bytes(&renamed.init(&params).unwrap())
        .unwrap();
    let same = [0, 1].map(|l| LeafSource {
        leaf: l,
        source: 0,
        source_leaf: l,
    });
    let bytes = regroup(&fresh, &[&saved], &same, Some(0), 3).unwrap();
    let whole = renamed.state_from_bytes(&bytes, &dev).unwrap();
    let a = old.update(&grads, &st, Some(&params)).unwrap().0;
    let b = renamed.update(&grads, &whole, Some(&params)).unwrap().0;
    assert_eq!(values(&a), values(&b));

    // picks out of range, another variant's source: errors, never a state
    let bad = [LeafSource {
        leaf: 2,
        source: 0,
        source_leaf: 0,
    }];
    assert!(regroup(&fresh, &[&saved], &bad, None, 3).is_err());
    let bad = [LeafSource {
        leaf: 0,
        source: 1,
        source_leaf: 0,
    }];
    assert!(regroup(&fresh, &[&saved], &bad, None, 3).is_err());
    assert!(regroup(&fresh, &[&saved], &[], Some(0), 1 << 60).is_err());
}

#[test]
fn regroup_moves_each_leafs_state_for_every_variant() {
    check(|l| Kron::new(l, Default::default()).unwrap(), true);
    // the inverse-free rules also move each leaf's Lipschitz bounds (`L.<leaf>.<axis>`)
    for update_rule in [UpdateRule::Pro, UpdateRule::Quad] {
        let o = KronOptions {
            update_rule,
            ..Default::default()
        };
        check(|l| Kron::new(l, o.clone()).unwrap(), true);
    }
    // merged and blocked leaves: each leaf's factors (`Q.<leaf>.<k>` over its blocks) and
    // its layout move with it
    for merge_dims in [None, Some(psgd::kron::MergeDims::TwoD)] {
        let o = KronOptions {
            update_rule: UpdateRule::Pro,
            merge_dims,
            block_size: Some(2),
            ..Default::default()
        };
        check(|l| Kron::new(l, o.clone()).unwrap(), true);
    }
    check(|l| Affine::new(l, Default::default()).unwrap(), true);
    check(|l| XMat::new(l, Default::default()).unwrap(), false);
    check(|l| Lra::new(l, Default::default()).unwrap(), false);
}

#[test]
fn regroup_refuses_another_variants_state() {
    let dev = Device::Cpu;
    let p = [Tensor::new(&[1f32, 2.], &dev).unwrap()];
    let kron = Kron::new(vec![LeafSpec::new("x", &[2])], Default::default()).unwrap();
    let xmat = XMat::new(vec![LeafSpec::new("x", &[2])], Default::default()).unwrap();
    let k = kron.state_to_bytes(&kron.init(&p).unwrap()).unwrap();
    let x = xmat.state_to_bytes(&xmat.init(&p).unwrap()).unwrap();
    let pick = [LeafSource {
        leaf: 0,
        source: 0,
        source_leaf: 0,
    }];
    assert!(regroup(&k, &[&x], &pick, None, 0).is_err());
}

/// A source (or the fresh state) that this package did not write as it is, one edited
/// after it was saved, is refused: regroup never gives edited values a new checksum.
#[test]
fn regroup_refuses_a_source_whose_checksum_does_not_match() {
    let dev = Device::Cpu;
    let p = [Tensor::new(&[1f32, 2.], &dev).unwrap()];
    let kron = Kron::new(vec![LeafSpec::new("x", &[2])], Default::default()).unwrap();
    let good = kron.state_to_bytes(&kron.init(&p).unwrap()).unwrap();
    let pick = [LeafSource {
        leaf: 0,
        source: 0,
        source_leaf: 0,
    }];
    assert!(regroup(&good, &[&good], &pick, None, 0).is_ok());
    // the last byte is tensor data (the header comes first)
    let mut edited = good.clone();
    *edited.last_mut().unwrap() ^= 0x10;
    let e = regroup(&good, &[&edited], &pick, None, 0).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    assert!(regroup(&edited, &[&good], &pick, None, 0).is_err());
}
