//! Any PSGD variant as a `candle_nn::Optimizer`, a drop-in for `AdamW` in a training loop.

use crate::error::PsgdError;
use crate::transform::LeafSpec;
use crate::Transform;
use candle_core::{backprop::GradStore, Result, Tensor, Var};

/// A [`Transform`] driving a list of candle `Var`s.
pub struct PsgdOptimizer<T: Transform> {
    vars: Vec<Var>,
    transform: T,
    state: T::State,
}

fn to_candle(e: PsgdError) -> candle_core::Error {
    match e {
        PsgdError::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

impl<T: Transform> PsgdOptimizer<T> {
    /// The underlying transform.
    pub fn transform(&self) -> &T {
        &self.transform
    }

    /// The current state.
    pub fn state(&self) -> &T::State {
        &self.state
    }
}

impl<T: Transform> candle_nn::Optimizer for PsgdOptimizer<T> {
    type Config = T::Options;

    fn new(vars: Vec<Var>, config: T::Options) -> Result<Self> {
        let vars: Vec<Var> = vars.into_iter().filter(|v| v.dtype().is_float()).collect();
        let leaves = vars
            .iter()
            .enumerate()
            .map(|(i, v)| LeafSpec::new(format!("var{i}"), v.dims()))
            .collect();
        let transform = T::new(leaves, config).map_err(to_candle)?;
        let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let state = transform.init(&params).map_err(to_candle)?;
        Ok(PsgdOptimizer {
            vars,
            transform,
            state,
        })
    }

    /// One step on the vars that have a gradient in `grads`. A var without one (not in the
    /// loss's graph: frozen, or unused this step) is left as it is, as candle-nn's `AdamW`
    /// leaves it; the state sees a zero gradient for it (every leaf shares one step count),
    /// so its momentum decays. Every new value is computed before the first var is written,
    /// so a step that fails changes neither the vars nor the state.
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let given: Vec<Option<&Tensor>> = self.vars.iter().map(|v| grads.get(v)).collect();
        let g = self
            .vars
            .iter()
            .zip(&given)
            .map(|(v, g)| match g {
                Some(g) => Ok((*g).clone()),
                None => v.zeros_like(),
            })
            .collect::<Result<Vec<_>>>()?;
        let params: Vec<Tensor> = self.vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (updates, state) = self
            .transform
            .update(&g, &self.state, Some(&params))
            .map_err(to_candle)?;
        let next = params
            .iter()
            .zip(&updates)
            .zip(&given)
            .map(|((p, u), g)| g.map(|_| p + u).transpose())
            .collect::<Result<Vec<_>>>()?;
        for (v, n) in self.vars.iter().zip(&next) {
            if let Some(n) = n {
                v.set(n)?;
            }
        }
        self.state = state;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.transform.learning_rate(&self.state)
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.transform.set_learning_rate(lr)
    }
}
