//! PSGD LRA ("UVd"): one global preconditioner `Q = (I + U·Vᵀ)·diag(d)` over all
//! parameters flattened into one column, low rank plus diagonal, as psgd-jax 0.2.9's
//! `low_rank_approximation` / `scale_by_lra`. `U` and `V` start random (drawn at init);
//! each fit updates `d` and then either `U` or `V` (a coin flip), and about one fit in a
//! hundred rebalances the norms of `U` and `V`.

use crate::common::{
    add_eps, concat_flat, global_init_scale, global_init_scale_host, psgd_options, split_flat,
};
use crate::error::{PsgdError, Result};
use crate::kernels::elementwise::{self, map_fold_rows, Flat};
use crate::kernels::linalg::solve_small;
use crate::kernels::precision::Precision;
use crate::limits::StateSize;
use crate::random::RandomSource;
use crate::state_io::{LoadedState, StateFile};
use crate::step::{FitInputs, Preconditioner, Psgd, PsgdState, StepNormalizer};
use crate::telemetry::FactorStats;
use crate::transform::LeafSpec;
use candle_core::{DType, Device, Tensor};

/// PSGD LRA (see the module docs).
pub type Lra = Psgd<LraPreconditioner>;
/// State of [`Lra`].
pub type LraState = PsgdState<LraFactors>;

/// psgd-jax's default rank.
const DEFAULT_RANK: usize = 10;

psgd_options! {
    /// Options of [`Lra`]: psgd-jax 0.2.9's `low_rank_approximation` arguments (camelCase
    /// in JSON), with its defaults.
    LraOptions, "lra", zero_clip_disables: false, {
        /// Rank of the low-rank part `U·Vᵀ`, at least 1. Default 10.
        uvd_rank_of_approximation: usize = DEFAULT_RANK, check |r: &usize| if *r >= 1 { Ok(()) } else { Err("must be at least 1".to_string()) };
    }
}

/// The factors of `Q = (I + U·Vᵀ)·diag(d)`.
#[derive(Debug, Clone)]
pub struct LraFactors {
    /// `(n, rank)`.
    pub u: Tensor,
    /// `(n, rank)`.
    pub v: Tensor,
    /// `(n, 1)`.
    pub d: Tensor,
}

/// The LRA preconditioner for a fixed list of leaves.
#[derive(Debug, Clone)]
pub struct LraPreconditioner {
    leaves: Vec<LeafSpec>,
    n: usize,
    rank: usize,
}

/// `(I + U·Vᵀ)·x`.
fn ip_uvt(u: &Tensor, v: &Tensor, x: &Tensor, p: Precision) -> Result<Tensor> {
    Ok((x + p.matmul(u, &p.matmul(&v.t()?, x)?)?)?)
}

/// The Frobenius norm as a 0-d tensor.
fn norm(t: &Tensor) -> Result<Tensor> {
    Ok(t.sqr()?.sum_all()?.sqrt()?)
}

/// `x · s` for a 0-d `s`.
fn scale(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(s)?)
}

/// `lr / max(x, eps)` as a 0-d tensor.
fn step_size(lr: f64, x: &Tensor) -> Result<Tensor> {
    Ok((add_eps(x)?.recip()? * lr)?)
}

impl LraPreconditioner {
    fn column(&self, ts: &[Tensor]) -> Result<Tensor> {
        Ok(concat_flat(ts)?.reshape((self.n, 1))?)
    }
}

impl Preconditioner for LraPreconditioner {
    const NAME: &'static str = "lra";
    const WHITENING_VECTOR: bool = true;
    const SHARED: bool = true;
    type Options = LraOptions;
    type State = LraFactors;

    fn new(leaves: &[LeafSpec], o: &LraOptions) -> Result<Self> {
        Ok(LraPreconditioner {
            leaves: leaves.to_vec(),
            n: leaves
                .iter()
                .map(|l| l.shape.iter().product::<usize>())
                .sum(),
            rank: o.uvd_rank_of_approximation,
        })
    }

    fn state_sizes(&self) -> Vec<StateSize> {
        vec![StateSize {
            what: format!(
                "the low-rank factors U and V ({} parameters × rank {})",
                self.n, self.rank
            ),
            option: Some("uvdRankOfApproximation"),
            // U, V and the fit's products of the same shape, and the fit's rank × rank
            // matrices (I + VᵀU, its factors, per-task partial sums)
            elems: 4 * self.n as u128 * self.rank as u128
                + self.n as u128
                + 8 * (self.rank as u128).pow(2),
        }]
    }

    fn init(&self, device: &Device, rng: &mut dyn RandomSource) -> Result<LraFactors> {
        let s = ((self.n * (self.rank + 10)) as f64).sqrt();
        let u = (rng.normal(&[self.n, self.rank], device)? / s)?;
        let v = (rng.normal(&[self.n, self.rank], device)? / s)?;
        Ok(LraFactors {
            u,
            v,
            d: Tensor::ones((self.n, 1), DType::F32, device)?,
        })
    }

    fn update(
        &self,
        st: &LraFactors,
        inputs: &FitInputs,
        rng: &mut dyn RandomSource,
    ) -> Result<LraFactors> {
        let vectors = inputs.vectors.ok_or_else(|| {
            PsgdError::State("lra: the preconditioner fit needs probe vectors".into())
        })?;
        // the host passes multiply in float32 only
        if inputs.precision == Precision::Bfloat16 {
            return self.update_tensors(st, vectors, inputs, rng);
        }
        let factors = [&st.u, &st.v, &st.d].map(std::slice::from_ref);
        // one random source, whichever path takes it
        let rng = std::cell::RefCell::new(rng);
        crate::kernels::dispatch(
            &[factors[0], factors[1], factors[2], vectors, inputs.hvps],
            |x| self.update_host(st, x, inputs, &mut **rng.borrow_mut()),
            || self.update_tensors(st, vectors, inputs, &mut **rng.borrow_mut()),
        )
    }

    fn apply(&self, st: &LraFactors, grads: &[Tensor]) -> Result<Vec<Tensor>> {
        let factors = [&st.u, &st.v, &st.d].map(std::slice::from_ref);
        let out = crate::kernels::dispatch(
            &[factors[0], factors[1], factors[2], grads],
            |x| self.apply_host(&x[0], &x[1], &x[2], &x[3], st.d.device()),
            || self.apply_tensors(st, grads),
        )?;
        split_flat(&out, &self.leaves)
    }

    fn save(&self, st: &LraFactors, f: &mut StateFile) {
        f.tensor("U".into(), &st.u);
        f.tensor("V".into(), &st.v);
        f.tensor("d".into(), &st.d);
    }

    fn load(&self, f: &mut LoadedState) -> Result<LraFactors> {
        Ok(LraFactors {
            u: f.take_typed("U")?,
            v: f.take_typed("V")?,
            d: f.take_factor("d")?,
        })
    }

    fn factor_stats(&self, st: &LraFactors) -> Result<Vec<FactorStats>> {
        FactorStats::whole_tree(&st.d, None)
    }

    /// The condition estimate of its diagonal `d`, and whether `U` and `V` are finite.
    fn conditions(&self, st: &LraFactors) -> Result<Vec<f64>> {
        let estimates = vec![
            crate::guard::diag_condition(&st.d.flatten_all()?, false)?,
            crate::guard::finite_probe(&st.u)?,
            crate::guard::finite_probe(&st.v)?,
        ];
        crate::common::shared_conditions(estimates, self.leaves.len())
    }

    fn take_leaves(&self, st: LraFactors, from: &LraFactors, which: &[bool]) -> Result<LraFactors> {
        Ok(crate::common::take_shared(st, from, which))
    }

    fn check(&self, st: &LraFactors) -> Result<()> {
        for (name, t, want) in [
            ("U", &st.u, [self.n, self.rank]),
            ("V", &st.v, [self.n, self.rank]),
            ("d", &st.d, [self.n, 1]),
        ] {
            if t.dims() != want {
                return Err(PsgdError::State(format!(
                    "lra factor '{name}' has shape {:?}, expected {want:?}",
                    t.dims()
                )));
            }
        }
        Ok(())
    }
}

impl LraPreconditioner {
    /// The fit on host data: three passes over the rows of `U` and `V` for the products
    /// the fit needs (each pass needs the previous one's sums), then one that writes the
    /// new `d` and the factor this step updates. Per element the arithmetic is the
    /// candle-op path's; sums over rows are accumulated in float32 within a task and in
    /// float64 across tasks.
    fn update_host(
        &self,
        st: &LraFactors,
        x: &[Flat],
        inputs: &FitInputs,
        rng: &mut dyn RandomSource,
    ) -> Result<LraFactors> {
        let (n, r) = (self.n, self.rank);
        let (d, v, h) = (&x[2], &x[3], &x[4]);
        let lr = inputs.precond_lr as f32;
        let dev = st.d.device();
        let s = if inputs.first {
            global_init_scale_host(inputs, Some(v), h)
        } else {
            1.0
        };
        // keeps the dynamic ranges of U and V alike; psgd-jax draws this first
        let balanced = if rng.uniform()? < 0.01 {
            let norm = |x: &Flat| (elementwise::sum_sq(x) as f32).sqrt();
            let rho = (norm(&x[0]) / norm(&x[1])).sqrt();
            let [u, vv] = elementwise::map_rows(n, [r, r], |rows, [u, vv]| {
                let mut sc = Default::default();
                let [u0, v0] = elementwise::gather_rows(&[&x[0], &x[1]], [r, r], rows, &mut sc);
                for (o, &i) in u.iter_mut().zip(u0) {
                    *o = i / rho;
                }
                for (o, &i) in vv.iter_mut().zip(v0) {
                    *o = i * rho;
                }
            });
            Some((u, vv))
        } else {
            None
        };
        let (u, vv) = match &balanced {
            Some((u, vv)) => (Flat::from(u.as_slice()), Flat::from(vv.as_slice())),
            None => (x[0].clone(), x[1].clone()),
        };
        let ins = [&u, &vv, d, v, h];
        let widths = [r, r, 1, 1, 1];
        let small = |x: Vec<f32>, rows: usize| {
            let cols = x.len() / rows;
            Tensor::from_vec(x, (rows, cols), dev)
        };

        // VᵀU, Vᵀ(d·h) for Q·h, Uᵀ(v/d) for Q⁻ᵀ·v
        let (_, sums) = map_fold_rows(
            n,
            [],
            vec![0.0; r * r + 2 * r],
            |rows, []| {
                let mut sc = Default::default();
                let [u, vv, d, v, h] = elementwise::gather_rows(&ins, widths, rows, &mut sc);
                let mut acc = vec![0f32; r * r + 2 * r];
                let (vtu, rest) = acc.split_at_mut(r * r);
                let (vt_dh, ut_iq) = rest.split_at_mut(r);
                let (mut dh, mut iq) = (vec![0f32; d.len()], vec![0f32; d.len()]);
                for k in 0..d.len() {
                    let dk = d[k] * s;
                    (dh[k], iq[k]) = (dk * h[k], v[k] / dk);
                }
                gram_add(vtu, vv, r, u, r);
                gram_add(vt_dh, &dh, 1, vv, r);
                gram_add(ut_iq, &iq, 1, u, r);
                widen(&acc)
            },
            add,
        );
        let mut sums = narrow(&sums);
        let (mut ip_vtu, rest) = (sums.drain(..r * r).collect::<Vec<_>>(), sums);
        for k in 0..r {
            ip_vtu[k * r + k] += 1.0;
        }
        let (vt_dh, ut_iq) = rest.split_at(r);
        let ip = small(ip_vtu.clone(), r)?;
        let u_solve = solve_small(&ip.t()?, &small(ut_iq.to_vec(), r)?)?;
        let u_solve = u_solve.flatten_all()?.to_vec1::<f32>()?;

        // a = Q·h and b = Q⁻ᵀ·v, with their products with U and V and their norms
        let ([qh, iq], sums) = map_fold_rows(
            n,
            [1, 1],
            vec![0.0; 4 * r + 3],
            |rows, [qh, iq]| {
                let mut sc = Default::default();
                let [u, vv, d, v, h] = elementwise::gather_rows(&ins, widths, rows, &mut sc);
                let mut acc = vec![0f32; 4 * r + 3];
                let (proj, norms) = acc.split_at_mut(4 * r);
                // a and b side by side, for their products with U and V
                let mut ab = vec![0f32; 2 * d.len()];
                let rows = u.chunks_exact(r).zip(vv.chunks_exact(r));
                for (k, ((ui, vi), abk)) in rows.zip(ab.chunks_exact_mut(2)).enumerate() {
                    let dk = d[k] * s;
                    let a = dk * h[k] + dot(ui, vt_dh);
                    let b = v[k] / dk - dot(vi, &u_solve);
                    (qh[k], iq[k]) = (a, b);
                    (abk[0], abk[1]) = (a, b);
                    norms[0] += a * a;
                    norms[1] += b * b;
                    norms[2] += a * b;
                }
                let (ut_ab, vt_ab) = proj.split_at_mut(2 * r);
                gram_add(ut_ab, &ab, 2, u, r);
                gram_add(vt_ab, &ab, 2, vv, r);
                widen(&acc)
            },
            add,
        );
        let sums = narrow(&sums);
        let [ut_a, ut_b, vt_a, vt_b] = [0, 1, 2, 3].map(|k| &sums[k * r..(k + 1) * r]);
        let [aa, bb, ab] = [sums[4 * r], sums[4 * r + 1], sums[4 * r + 2]];
        let v_solve = solve_small(&ip, &small(vt_b.to_vec(), r)?)?;
        let v_solve = v_solve.flatten_all()?.to_vec1::<f32>()?;
        let update_u = rng.uniform()? < 0.5;
        // the branch's factor products: U's step needs aᵀV, bᵀV; V's needs aᵀU, bᵀU
        let (pa, pb) = if update_u { (vt_a, vt_b) } else { (ut_a, ut_b) };

        // ∇d with its step size, and the norms of the branch's step
        let (qh, iq) = (Flat::from(qh.as_slice()), Flat::from(iq.as_slice()));
        let ins = [&u, &vv, d, v, h, &qh, &iq];
        let widths = [r, r, 1, 1, 1, 1, 1];
        let second = inputs.normalizer == StepNormalizer::Second;
        let extreme = if second { f32::INFINITY } else { 0.0 };
        let ([nabla_d], (sums, extreme)) = map_fold_rows(
            n,
            [1],
            (vec![0.0; 3], extreme),
            |rows, [nabla_d]| {
                let mut sc = Default::default();
                let [u, vv, d, v, h, qh, iq] =
                    elementwise::gather_rows(&ins, widths, rows, &mut sc);
                let (mut acc, mut ext) = ([0f32; 3], extreme);
                for (k, (ui, vi)) in u.chunks_exact(r).zip(vv.chunks_exact(r)).enumerate() {
                    let dk = d[k] * s;
                    let ph = dk * (qh[k] + dot(vi, ut_a));
                    let inv_pv = (iq[k] - dot(ui, &v_solve)) / dk;
                    let nd = ph * h[k] - v[k] * inv_pv;
                    nabla_d[k] = nd;
                    ext = if second {
                        // two separate rsqrts, as the reference, to avoid underflow
                        let r1 = 1.0 / (ph * ph + v[k] * v[k]).max(1e-25).sqrt();
                        let r2 = 1.0 / (h[k] * h[k] + inv_pv * inv_pv).max(1e-25).sqrt();
                        ext.min(r1 * r2)
                    } else {
                        ext.max(nd.abs())
                    };
                    let f = if update_u { vi } else { ui };
                    let (xa, xb) = (dot(f, pa), dot(f, pb));
                    acc[0] += xa * xa;
                    acc[1] += xb * xb;
                    acc[2] += xa * xb;
                }
                (widen(&acc), ext)
            },
            |(s, e), (s2, e2)| (add(s, s2), if second { e.min(e2) } else { e.max(e2) }),
        );
        let step = |x: f32| (1.0 / x.max(1e-25)) * lr;
        let mu_d = if second { extreme * lr } else { step(extreme) };
        let [xx, yy, xy] = [sums[0] as f32, sums[1] as f32, sums[2] as f32];
        let mu = if second {
            step(aa.sqrt() * xx.sqrt() + bb.sqrt() * yy.sqrt())
        } else {
            step(((aa * xx + bb * yy) - (ab * xy) * 2.0).abs().sqrt())
        };

        // U -= μ·(a·(aᵀV)(I + VᵀU) − b·(bᵀV)(I + VᵀU)), or
        // V -= μ·((a + V·Uᵀa)·aᵀU − (b + V·Uᵀb)·bᵀU)
        let times_ip = |p: &[f32]| -> Vec<f32> {
            (0..r)
                .map(|c| (0..r).map(|k| p[k] * ip_vtu[k * r + c]).sum())
                .collect()
        };
        let (pa_ip, pb_ip) = (times_ip(pa), times_ip(pb));
        let nabla_d = Flat::from(nabla_d.as_slice());
        let ins = [if update_u { &u } else { &vv }, d, &qh, &iq, &nabla_d];
        let [d_new, f_new] = elementwise::map_rows(n, [1, r], |rows, [d_new, f_new]| {
            let mut sc = Default::default();
            let [f, d, qh, iq, nd] = elementwise::gather_rows(&ins, [r, 1, 1, 1, 1], rows, &mut sc);
            let rows = f.chunks_exact(r).zip(f_new.chunks_exact_mut(r));
            for (k, (fi, fo)) in rows.enumerate() {
                let dk = d[k] * s;
                d_new[k] = dk - (dk * nd[k]) * mu_d;
                if update_u {
                    for c in 0..r {
                        fo[c] = fi[c] - (qh[k] * pa_ip[c] - iq[k] * pb_ip[c]) * mu;
                    }
                } else {
                    let (a, b) = (qh[k] + dot(fi, pa), iq[k] + dot(fi, pb));
                    for c in 0..r {
                        fo[c] = fi[c] - (a * pa[c] - b * pb[c]) * mu;
                    }
                }
            }
        });
        let f_new = Tensor::from_vec(f_new, (n, r), dev)?;
        let kept = match balanced {
            Some((u, vv)) => Tensor::from_vec(if update_u { vv } else { u }, (n, r), dev)?,
            None if update_u => st.v.clone(),
            None => st.u.clone(),
        };
        let (u, v) = if update_u {
            (f_new, kept)
        } else {
            (kept, f_new)
        };
        Ok(LraFactors {
            u,
            v,
            d: Tensor::from_vec(d_new, (n, 1), dev)?,
        })
    }

    /// `P·g` on host data, as one flat vector: `Vᵀ(d·g)`, then `q = d·g + U·Vᵀ(d·g)`
    /// with `Uᵀq`, then `d·(q + V·Uᵀq)`, one pass each.
    fn apply_host(&self, u: &Flat, vv: &Flat, d: &Flat, g: &Flat, dev: &Device) -> Result<Tensor> {
        let (n, r) = (self.n, self.rank);
        let ins = [u, vv, d, g];
        let widths = [r, r, 1, 1];
        let (_, vt_dg) = map_fold_rows(
            n,
            [],
            vec![0.0; r],
            |rows, []| {
                let mut sc = Default::default();
                let [_, vv, d, g] = elementwise::gather_rows(&ins, widths, rows, &mut sc);
                let dg: Vec<f32> = d.iter().zip(g).map(|(d, g)| d * g).collect();
                let mut acc = vec![0f32; r];
                gram_add(&mut acc, &dg, 1, vv, r);
                widen(&acc)
            },
            add,
        );
        let vt_dg = narrow(&vt_dg);
        let ([q], ut_q) = map_fold_rows(
            n,
            [1],
            vec![0.0; r],
            |rows, [q]| {
                let mut sc = Default::default();
                let [u, _, d, g] = elementwise::gather_rows(&ins, widths, rows, &mut sc);
                for (k, ui) in u.chunks_exact(r).enumerate() {
                    q[k] = d[k] * g[k] + dot(ui, &vt_dg);
                }
                let mut acc = vec![0f32; r];
                gram_add(&mut acc, q, 1, u, r);
                widen(&acc)
            },
            add,
        );
        let ut_q = narrow(&ut_q);
        let q = Flat::from(q.as_slice());
        let ins = [vv, d, &q];
        let [out] = elementwise::map_rows(n, [1], |rows, [out]| {
            let mut sc = Default::default();
            let [vv, d, q] = elementwise::gather_rows(&ins, [r, 1, 1], rows, &mut sc);
            for (k, vi) in vv.chunks_exact(r).enumerate() {
                out[k] = d[k] * (q[k] + dot(vi, &ut_q));
            }
        });
        Ok(Tensor::from_vec(out, n, dev)?)
    }

    /// The fit as candle ops, for tensors [`elementwise`] does not handle and for
    /// bfloat16 products.
    fn update_tensors(
        &self,
        st: &LraFactors,
        vectors: &[Tensor],
        inputs: &FitInputs,
        rng: &mut dyn RandomSource,
    ) -> Result<LraFactors> {
        let p = inputs.precision;
        let lr = inputs.precond_lr;
        let v = self.column(vectors)?;
        let h = self.column(inputs.hvps)?;
        let mut d = st.d.clone();
        if inputs.first {
            d = scale(&d, &global_init_scale(inputs, Some(&v), &h)?)?;
        }
        let (mut u, mut vv) = (st.u.clone(), st.v.clone());
        // keeps the dynamic ranges of U and V alike; psgd-jax draws this first
        if rng.uniform()? < 0.01 {
            let rho = (norm(&u)? / norm(&vv)?)?.sqrt()?;
            u = u.broadcast_div(&rho)?;
            vv = vv.broadcast_mul(&rho)?;
        }

        let qh = ip_uvt(&u, &vv, &(&d * &h)?, p)?;
        let ph = (&d * ip_uvt(&vv, &u, &qh, p)?)?;
        let ip_vtu = (Tensor::eye(self.rank, DType::F32, u.device())? + p.matmul(&vv.t()?, &u)?)?;
        let inv_qtv = (&v / &d)?;
        let u_solve = solve_small(&ip_vtu.t()?, &p.matmul(&u.t()?, &inv_qtv)?)?;
        let inv_qtv = (&inv_qtv - p.matmul(&vv, &u_solve)?)?;
        let v_solve = solve_small(&ip_vtu, &p.matmul(&vv.t()?, &inv_qtv)?)?;
        let inv_pv = ((&inv_qtv - p.matmul(&u, &v_solve)?)? / &d)?;

        let nabla_d = ((&ph * &h)? - (&v * &inv_pv)?)?;
        let mu = match inputs.normalizer {
            StepNormalizer::Second => {
                // two separate rsqrts, as the reference, to avoid underflow
                let r1 = add_eps(&(ph.sqr()? + v.sqr()?)?)?.sqrt()?.recip()?;
                let r2 = add_eps(&(h.sqr()? + inv_pv.sqr()?)?)?.sqrt()?.recip()?;
                ((r1 * r2)?.flatten_all()?.min(0)? * lr)?
            }
            StepNormalizer::First => step_size(lr, &nabla_d.abs()?.flatten_all()?.max(0)?)?,
        };
        let d = (&d - scale(&(&d * &nabla_d)?, &mu)?)?;

        let (a, b) = (&qh, &inv_qtv);
        let dot = |x: &Tensor, y: &Tensor| -> Result<Tensor> {
            Ok(p.matmul(&x.t()?, y)?.squeeze(1)?.squeeze(0)?)
        };
        if rng.uniform()? < 0.5 {
            let atv = p.matmul(&a.t()?, &vv)?;
            let btv = p.matmul(&b.t()?, &vv)?;
            let atvvt = p.matmul(&atv, &vv.t()?)?;
            let btvvt = p.matmul(&btv, &vv.t()?)?;
            let mu = match inputs.normalizer {
                StepNormalizer::Second => step_size(
                    lr,
                    &((norm(a)? * norm(&atvvt)?)? + (norm(b)? * norm(&btvvt)?)?)?,
                )?,
                StepNormalizer::First => {
                    let row = |x: &Tensor, y: &Tensor| dot(&x.t()?, &y.t()?);
                    let n2 = (((dot(a, a)? * row(&atvvt, &atvvt)?)?
                        + (dot(b, b)? * row(&btvvt, &btvvt)?)?)?
                        - ((dot(a, b)? * row(&atvvt, &btvvt)?)? * 2.0)?)?;
                    step_size(lr, &n2.abs()?.sqrt()?)?
                }
            };
            let delta = (p.matmul(a, &p.matmul(&atv, &ip_vtu)?)?
                - p.matmul(b, &p.matmul(&btv, &ip_vtu)?)?)?;
            u = (&u - scale(&delta, &mu)?)?;
        } else {
            let atu = p.matmul(&a.t()?, &u)?;
            let btu = p.matmul(&b.t()?, &u)?;
            let uuta = p.matmul(&u, &atu.t()?)?;
            let uutb = p.matmul(&u, &btu.t()?)?;
            let mu = match inputs.normalizer {
                StepNormalizer::Second => step_size(
                    lr,
                    &((norm(a)? * norm(&uuta)?)? + (norm(b)? * norm(&uutb)?)?)?,
                )?,
                StepNormalizer::First => {
                    let n2 = (((dot(&uuta, &uuta)? * dot(a, a)?)?
                        + (dot(&uutb, &uutb)? * dot(b, b)?)?)?
                        - ((dot(&uuta, &uutb)? * dot(a, b)?)? * 2.0)?)?;
                    step_size(lr, &n2.abs()?.sqrt()?)?
                }
            };
            let left = p.matmul(&(a + p.matmul(&vv, &atu.t()?)?)?, &atu)?;
            let right = p.matmul(&(b + p.matmul(&vv, &btu.t()?)?)?, &btu)?;
            vv = (&vv - scale(&(left - right)?, &mu)?)?;
        }
        Ok(LraFactors { u, v: vv, d })
    }

    /// `P·g` as candle ops, as one flat vector.
    fn apply_tensors(&self, st: &LraFactors, grads: &[Tensor]) -> Result<Tensor> {
        // outside the fit psgd-jax uses the default (float32 on CPU) matmul precision
        let p = Precision::Float32;
        let g = self.column(grads)?;
        let g = ip_uvt(&st.u, &st.v, &(&st.d * &g)?, p)?;
        let out = (&st.d * ip_uvt(&st.v, &st.u, &g, p)?)?;
        Ok(out.flatten_all()?)
    }
}

/// `g += xᵀy` for blocks of rows `x` of `m` elements and `y` of `r` (`g` is `m × r`,
/// row-major): every sum over rows the passes need (`VᵀU`, and the products of U and V
/// with one or two vectors).
fn gram_add(g: &mut [f32], x: &[f32], m: usize, y: &[f32], r: usize) {
    if r == DEFAULT_RANK {
        gram_add_tiled::<DEFAULT_RANK>(g, x, m, y);
        return;
    }
    for (xi, yi) in x.chunks_exact(m).zip(y.chunks_exact(r)) {
        for (row, &xa) in g.chunks_exact_mut(r).zip(xi) {
            axpy(row, xa, yi);
        }
    }
}

/// Columns of a row in [`gram_add_tiled`]: `R` padded to whole 4-lane vectors.
const TILE_COLS: usize = 12;

/// [`gram_add`] for `R ≤ 12`, in tiles of up to four rows of `g`, each swept over a run
/// of rows with its sums in registers. Accumulating all of a `g` of ten rows at once goes
/// through memory at every row, which made `VᵀU` most of the fit's arithmetic.
fn gram_add_tiled<const R: usize>(g: &mut [f32], x: &[f32], m: usize, y: &[f32]) {
    const RUN: usize = 256;
    const { assert!(R <= TILE_COLS) };
    for (xs, ys) in x.chunks(RUN * m).zip(y.chunks(RUN * R)) {
        let mut a0 = 0;
        while a0 + 4 <= m {
            gram_tile::<R, 4>(g, a0, xs, m, ys);
            a0 += 4;
        }
        match m - a0 {
            1 => gram_tile::<R, 1>(g, a0, xs, m, ys),
            2 => gram_tile::<R, 2>(g, a0, xs, m, ys),
            3 => gram_tile::<R, 3>(g, a0, xs, m, ys),
            _ => {}
        }
    }
}

/// Rows `a0..a0 + A` of [`gram_add_tiled`].
#[inline(always)]
fn gram_tile<const R: usize, const A: usize>(
    g: &mut [f32],
    a0: usize,
    x: &[f32],
    m: usize,
    y: &[f32],
) {
    let mut tile = [[0f32; TILE_COLS]; A];
    for (xi, yi) in x.chunks_exact(m).zip(y.chunks_exact(R)) {
        let mut yp = [0f32; TILE_COLS];
        yp[..R].copy_from_slice(yi);
        for (t, &xa) in tile.iter_mut().zip(&xi[a0..a0 + A]) {
            for (t, &yb) in t.iter_mut().zip(&yp) {
                *t += xa * yb;
            }
        }
    }
    for (a, t) in tile.iter().enumerate() {
        for (o, &v) in g[(a0 + a) * R..][..R].iter_mut().zip(t) {
            *o += v;
        }
    }
}

/// `acc += a·x`.
#[inline(always)]
fn axpy(acc: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in acc.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `x·y`, in four interleaved partial sums, so that a row's product is not one chain of
/// dependent additions. Inlined, like [`axpy`], into the per-row loops.
#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let (xs, ys) = (x.chunks_exact(4), y.chunks_exact(4));
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(a, b)| a * b)
        .sum();
    let mut acc = [0f32; 4];
    for (a, b) in xs.zip(ys) {
        for l in 0..4 {
            acc[l] += a[l] * b[l];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// A task's float32 sums, to be added across tasks in float64.
fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Sums added across tasks, back in float32.
fn narrow(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Elementwise `x + y`.
fn add(mut x: Vec<f64>, y: Vec<f64>) -> Vec<f64> {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::{Draw, ReplayRandom, SeededRandom};

    fn max_rel_diff(x: &Tensor, y: &Tensor) -> f32 {
        let max = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f32>();
        max(&(x - y).unwrap()).unwrap() / max(y).unwrap().max(1e-30)
    }

    fn randn(rng: &mut SeededRandom, shape: &[usize], mean: f64, std: f64) -> Tensor {
        let t = rng.normal(shape, &Device::Cpu).unwrap();
        ((t * std).unwrap() + mean).unwrap()
    }

    /// The host passes against the candle-op path, on leaves that span several parallel
    /// tasks, for both branches, with and without the rebalancing.
    #[test]
    fn host_passes_match_the_candle_ops() {
        let leaves = [vec![7], vec![129, 257], vec![3, 5], vec![]]
            .iter()
            .enumerate()
            .map(|(i, s)| LeafSpec::new(format!("l{i}"), s))
            .collect::<Vec<_>>();
        let mut rng = SeededRandom::for_step(7, 1);
        let mut leafwise = || -> Vec<Tensor> {
            leaves
                .iter()
                .map(|l| randn(&mut rng, &l.shape, 0.0, 1.0))
                .collect()
        };
        let (v, h) = (leafwise(), leafwise());
        for rank in [3, 10] {
            let p = LraPreconditioner::new(
                &leaves,
                &LraOptions {
                    uvd_rank_of_approximation: rank,
                    ..Default::default()
                },
            )
            .unwrap();
            let st = LraFactors {
                u: randn(&mut rng, &[p.n, rank], 0.0, 0.01),
                v: randn(&mut rng, &[p.n, rank], 0.0, 0.01),
                d: randn(&mut rng, &[p.n, 1], 1.0, 0.1),
            };
            for (k, normalizer) in [StepNormalizer::Second, StepNormalizer::First]
                .into_iter()
                .enumerate()
            {
                for (balance, branch) in [(0.5, 0.2), (0.005, 0.7), (0.5, 0.7), (0.005, 0.2)] {
                    let inputs = FitInputs {
                        vectors: Some(&v),
                        hvps: &h,
                        hessian: k == 0,
                        first: branch < 0.5,
                        count: 0,
                        precond_lr: 0.1,
                        init_scale: None,
                        normalizer,
                        precision: Precision::Float32,
                    };
                    let draws = || {
                        let draws = vec![Draw::Uniform(balance), Draw::Uniform(branch)];
                        ReplayRandom::new("test", draws)
                    };
                    let host = p.update(&st, &inputs, &mut draws()).unwrap();
                    let ops = p.update_tensors(&st, &v, &inputs, &mut draws()).unwrap();
                    for (x, y) in [(&host.u, &ops.u), (&host.v, &ops.v), (&host.d, &ops.d)] {
                        assert_eq!(x.dims(), y.dims());
                        let e = max_rel_diff(x, y);
                        assert!(
                            e < 1e-5,
                            "rank {rank} {normalizer:?} {balance} {branch}: {e}"
                        );
                    }
                }
            }
            let host = p.apply(&st, &h).unwrap();
            let ops = p.apply_tensors(&st, &h).unwrap();
            let dims = |ts: &[Tensor]| ts.iter().map(|t| t.dims().to_vec()).collect::<Vec<_>>();
            assert_eq!(dims(&host), dims(&split_flat(&ops, &leaves).unwrap()));
            let e = max_rel_diff(&concat_flat(&host).unwrap(), &ops);
            assert!(e < 1e-5, "rank {rank}: {e}");
        }
    }
}
