//! Optimizer state as safetensors bytes: tensors by name, scalars and the leaf list in the
//! metadata, so a file can be checked against the optimizer that loads it. The metadata is
//! one JSON object under the key `psgd` with sorted keys, so equal states give equal bytes
//! (safetensors writes its own metadata map in hash order).
//!
//! Loading checks everything a step would trust: the format version, a CRC-32 of the
//! tensors and metadata (every file carries one, so any flipped bit is caught), each
//! tensor's dtype (a float; the preconditioner's factors in the dtype the optimizer keeps
//! them), that every value is finite (unless the optimizer allows non-finite values, whose
//! states may hold them), that no factor is all zero, and that the counters are in range.
//! The state is built whole before anything else sees it, so loading is all or nothing.

use crate::error::{PsgdError, Result};
use crate::transform::LeafSpec;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};

const META_KEY: &str = "psgd";
/// The format written and read: tensors, metadata and a `checksum` entry. (Format 1 had
/// no checksum; a file that claims it is refused, or editing the format word would turn
/// the checksum off.)
const FORMAT: &str = "psgd-state-2";
/// The largest step count (JavaScript reads counts as doubles).
const MAX_COUNT: u64 = (1 << 53) - 1;

/// CRC-32 over the tensors (by name: name, dtype, shape, bytes) and the metadata without
/// its checksum entry, so a change anywhere in the file changes it.
fn checksum<'a>(
    tensors: impl Iterator<Item = (String, String, Vec<usize>, std::borrow::Cow<'a, [u8]>)>,
    meta: &BTreeMap<String, String>,
) -> String {
    let mut all: Vec<_> = tensors.collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = crc32fast::Hasher::new();
    for (name, dtype, shape, data) in &all {
        h.update(name.as_bytes());
        h.update(dtype.as_bytes());
        for d in shape {
            h.update(&(*d as u64).to_le_bytes());
        }
        h.update(data);
    }
    for (k, v) in meta.iter().filter(|(k, _)| k.as_str() != "checksum") {
        h.update(k.as_bytes());
        h.update(v.as_bytes());
    }
    format!("{:08x}", h.finalize())
}

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
        meta.insert("format".to_string(), FORMAT.to_string());
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

    /// Bytes held by the tensors added so far (their data, not a serialisation).
    pub fn nbytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// The safetensors bytes.
    pub fn to_bytes(mut self) -> Result<Vec<u8>> {
        use safetensors::View;
        let sum = checksum(
            self.tensors.iter().map(|(n, t)| {
                (
                    n.clone(),
                    format!("{:?}", View::dtype(t)),
                    t.dims().to_vec(),
                    View::data(t),
                )
            }),
            &self.meta,
        );
        self.meta.insert("checksum".to_string(), sum);
        let meta =
            serde_json::to_string(&self.meta).map_err(|e| PsgdError::State(e.to_string()))?;
        let meta = HashMap::from([(META_KEY.to_string(), meta)]);
        safetensors::tensor::serialize(self.tensors, Some(meta))
            .map_err(|e| PsgdError::State(e.to_string()))
    }
}

/// The `psgd` metadata of a state file.
fn read_meta(bytes: &[u8]) -> Result<BTreeMap<String, String>> {
    let (_, md) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| PsgdError::State(format!("not a safetensors state: {e}")))?;
    md.metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .and_then(|m| serde_json::from_str(m).ok())
        .ok_or_else(|| PsgdError::State("not a psgd state (no 'psgd' metadata)".into()))
}

/// Refuses a file of another format than this version writes.
fn check_format(meta: &BTreeMap<String, String>) -> Result<()> {
    match meta.get("format").map(String::as_str) {
        Some(FORMAT) => Ok(()),
        Some("psgd-state-1") => Err(bad(format!(
            "format \"psgd-state-1\" carries no checksum, so its contents cannot be \
             trusted; this version reads only {FORMAT} (save the state again)"
        ))),
        other => Err(bad(format!(
            "format {:?} is not one this version reads ({FORMAT})",
            other.unwrap_or("(none)")
        ))),
    }
}

/// Refuses a file whose checksum does not match its tensors and metadata.
fn check_sum(st: &safetensors::SafeTensors<'_>, meta: &BTreeMap<String, String>) -> Result<()> {
    let sum = checksum(
        st.tensors().into_iter().map(|(n, v)| {
            let (dtype, shape) = (format!("{:?}", v.dtype()), v.shape().to_vec());
            (n, dtype, shape, std::borrow::Cow::Borrowed(v.data()))
        }),
        meta,
    );
    if meta.get("checksum") != Some(&sum) {
        return Err(bad(
            "the checksum does not match: the bytes were changed or damaged".into(),
        ));
    }
    Ok(())
}

/// The metadata of a state file this version wrote: its format and checksum checked, so
/// that nothing another program or an edit made can pass through [`regroup`] and come out
/// with a fresh checksum.
fn checked_meta(bytes: &[u8]) -> Result<BTreeMap<String, String>> {
    let meta = read_meta(bytes)?;
    check_format(&meta)?;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a safetensors state: {e}")))?;
    check_sum(&st, &meta)?;
    Ok(meta)
}

/// Where [`regroup`] takes one leaf's tensors from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafSource {
    /// The leaf of the new state.
    pub leaf: usize,
    /// Which of the source states.
    pub source: usize,
    /// The leaf of that source state.
    pub source_leaf: usize,
}

/// The leaf index of a per-leaf tensor (`<kind>.<leaf>` or `<kind>.<leaf>.<more>`: the
/// momentum `mu.<l>`, Kron's `Q.<l>.<i>`, Affine's `Ql.<l>` and `Qr.<l>`), with the name
/// split around it; `None` for a tensor that spans all leaves (XMat's `a`, LRA's `U`).
fn leaf_of(name: &str) -> Option<(&str, usize, &str)> {
    let (kind, rest) = name.split_once('.')?;
    let (index, more) = rest.split_once('.').map_or((rest, ""), |(i, m)| (i, m));
    Some((kind, index.parse().ok()?, more))
}

fn leaf_count(meta: &BTreeMap<String, String>) -> Result<usize> {
    meta.get("leaves")
        .and_then(|l| serde_json::from_str::<Vec<serde_json::Value>>(l).ok())
        .map(|l| l.len())
        .ok_or_else(|| bad("missing or bad 'leaves'".into()))
}

/// A state for a new set of leaves, made from `fresh` (a state of that set as `init` made
/// it, as bytes) with the per-leaf tensors of each picked leaf (its momentum and, for the
/// variants whose preconditioner is per leaf, Kron's and Affine's, its factors) taken from
/// a leaf of one of `sources` (states of the same variant and options), and the step count
/// set to `count`. Tensors that span all leaves (XMat's and LRA's preconditioner) stay
/// `fresh`'s, or, with `spanning`, that source's (a whole state moved onto other leaf
/// names, which must then be as many). The update counter (Kron's deterministic schedule)
/// is the largest of the sources', at most `count`. The result is a state file with its
/// own checksum, which loading checks as any other (shapes against the leaves, finite
/// values).
pub fn regroup(
    fresh: &[u8],
    sources: &[&[u8]],
    picks: &[LeafSource],
    spanning: Option<usize>,
    count: u64,
) -> Result<Vec<u8>> {
    if count > MAX_COUNT {
        return Err(bad(format!("count {count} exceeds {MAX_COUNT}")));
    }
    let mut meta = checked_meta(fresh)?;
    let leaves = leaf_count(&meta)?;
    let load = |b: &[u8]| {
        candle_core::safetensors::load_buffer(b, &Device::Cpu)
            .map_err(|e| bad(format!("cannot read its tensors: {}", PsgdError::from(e))))
    };
    let mut tensors = load(fresh)?;
    let mut counter = 0;
    let mut cumulative = 0.0f64;
    let mut from = Vec::with_capacity(sources.len());
    for (i, b) in sources.iter().enumerate() {
        let m = checked_meta(b)?;
        if m.get("variant") != meta.get("variant") {
            return Err(bad(format!("source {i} holds another variant's state")));
        }
        if let Some(c) = m.get("update_counter").and_then(|c| c.parse::<u64>().ok()) {
            counter = counter.max(c);
        }
        if let Some(c) = m
            .get("update_cumulative")
            .and_then(|c| c.parse::<f64>().ok())
        {
            cumulative = cumulative.max(c);
        }
        from.push((leaf_count(&m)?, load(b)?));
    }
    for p in picks {
        let Some((n, source)) = from.get(p.source) else {
            return Err(bad(format!(
                "leaf {} is picked from source {}, of {}",
                p.leaf,
                p.source,
                from.len()
            )));
        };
        if p.leaf >= leaves || p.source_leaf >= *n {
            return Err(bad(format!(
                "pick of leaf {} (of {leaves}) from leaf {} (of {n}) is out of range",
                p.leaf, p.source_leaf
            )));
        }
        tensors.retain(|name, _| leaf_of(name).is_none_or(|(_, l, _)| l != p.leaf));
        for (name, t) in source {
            if let Some((kind, l, more)) = leaf_of(name) {
                if l == p.source_leaf {
                    let dot = if more.is_empty() { "" } else { "." };
                    tensors.insert(format!("{kind}.{}{dot}{more}", p.leaf), t.clone());
                }
            }
        }
    }
    if let Some(s) = spanning {
        let Some((n, source)) = from.get(s) else {
            return Err(bad(format!("spanning source {s} of {}", from.len())));
        };
        if *n != leaves {
            return Err(bad(format!(
                "source {s} has {n} leaves, the new state {leaves}"
            )));
        }
        tensors.retain(|name, _| leaf_of(name).is_some());
        for (name, t) in source {
            if leaf_of(name).is_none() {
                tensors.insert(name.clone(), t.clone());
            }
        }
    }
    meta.remove("checksum");
    meta.insert("format".into(), FORMAT.into());
    meta.insert("count".into(), count.to_string());
    if meta.contains_key("update_counter") {
        meta.insert("update_counter".into(), counter.min(count).to_string());
    }
    if meta.contains_key("update_cumulative") {
        let c = cumulative.min(count as f64);
        meta.insert("update_cumulative".into(), c.to_string());
    }
    let mut tensors: Vec<_> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    StateFile { tensors, meta }.to_bytes()
}

/// A state being read.
pub struct LoadedState {
    tensors: HashMap<String, Tensor>,
    meta: BTreeMap<String, String>,
    /// The dtype the preconditioner's factors must have (see [`LoadedState::take_factor`]).
    factor_dtype: DType,
}

fn bad(m: String) -> PsgdError {
    PsgdError::State(m)
}

/// Whether a tensor holds a NaN or Inf, and whether it is all zero (on the host: loading
/// is not a hot path, and this reads each value once).
fn scan(t: &Tensor) -> Result<(bool, bool)> {
    let v = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok((
        v.iter().any(|x| !x.is_finite()),
        v.iter().all(|&x| x == 0.0),
    ))
}

impl LoadedState {
    /// Parses `bytes` and checks that they hold a `variant` state for the same leaves.
    /// With `allow_non_finite` (the optimizer's `allowNonFinite`), tensors may hold NaN or
    /// Inf, as the states of such an optimizer may.
    pub fn parse(
        bytes: &[u8],
        device: &Device,
        variant: &str,
        leaves: &[LeafSpec],
        allow_non_finite: bool,
    ) -> Result<Self> {
        let meta = read_meta(bytes)?;
        let got = meta.get("variant").map(String::as_str).unwrap_or("none");
        if got != variant {
            return Err(PsgdError::State(format!(
                "holds a '{got}' state, this optimizer is '{variant}'"
            )));
        }
        check_format(&meta)?;
        let want = leaves_json(leaves);
        if meta.get("leaves") != Some(&want) {
            return Err(PsgdError::State(format!(
                "was saved for leaves {}, this optimizer has {want}",
                meta.get("leaves").map(String::as_str).unwrap_or("(none)")
            )));
        }
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| bad(format!("not a safetensors state: {e}")))?;
        for (name, view) in st.tensors() {
            use safetensors::Dtype as D;
            if !matches!(view.dtype(), D::F32 | D::F64 | D::BF16 | D::F16) {
                return Err(bad(format!(
                    "tensor '{name}' has dtype {:?}, expected a float dtype",
                    view.dtype()
                )));
            }
        }
        check_sum(&st, &meta)?;
        let tensors = candle_core::safetensors::load_buffer(bytes, device)
            .map_err(|e| bad(format!("cannot read its tensors: {}", PsgdError::from(e))))?;
        for (name, t) in tensors.iter().filter(|_| !allow_non_finite) {
            if scan(t)?.0 {
                return Err(bad(format!("tensor '{name}' holds NaN or Inf")));
            }
        }
        Ok(LoadedState {
            tensors,
            meta,
            factor_dtype: DType::F32,
        })
    }

    /// Sets the dtype [`LoadedState::take_factor`] requires.
    pub fn set_factor_dtype(&mut self, dtype: DType) {
        self.factor_dtype = dtype;
    }

    /// Takes the tensor `name`.
    pub fn take(&mut self, name: &str) -> Result<Tensor> {
        self.tensors
            .remove(name)
            .ok_or_else(|| PsgdError::State(format!("missing tensor '{name}'")))
    }

    /// Takes the preconditioner tensor `name`, which must have the factors' dtype.
    pub fn take_typed(&mut self, name: &str) -> Result<Tensor> {
        let t = self.take(name)?;
        if t.dtype() != self.factor_dtype {
            return Err(bad(format!(
                "tensor '{name}' has dtype {:?}, this optimizer keeps it as {:?}",
                t.dtype(),
                self.factor_dtype
            )));
        }
        Ok(t)
    }

    /// Fails on a tensor no `take` asked for: a state of another configuration (e.g.
    /// with momentum, for an optimizer without).
    pub fn finish(&self) -> Result<()> {
        match self.tensors.keys().min() {
            Some(name) => Err(bad(format!(
                "has a tensor '{name}' this optimizer does not keep (saved with other options?)"
            ))),
            None => Ok(()),
        }
    }

    /// Takes the preconditioner factor `name`, which must have the factors' dtype and not
    /// be all zero (a zero factor makes every later update zero, or NaN once normalised).
    pub fn take_factor(&mut self, name: &str) -> Result<Tensor> {
        let t = self.take_typed(name)?;
        if scan(&t)?.1 {
            return Err(bad(format!("tensor '{name}' is all zero")));
        }
        Ok(t)
    }

    /// Takes the momentum buffers of `leaves` leaves when `present` (`b1 > 0`), which must
    /// have `dtype` when the options fix it (`muDtype`).
    pub fn take_momentum(
        &mut self,
        leaves: usize,
        present: bool,
        dtype: Option<DType>,
    ) -> Result<Option<Vec<Tensor>>> {
        if !present {
            return Ok(None);
        }
        let take = |f: &mut Self, l: usize| {
            let name = format!("mu.{l}");
            let t = f.take(&name)?;
            match dtype {
                Some(d) if t.dtype() != d => Err(bad(format!(
                    "tensor '{name}' has dtype {:?}, the option muDtype says {d:?}",
                    t.dtype()
                ))),
                _ => Ok(t),
            }
        };
        (0..leaves)
            .map(|l| take(self, l))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// A metadata entry, if present.
    pub fn meta_str(&self, k: &str) -> Option<&str> {
        self.meta.get(k).map(String::as_str)
    }

    /// Reads a counter from the metadata (at most 2^53 − 1, a JavaScript integer).
    pub fn meta_u64(&self, k: &str) -> Result<u64> {
        self.meta
            .get(k)
            .and_then(|v| v.parse().ok())
            .filter(|&v| v <= MAX_COUNT)
            .ok_or_else(|| PsgdError::State(format!("missing or bad '{k}'")))
    }
}
