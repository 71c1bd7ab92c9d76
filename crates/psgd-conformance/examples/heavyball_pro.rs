//! How close Kron's `'Q0.5EQ1.5'` fit gets to heavyball 3.2.1's `PSGDPRO` fit, from the
//! runs `scripts/reference/heavyball_pro.py` records (see there for the commands): each
//! recorded gradient is fitted with its recorded noise, under heavyball's numerics
//! (`normEstimator: 'power'`, `procrustesMaxStep: 0.5`, `balanceEvery: 1`,
//! `balanceWhen: 'beforeFit'`) and, for contrast, under psgd_torch's (the rule's defaults,
//! their random subspaces drawn from a seed). Prints per case and fit the largest
//! difference of `P = ⊗ QᵢᵀQᵢ` relative to its largest entry, and of the Lipschitz bounds.

use candle_core::{Device, Tensor};
use psgd::kron::{BalanceWhen, NormEstimator};
use psgd::{
    Kron, KronOptions, KronUpdateDecision, LeafSpec, RandomSource, Schedule, SeededRandom,
    Transform, UpdateRule,
};
use serde_json::Value;
use std::collections::VecDeque;

/// The recorded noise for draws of the leaf's shape; everything else from a seed.
struct Recorded {
    shape: Vec<usize>,
    noise: VecDeque<Vec<f32>>,
    rest: SeededRandom,
}

impl RandomSource for Recorded {
    fn uniform(&mut self) -> psgd::Result<f32> {
        self.rest.uniform()
    }
    fn normal(&mut self, shape: &[usize], device: &Device) -> psgd::Result<Tensor> {
        if shape == self.shape.as_slice() {
            let data = self.noise.pop_front().expect("one recorded noise per fit");
            return Ok(Tensor::from_vec(data, shape, device)?);
        }
        self.rest.normal(shape, device)
    }
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// `⊗ QᵢᵀQᵢ` in float64 (`q²` for a diagonal factor), from flat row-major factors.
fn preconditioner(qs: &[Vec<f64>], dims: &[usize]) -> Vec<f64> {
    let grams: Vec<Vec<f64>> = qs
        .iter()
        .zip(dims)
        .map(|(q, &d)| {
            if q.len() == d {
                (0..d * d)
                    .map(|k| {
                        if k / d == k % d {
                            q[k / d].powi(2)
                        } else {
                            0.0
                        }
                    })
                    .collect()
            } else {
                (0..d * d)
                    .map(|k| (0..d).map(|m| q[m * d + k / d] * q[m * d + k % d]).sum())
                    .collect()
            }
        })
        .collect();
    let mut p = vec![1.0];
    let mut n = 1;
    for (g, &d) in grams.iter().zip(dims) {
        let m = n * d;
        let mut out = vec![0.0; m * m];
        for i in 0..n {
            for j in 0..n {
                for a in 0..d {
                    for b in 0..d {
                        out[(i * d + a) * m + j * d + b] = p[i * n + j] * g[a * d + b];
                    }
                }
            }
        }
        p = out;
        n = m;
    }
    p
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("the JSON heavyball_pro.py wrote");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dev = Device::Cpu;
    for case in cases.as_array().unwrap() {
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let fits = case["fits"].as_array().unwrap();
        let base = KronOptions {
            update_rule: UpdateRule::Pro,
            preconditioner_lr: case["lr"].as_f64().unwrap(),
            lipschitz_beta: Some(case["beta"].as_f64().unwrap()),
            b1: 0.0,
            momentum_into_precond_update: false,
            preconditioner_update_probability: Some(Schedule::Constant(1.0)),
            update_decision: KronUpdateDecision::Counter,
            precond_update_precision: None,
            ..Default::default()
        };
        let heavyball = KronOptions {
            norm_estimator: Some(NormEstimator::Power),
            procrustes_max_step: 0.5,
            balance_every: Some(1),
            balance_when: Some(BalanceWhen::BeforeFit),
            ..base.clone()
        };
        for (label, o) in [("heavyball's numerics", heavyball), ("psgd_torch's", base)] {
            let leaves = vec![LeafSpec::new("w", &shape)];
            let kron = Kron::new(leaves, o).unwrap();
            let params =
                vec![Tensor::zeros(shape.as_slice(), candle_core::DType::F32, &dev).unwrap()];
            let mut state = kron.init(&params).unwrap();
            let mut rng = Recorded {
                shape: shape.clone(),
                noise: fits.iter().map(|f| floats(&f["nu"])).collect(),
                rest: SeededRandom::for_step(7, 1),
            };
            let mut line = vec![];
            for f in fits {
                let g = Tensor::from_vec(floats(&f["g"]), shape.as_slice(), &dev).unwrap();
                let hyper = kron.hyper(&state);
                state = kron
                    .update_with(&[g], &state, Some(&params), hyper, None, &mut rng)
                    .unwrap()
                    .1;
                let ours: Vec<Vec<f64>> = state.precond.qs[0]
                    .iter()
                    .map(|q| {
                        let v = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        v.iter().map(|&x| x as f64).collect()
                    })
                    .collect();
                let theirs: Vec<Vec<f64>> = f["q"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|q| floats(q).iter().map(|&x| x as f64).collect())
                    .collect();
                let (po, pt) = (
                    preconditioner(&ours, &shape),
                    preconditioner(&theirs, &shape),
                );
                let top = pt.iter().fold(0f64, |m, x| m.max(x.abs()));
                let dp = po
                    .iter()
                    .zip(&pt)
                    .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
                let dl = state.precond.ls[0]
                    .iter()
                    .zip(f["l"].as_array().unwrap())
                    .map(|(l, t)| {
                        let (a, b) = (l.to_vec1::<f32>().unwrap()[0] as f64, t.as_f64().unwrap());
                        (a - b).abs() / b
                    })
                    .fold(0f64, f64::max);
                line.push(format!("{:.1e}/{:.1e}", dp / top, dl));
            }
            println!(
                "{shape:?} {label:<21} P/L rel err per fit: {}",
                line.join(" ")
            );
        }
    }
}
