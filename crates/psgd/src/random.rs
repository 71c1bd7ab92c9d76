//! Random draws behind a trait, so that tests can replay the reference's own draws.
//!
//! The default source is stateless across steps: the generator for a step is derived from
//! `(seed, step)`, the way psgd-jax folds its step count into a fixed key. A saved state
//! therefore needs no generator state to continue reproducibly.

use crate::error::{PsgdError, Result};
use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};
use rand_distr::StandardNormal;
use rayon::prelude::*;
use std::collections::VecDeque;

/// A source of the random arrays an optimizer step needs, in the order it asks for them.
pub trait RandomSource: Send {
    /// A scalar drawn uniformly from `[0, 1)`.
    fn uniform(&mut self) -> Result<f32>;
    /// A float32 tensor of standard normal draws with the given shape, on `device`.
    fn normal(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
    /// Moves past the normal draw [`Self::normal`] would make, without its values: a step
    /// that turns out not to need a draw still leaves the source where drawing would.
    fn skip_normal(&mut self, shape: &[usize]) -> Result<()> {
        self.normal(shape, &Device::Cpu).map(drop)
    }
}

/// The default source: a seeded generator derived from `(seed, step)`.
pub struct SeededRandom {
    rng: StdRng,
}

/// Entries per independently seeded block of a normal draw: large enough that seeding a
/// generator per block costs nothing next to filling it, small enough that a probe of a
/// few million entries spreads over all threads.
const NORMAL_BLOCK: usize = 1 << 16;

/// splitmix64's finaliser of `a` combined with `b`: nearby inputs give unrelated seeds.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256++, the generator of the normal draws' blocks: with the ziggurat it samples
/// about twice as fast as `StdRng` (ChaCha12, whose cost dominates there), and being
/// written out here its stream cannot change with a `rand` release.
struct Xoshiro256pp([u64; 4]);

impl Xoshiro256pp {
    fn new(seed: u64) -> Self {
        let mut s = [0u64; 4];
        for (i, w) in s.iter_mut().enumerate() {
            *w = mix(seed, i as u64 + 1);
        }
        // the one state the generator cannot leave
        if s == [0; 4] {
            s[0] = 1;
        }
        Xoshiro256pp(s)
    }
}

impl RngCore for Xoshiro256pp {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for c in dst.chunks_mut(8) {
            c.copy_from_slice(&self.next_u64().to_le_bytes()[..c.len()]);
        }
    }
}

impl SeededRandom {
    /// The generator for step `step` (the 1-based step count) of a run seeded with `seed`.
    pub fn for_step(seed: u64, step: u64) -> Self {
        SeededRandom {
            rng: StdRng::seed_from_u64(mix(seed, step)),
        }
    }
}

impl RandomSource for SeededRandom {
    fn uniform(&mut self) -> Result<f32> {
        Ok(self.rng.random::<f32>())
    }

    /// One `u64` from the step's generator seeds the whole draw; each block of
    /// `NORMAL_BLOCK` entries then has its own generator seeded from it and the block's
    /// index, so blocks fill in parallel and the values do not depend on the thread count.
    fn normal(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let base: u64 = self.rng.random();
        let mut data = vec![0f32; n];
        data.par_chunks_mut(NORMAL_BLOCK)
            .enumerate()
            .for_each(|(b, block)| {
                let mut rng = Xoshiro256pp::new(mix(base, b as u64));
                for v in block {
                    *v = rng.sample(StandardNormal);
                }
            });
        Ok(Tensor::from_vec(data, shape, device)?)
    }

    /// A draw takes one `u64` from the step's generator (its seed); taking it alone leaves
    /// the generator exactly where the draw would.
    fn skip_normal(&mut self, _shape: &[usize]) -> Result<()> {
        let _: u64 = self.rng.random();
        Ok(())
    }
}

/// One recorded draw.
#[derive(Debug, Clone)]
pub enum Draw {
    /// A 0-d uniform draw.
    Uniform(f32),
    /// A normal draw with its values (row-major) and shape.
    Normal { shape: Vec<usize>, data: Vec<f32> },
}

/// Replays recorded draws in order and fails loudly when asked for anything else.
pub struct ReplayRandom {
    label: String,
    draws: VecDeque<Draw>,
    index: usize,
}

impl ReplayRandom {
    /// A source that hands out `draws` in order; `label` (e.g. `step 3`) goes into errors.
    pub fn new(label: impl Into<String>, draws: Vec<Draw>) -> Self {
        ReplayRandom {
            label: label.into(),
            draws: draws.into(),
            index: 0,
        }
    }

    /// How many recorded draws were not used.
    pub fn remaining(&self) -> usize {
        self.draws.len()
    }

    fn next(&mut self, wanted: &str) -> Result<Draw> {
        let i = self.index;
        self.index += 1;
        self.draws.pop_front().ok_or_else(|| {
            PsgdError::Draw(format!(
                "{}: draw {i} asked for {wanted}, but the reference made only {i} draws",
                self.label
            ))
        })
    }
}

impl RandomSource for ReplayRandom {
    fn uniform(&mut self) -> Result<f32> {
        let i = self.index;
        match self.next("a uniform scalar")? {
            Draw::Uniform(u) => Ok(u),
            Draw::Normal { shape, .. } => Err(PsgdError::Draw(format!(
                "{}: draw {i} asked for a uniform scalar, the reference drew normal {shape:?}",
                self.label
            ))),
        }
    }

    fn normal(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let i = self.index;
        match self.next(&format!("normal {shape:?}"))? {
            Draw::Normal { shape: s, data } if s == shape => {
                Ok(Tensor::from_vec(data, shape, device)?)
            }
            Draw::Normal { shape: s, .. } => Err(PsgdError::Draw(format!(
                "{}: draw {i} asked for normal {shape:?}, the reference drew normal {s:?}",
                self.label
            ))),
            Draw::Uniform(_) => Err(PsgdError::Draw(format!(
                "{}: draw {i} asked for normal {shape:?}, the reference drew a uniform scalar",
                self.label
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(threads: usize, seed: u64, n: usize) -> Vec<f32> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut r = SeededRandom::for_step(seed, 3);
            let _ = r.uniform().unwrap();
            r.normal(&[n], &Device::Cpu)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
    }

    #[test]
    fn normal_draws_do_not_depend_on_the_thread_count() {
        for n in [0, 1, NORMAL_BLOCK, 3 * NORMAL_BLOCK + 17] {
            let one = draw(1, 5, n);
            assert_eq!(one.len(), n);
            assert_eq!(draw(3, 5, n), one, "n {n}");
            assert_eq!(draw(2, 5, n), one, "n {n}");
        }
        // another seed another draw, and blocks are not copies of each other
        let a = draw(2, 5, 2 * NORMAL_BLOCK);
        assert_ne!(draw(2, 6, 2 * NORMAL_BLOCK), a);
        assert_ne!(a[..NORMAL_BLOCK], a[NORMAL_BLOCK..]);
        // standard normal moments, roughly
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
            "{mean} {var}"
        );
    }

    #[test]
    fn skipping_a_normal_draw_leaves_the_stream_where_drawing_does() {
        let mut drawn = SeededRandom::for_step(9, 4);
        let mut skipped = SeededRandom::for_step(9, 4);
        drawn.normal(&[3, 5], &Device::Cpu).unwrap();
        skipped.skip_normal(&[3, 5]).unwrap();
        assert_eq!(drawn.uniform().unwrap(), skipped.uniform().unwrap());
        let next = |r: &mut SeededRandom| r.normal(&[7], &Device::Cpu).unwrap().to_vec1::<f32>();
        assert_eq!(next(&mut drawn).unwrap(), next(&mut skipped).unwrap());
    }

    #[test]
    fn xoshiro_gives_the_reference_stream() {
        // the reference implementation's first outputs from the state [1, 2, 3, 4]
        let mut x = Xoshiro256pp([1, 2, 3, 4]);
        let got: Vec<u64> = (0..10).map(|_| x.next_u64()).collect();
        let want = [
            41943041,
            58720359,
            3588806011781223,
            3591011842654386,
            9228616714210784205,
            9973669472204895162,
            14011001112246962877,
            12406186145184390807,
            15849039046786891736,
            10450023813501588000,
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn successive_draws_differ() {
        let mut r = SeededRandom::for_step(1, 1);
        let a = r
            .normal(&[4, 4], &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap();
        let b = r
            .normal(&[4, 4], &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_ne!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
    }
}
