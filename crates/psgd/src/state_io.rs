//! Optimizer state as safetensors bytes: tensors by name, scalars and the leaf list in the
//! metadata, so a file can be checked against the optimizer that loads it. The metadata is
//! one JSON object under the key `psgd` with sorted keys, so equal states give equal bytes
//! (safetensors writes its own metadata map in hash order).

use crate::error::{PsgdError, Result};
use crate::transform::LeafSpec;
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};

const META_KEY: &str = "psgd";

/// A state being written.
pub struct StateFile {
    tensors: Vec<(String, Tensor)>,
    meta: BTreeMap<String, String>,
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
        let mut meta = BTreeMap::new();
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

    /// Adds the momentum buffers (`mu.<leaf index>`), if any.
    pub fn momentum(&mut self, mu: Option<&Vec<Tensor>>) {
        for (l, m) in mu.into_iter().flatten().enumerate() {
            self.tensor(format!("mu.{l}"), m);
        }
    }

    /// The safetensors bytes.
    pub fn to_bytes(self) -> Result<Vec<u8>> {
        let meta =
            serde_json::to_string(&self.meta).map_err(|e| PsgdError::State(e.to_string()))?;
        let meta = HashMap::from([(META_KEY.to_string(), meta)]);
        safetensors::tensor::serialize(self.tensors, Some(meta))
            .map_err(|e| PsgdError::State(e.to_string()))
    }
}

/// A state being read.
pub struct LoadedState {
    tensors: HashMap<String, Tensor>,
    meta: BTreeMap<String, String>,
}

impl LoadedState {
    /// Parses `bytes` and checks that they hold a `variant` state for the same leaves.
    pub fn parse(
        bytes: &[u8],
        device: &Device,
        variant: &str,
        leaves: &[LeafSpec],
    ) -> Result<Self> {
        let (_, md) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| PsgdError::State(format!("not a safetensors state: {e}")))?;
        let meta: BTreeMap<String, String> = md
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .and_then(|m| serde_json::from_str(m).ok())
            .ok_or_else(|| PsgdError::State("not a psgd state (no 'psgd' metadata)".into()))?;
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

    /// Takes the momentum buffers of `leaves` leaves when `present` (`b1 > 0`).
    pub fn take_momentum(&mut self, leaves: usize, present: bool) -> Result<Option<Vec<Tensor>>> {
        if !present {
            return Ok(None);
        }
        (0..leaves)
            .map(|l| self.take(&format!("mu.{l}")))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Reads an integer from the metadata.
    pub fn meta_u64(&self, k: &str) -> Result<u64> {
        self.meta
            .get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| PsgdError::State(format!("missing or bad '{k}'")))
    }
}
