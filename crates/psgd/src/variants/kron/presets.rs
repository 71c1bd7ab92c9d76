//! Kron's presets: named option sets under which Kron behaves like another PSGD library
//! (`kronPresets` in TypeScript, generated from here by [`crate::codegen`]).
//!
//! Every preset sets the same options, so that one spread over another (or over earlier
//! options) replaces it whole; a user's own values go after it
//! (`{ ...kronPresets.psgdTorch, learningRate: 3e-4 }`).

use super::KronOptions;
use crate::error::{PsgdError, Result};
use crate::options::Options;
use crate::schedule::PrecondUpdateProbSchedule;
use serde_json::{json, Map, Value};

/// A named option set under which Kron behaves like another PSGD library.
#[derive(Debug, Clone)]
pub struct KronPreset {
    /// Its key in TypeScript's `kronPresets` (and the name [`KronOptions::preset`] takes).
    pub name: &'static str,
    /// What it reproduces.
    pub doc: &'static str,
    /// The option values, camelCase JSON as [`Options::from_json`] reads them. Every
    /// preset sets the same keys.
    pub options: Map<String, Value>,
    /// The fit probability as psgd-jax's anneal with these parameters, where the preset
    /// sets one (`preconditionerUpdateProbability` is then null in `options`).
    pub anneal: Option<PrecondUpdateProbSchedule>,
    /// What still differs from that library, for the docs.
    pub differs: &'static [&'static str],
}

impl KronPreset {
    /// The options the preset gives.
    pub fn kron_options(&self) -> Result<KronOptions> {
        let mut o = KronOptions::from_json(&self.options)?;
        if let Some(a) = self.anneal {
            o.preconditioner_update_probability = Some(a.schedule());
        }
        Ok(o)
    }
}

impl KronOptions {
    /// The options of the preset `name` (see [`kron_presets`]): `"psgdJax"`,
    /// `"psgdTorch"`, `"distributedKronPro"` or `"heavyballPro"`. Change fields of the
    /// result for a learning rate of your own.
    pub fn preset(name: &str) -> Result<KronOptions> {
        let all = kron_presets();
        match all.iter().find(|p| p.name == name) {
            Some(p) => p.kron_options(),
            None => Err(PsgdError::option_range(
                "preset",
                format!(
                    "'{name}' is not a Kron preset; the presets are {}",
                    all.iter()
                        .map(|p| format!("'{}'", p.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
        }
    }
}

/// psgd-jax 0.2.9's `kron` defaults: the keys every preset sets.
fn psgd_jax() -> Map<String, Value> {
    let v = json!({
        "learningRate": 0.001,
        "b1": 0.9,
        "momentumWarmup": "debias",
        "weightDecay": 0.0,
        "preconditionerUpdateProbability": null,
        "updateDecision": "counter",
        "updatePreconditionerFirst": true,
        "momentumIntoPrecondUpdate": true,
        "updateRule": "EQ",
        "preconditionerLr": 0.1,
        "lipschitzBeta": null,
        "normEstimator": null,
        "damping": null,
        "procrustesMaxStep": 0.125,
        "balanceProbability": null,
        "balanceEvery": null,
        "balanceWhen": null,
        "preconditionerInitScale": 1.0,
        "initScaleScope": "leaf",
        "initScalePower": 1.0,
        "maxSizeTriangular": 8192,
        "minNdimTriangular": 2,
        "maxSkew": null,
        "memorySaveMode": null,
        "mergeDims": null,
        "targetMergedDimSize": 4096,
        "blockSize": null,
        "updateClipRms": 1.1,
        "updateClipElement": null,
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

/// psgd-jax's values with `changes` on top; a key the base does not set is a bug here,
/// caught by the tests.
fn with(changes: Value) -> Map<String, Value> {
    let mut m = psgd_jax();
    if let Value::Object(c) = changes {
        m.extend(c);
    }
    m
}

/// Every preset, in the order the docs list them.
pub fn kron_presets() -> Vec<KronPreset> {
    vec![
        KronPreset {
            name: "psgdJax",
            doc: "psgd-jax 0.2.9's `kron` (the defaults): the EQ rule with triangular factors, \
                  psgd-jax's deterministic norm bound and memoryless step, its fit-probability \
                  anneal and update counter, debiased momentum, the update's RMS capped at 1.1.",
            options: psgd_jax(),
            anneal: None,
            differs: &[],
        },
        KronPreset {
            name: "psgdTorch",
            doc: "psgd_torch's `KronWhiten` defaults (the method author's reference): the \
                  `Q0.5EQ1.5` rule, the Lipschitz step (β 0.9), the random subspace norm \
                  bound, damping 1e-9, balancing after 1% of fits, one automatic initial \
                  scale for all leaves from the first gradient, a fit every step decided by a \
                  uniform draw, no momentum (with psgd_torch's warm-up when `b1` is set), the \
                  gradient whitened, dense factors up to any size unless `d² > N`, and the \
                  update capped at RMS 2 and clamped to ±10.",
            options: with(json!({
                "b1": 0.0,
                "momentumWarmup": "psgdTorch",
                "preconditionerUpdateProbability": 1.0,
                "updateDecision": "draw",
                "momentumIntoPrecondUpdate": false,
                "updateRule": "Q0.5EQ1.5",
                "lipschitzBeta": 0.9,
                "normEstimator": "subspace",
                "damping": 1e-9,
                "balanceProbability": 0.01,
                "balanceWhen": "afterFit",
                "preconditionerInitScale": null,
                "initScaleScope": "global",
                "maxSizeTriangular": 9007199254740992u64,
                "minNdimTriangular": 1,
                "maxSkew": 1.0,
                "updateClipRms": 2.0,
                "updateClipElement": 10.0,
            })),
            anneal: None,
            differs: &[
                "psgd_torch drops size-1 axes before it chooses the factors; here a size-1 \
                 axis keeps a one-entry diagonal factor, which it fits too.",
                "`updateDecision: 'draw'` draws from this package's generator (`seed`), so a \
                 run is psgd_torch's in distribution; the conformance fixtures replay its own \
                 draws.",
                "`preconditioner_max_size` (∞ in psgd_torch) is `maxSizeTriangular` 2⁵³.",
            ],
        },
        KronPreset {
            name: "distributedKronPro",
            doc: "distributed-kron 2.0.0's `pro` defaults: the `Q0.5EQ1.5` rule with \
                  preconditioner step 0.5 and Lipschitz β 0.95, every leaf merged to one or \
                  two dimensions and cut into blocks of 256, dense factors up to 16384, a fit \
                  every step, balancing every 100 steps, momentum 0.95 (debiased) whitened, \
                  the update's RMS capped at 1.1, and its `lr_style: 'adam'` (the update \
                  divided by 5) with weight decay 0.1 folded into `learningRate` 2e-4 and \
                  `weightDecay` 0.5.",
            options: with(json!({
                "learningRate": 0.0002,
                "b1": 0.95,
                "weightDecay": 0.5,
                "preconditionerUpdateProbability": 1.0,
                "updateRule": "Q0.5EQ1.5",
                "preconditionerLr": 0.5,
                "lipschitzBeta": 0.95,
                "normEstimator": "subspace",
                "damping": 1e-9,
                "balanceEvery": 100,
                "balanceWhen": "beforeFit",
                "maxSizeTriangular": 16384,
                "mergeDims": "twoD",
                "blockSize": 256,
            })),
            anneal: None,
            differs: &[
                "distributed-kron divides the update by 5 (`lr_style: 'adam'`) before its \
                 weight decay and learning rate: give this preset a fifth of a \
                 distributed-kron learning rate, and five times its weight decay.",
                "Its 1-D leaves are damped by `1e-9·ν` alone; here by `(1e-9 + eps·|g|)·ν` \
                 as its other leaves are (a difference below 1e-6 of the update).",
                "Blocks are fitted unpadded; distributed-kron pads them and masks the padding, \
                 which gives the same numbers.",
                "Its draws come from JAX keys; here from this package's generator (`seed`). \
                 Its sharding and pipeline options have no counterpart.",
            ],
        },
        KronPreset {
            name: "heavyballPro",
            doc: "heavyball 3.2.1's `PSGDPRO` defaults: the `Q0.5EQ1.5` rule with the \
                  Lipschitz step (β 0.9), heavyball's deterministic power-iteration norm \
                  bound, Procrustes steps up to 0.5, balancing before every fit, an automatic \
                  initial scale per leaf with exponent 0.5, dense factors up to 2048, a fit \
                  probability annealed from step 1000 to 0.03 by its deterministic \
                  cumulative schedule, momentum 0.9 (debiased) whitened, and no update clip.",
            options: with(json!({
                "updateDecision": "cumulative",
                "updateRule": "Q0.5EQ1.5",
                "lipschitzBeta": 0.9,
                "normEstimator": "power",
                "damping": 1e-9,
                "procrustesMaxStep": 0.5,
                "balanceEvery": 1,
                "balanceWhen": "beforeFit",
                "preconditionerInitScale": null,
                "initScalePower": 0.5,
                "maxSizeTriangular": 2048,
                "updateClipRms": null,
            })),
            // max(0.03, 0.999^(n − 1000)) after 1000 steps at 1
            anneal: Some(PrecondUpdateProbSchedule {
                max_prob: 1.0,
                min_prob: 0.03,
                decay: -(0.999f64.ln()),
                flat_start: 1000.0,
            }),
            differs: &[
                "The Procrustes rotation is normalised by a float32 power iteration; heavyball \
                 rounds that one to bfloat16 stochastically.",
                "The automatic initial scale adds `δ⁴` (δ = 1e-9) to `mean|g|⁴` where \
                 heavyball clamps `|g|` at 1e-12, and heavyball's \
                 `precond_init_scale_scale` is 1 only.",
                "The fit probability is computed in float32 as `exp(−decay·(n − 1000))`; \
                 heavyball takes `0.999^(n − 1000)` in float64. Both decide every fit of \
                 the first 10⁶ steps alike; later the cumulative schedule may fit one step \
                 apart from heavyball's.",
                "heavyball stacks parameters of one shape in a bucket and takes the \
                 automatic initial scale over the whole bucket; here each leaf takes its own.",
                "heavyball drops size-1 axes before it chooses the factors; here a size-1 \
                 axis keeps a one-entry diagonal factor, which it fits too.",
                "The Lipschitz bounds are kept in float32 (heavyball: float64), per leaf \
                 rather than per bucket of same-shape parameters (the same maths).",
            ],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every preset sets exactly psgd-jax's keys (a spread replaces a preset whole) and
    /// gives valid options; `psgdJax` is the defaults.
    #[test]
    fn every_preset_sets_the_same_valid_options() {
        let keys: Vec<String> = psgd_jax().keys().cloned().collect();
        for p in kron_presets() {
            let mut got: Vec<String> = p.options.keys().cloned().collect();
            got.sort();
            let mut want = keys.clone();
            want.sort();
            assert_eq!(got, want, "preset {}", p.name);
            let o = p
                .kron_options()
                .unwrap_or_else(|e| panic!("{}: {e}", p.name));
            o.validate().unwrap_or_else(|e| panic!("{}: {e}", p.name));
        }
        let jax = KronOptions::preset("psgdJax").unwrap();
        assert_eq!(format!("{jax:?}"), format!("{:?}", KronOptions::default()));
    }

    /// The presets say what they set: spot checks against each library's defaults.
    #[test]
    fn presets_hold_their_libraries_defaults() {
        use crate::kron::UpdateRule;
        let torch = KronOptions::preset("psgdTorch").unwrap();
        assert_eq!(torch.update_rule, UpdateRule::Pro);
        assert_eq!(torch.update_clip_rms, Some(2.0));
        assert_eq!(torch.update_clip_element, Some(10.0));
        assert!(torch.preconditioner_init_scale.is_none());
        let dk = KronOptions::preset("distributedKronPro").unwrap();
        assert_eq!((dk.preconditioner_lr, dk.lipschitz_beta), (0.5, Some(0.95)));
        assert_eq!(dk.block_size, Some(256));
        let hb = KronOptions::preset("heavyballPro").unwrap();
        assert_eq!(hb.procrustes_max_step, 0.5);
        assert_eq!(hb.max_size_triangular, 2048);
        let p = hb.preconditioner_update_probability.expect("an anneal");
        assert_eq!(p.at(1000), 1.0);
        assert!((p.at(1500) - 0.999f64.powi(500)).abs() < 1e-6);
        assert!((p.at(10_000) - 0.03).abs() < 1e-7);
    }

    #[test]
    fn an_unknown_preset_names_the_presets() {
        let e = KronOptions::preset("adam").unwrap_err().to_string();
        assert!(e.contains("'adam'") && e.contains("'psgdTorch'"), "{e}");
    }
}
