//! Benchmark-only bindings, built with the `bench` feature (`npm run bench` builds the
//! addon with it; the published addon has none of this).

use crate::{js_err, run_update, tensors, NativeOptimizer, NativeState, StepInput, Tensor};
use napi::bindgen_prelude::*;
use napi_derive::napi;

#[napi]
impl NativeOptimizer {
    /// For the benchmark's binding-overhead figure: `n` whole steps run by a Rust loop, with
    /// no JS in between, each timed on the Rust side (seconds; the results are dropped).
    /// With `add`, each step also forms `params + updates`, the work of `step`. Taken in
    /// the same process as the Node API steps it is compared with, so both see the same
    /// allocator and page state. Advances `state` like `update`.
    #[allow(clippy::too_many_arguments)]
    #[napi]
    pub fn time_steps(
        &self,
        env: Env,
        grads: Vec<&Tensor>,
        state: &NativeState,
        params: Option<Vec<&Tensor>>,
        step: StepInput,
        n: u32,
        add: Option<bool>,
    ) -> Result<Vec<f64>> {
        let grads = tensors(&env, &grads)?;
        let params = params.as_deref().map(|p| tensors(&env, p)).transpose()?;
        let add = add.unwrap_or(false);
        (0..n)
            .map(|_| {
                let t0 = std::time::Instant::now();
                run_update(
                    &self.inner,
                    (&state.inner, &state.count, &state.fit),
                    &grads,
                    params.as_deref(),
                    &step,
                    None,
                    |u| match (&params, add) {
                        (Some(p), true) => psgd::apply_updates(p, &u).map(drop),
                        _ => Ok(()),
                    },
                )
                .map_err(|e| js_err(&env, e))?;
                Ok(t0.elapsed().as_secs_f64())
            })
            .collect()
    }
}
