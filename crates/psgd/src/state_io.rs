//! Optimizer state as safetensors bytes: tensors by name, scalars and the leaf list in the
//! metadata, so a file can be checked against the optimizer that loads it.

use crate::error::{PsgdError, Result};
use crate::transform::LeafSpec;
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// A state being written.
pub struct StateFile {
    tensors: Vec<(String, Tensor)>,
    meta: HashMap<String, String>,
}

fn leaves_json(leaves: &[LeafSpec]) -> String {
    serde_json::Value::Array(
        leaves
            .iter()
            .map(|l| serde_json::json!({ "path": l.path, "shape": l.shape }))
            .collect(),
    )
    .to_string()
}

impl StateFile {
    /// An empty state of `variant` for `leaves`.
    pub fn new(variant: &str, leaves: &[LeafSpec]) -> Self {
        let mut meta = HashMap::new();
        meta.insert("variant".to_string(), variant.to_string());
        meta.insert("leaves".to_string(), leaves_json(leaves));
        meta.insert("format".to_string(), "psgd-state-1".to_string());
        StateFile {
            tensors: vec![],
            meta,
        }
    }

    /// Adds a metadata entry.
    pub fn meta(&mut self, k: &str, v: String) {
        self.meta.insert(k.to_string(), v);
    }

    /// Adds a tensor.
    pub fn tensor(&mut self, name: String, t: &Tensor) {
        self.tensors.push((name, t.clone()));
    }

    /// The safetensors bytes.
    pub fn to_bytes(self) -> Result<Vec<u8>> {
        safetensors::tensor::serialize(self.tensors, Some(self.meta))
            .map_err(|e| PsgdError::State(e.to_string()))
    }
}

/// A state being read.
pub struct LoadedState {
    tensors: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
}

impl LoadedState {
    /// Parses `bytes` and checks that they hold a `variant` state for the same leaves.
    pub fn parse(bytes: &[u8], device: &Device, variant: &str, leaves: &[LeafSpec]) -> Result<Self> {
        let (_, md) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| PsgdError::State(format!("not a safetensors state: {e}")))?;
        let meta = md.metadata().clone().unwrap_or_default();
        let got = meta.get("variant").map(String::as_str).unwrap_or("none");
        if got != variant {
            return Err(PsgdError::State(format!(
                "holds a '{got}' state, this optimizer is '{variant}'"
            )));
        }
        let want = leaves_json(leaves);
        if meta.get("leaves") != Some(&want) {
            return Err(PsgdError::State(format!(
                "was saved for leaves {}, this optimizer has {want}",
                meta.get("leaves").map(String::as_str).unwrap_or("(none)")
            )));
        }
        let tensors = candle_core::safetensors::load_buffer(bytes, device)?;
        Ok(LoadedState { tensors, meta })
    }

    /// Takes the tensor `name`.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.tensors
            .remove(name)
            .ok_or_else(|| PsgdError::State(format!("missing tensor '{name}'")))
    }

    /// Reads an integer from the metadata.
    pub fn meta_u64(&self, k: &str) -> Result<u64> {
        self.meta
            .get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| PsgdError::State(format!("missing or bad '{k}'")))
    }
}
