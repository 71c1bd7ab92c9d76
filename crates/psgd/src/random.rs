//! Random draws behind a trait, so that tests can replay the reference's own draws.
//!
//! The default source is stateless across steps: the generator for a step is derived from
//! `(seed, step)`, the way psgd-jax folds its step count into a fixed key. A saved state
//! therefore needs no generator state to continue reproducibly.

use crate::error::{PsgdError, Result};
use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr::StandardNormal;
use std::collections::VecDeque;

/// A source of the random arrays an optimizer step needs, in the order it asks for them.
pub trait RandomSource: Send {
    /// A scalar drawn uniformly from `[0, 1)`.
    fn uniform(&mut self) -> Result<f32>;
    /// A float32 tensor of standard normal draws with the given shape, on `device`.
    fn normal(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// The default source: a seeded generator derived from `(seed, step)`.
pub struct SeededRandom {
    rng: StdRng,
}

impl SeededRandom {
    /// The generator for step `step` (the 1-based step count) of a run seeded with `seed`.
    pub fn for_step(seed: u64, step: u64) -> Self {
        // splitmix64 of the pair, so neighbouring steps get unrelated streams
        let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        SeededRandom {
            rng: StdRng::seed_from_u64(z),
        }
    }
}

impl RandomSource for SeededRandom {
    fn uniform(&mut self) -> Result<f32> {
        Ok(self.rng.random::<f32>())
    }

    fn normal(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| self.rng.sample(StandardNormal)).collect();
        Ok(Tensor::from_vec(data, shape, device)?)
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
