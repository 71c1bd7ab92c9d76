//! Kron's dimension merging and blocks (`mergeDims`, `targetMergedDimSize`, `blockSize`):
//! how a leaf's tensor is reshaped and partitioned into the tensors Kron preconditions
//! (its *parts*), and back.
//!
//! A leaf of shape `[B?, d₀, …]` (`B` the layer axis of a scanned leaf) is first reshaped
//! to merged axes (`mergeDims`), then every dense merged axis longer than `blockSize` is
//! cut into blocks of `blockSize` (the last one shorter). Each block is preconditioned on
//! its own, with its own factors, as a leaf of its own would be; blocks of the same shape
//! are stacked along a batch axis (as scanned layers are) and form one part. The blocks
//! are not padded, so a block's fit is exactly that of a leaf of the block's shape. The
//! factor kinds (dense or diagonal: `maxSizeTriangular`, `minNdimTriangular`,
//! `memorySaveMode`) are decided on the merged shape and kept by its blocks.

use super::{factor_kinds, KronOptions};
use crate::error::{PsgdError, Result};
use crate::transform::LeafSpec;
use candle_core::Tensor;

/// How a leaf's axes are merged before Kron preconditions it (`mergeDims`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeDims {
    /// distributed-kron's `kron` (`merge_small_dims`): adjacent axes are grouped so that
    /// each merged size comes closest to `targetMergedDimSize` (its loss heuristic).
    Small,
    /// distributed-kron's `pro` (`_merge_dims`): every leaf becomes 1-D (when one axis
    /// holds all its elements) or 2-D, split at the most balanced position.
    TwoD,
}

impl crate::options::Choice for MergeDims {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("small", MergeDims::Small), ("twoD", MergeDims::TwoD)];
}
crate::options::choice_option!(MergeDims, "'small' | 'twoD'");

/// The check of `targetMergedDimSize` and `blockSize`: a length ≥ 1.
pub(super) fn at_least_one(v: usize) -> std::result::Result<(), String> {
    if v >= 1 {
        Ok(())
    } else {
        Err(format!("must be an integer >= 1, got {v}"))
    }
}

/// Above this many axes `'small'` finds its grouping by dynamic programming instead of
/// trying all `2^(n−1)` groupings (the same loss; ties may resolve otherwise).
const EXHAUSTIVE_MAX_AXES: usize = 16;

/// distributed-kron's loss of a merged size `d` against the target `t`: least at `t`,
/// steep below `t/8` and above `8t`.
fn merge_loss(d: usize, t: usize) -> f64 {
    let (d, t) = (d as f64, t as f64);
    if d < t {
        let small = t / 8.0;
        let mut loss = (t / d).log2();
        if d < small {
            loss += 100.0 * (small / d).log2();
        }
        loss
    } else {
        let large = 8.0 * t;
        let mut loss = 10.0 * (d / t).log2();
        if d > large {
            loss += 1000.0 * (d / large).log2();
        }
        loss
    }
}

/// `'small'`: the grouping of adjacent axes with the least total [`merge_loss`], the first
/// in distributed-kron's order among equals (its `_merge_small_dims`); `[]` for `()`, `[1]`
/// when every axis is 1. Returns the groups' lengths.
pub fn merge_small_groups(shape: &[usize], target: usize) -> Vec<usize> {
    let n = shape.len();
    if n == 0 {
        return vec![];
    }
    if shape.iter().all(|&d| d == 1) {
        return vec![n];
    }
    let size = |a: usize, b: usize| shape[a..b].iter().product::<usize>();
    if n > EXHAUSTIVE_MAX_AXES {
        // best[i]: the least loss of axes i.., with the first group's length
        let mut best = vec![(0.0f64, 0usize); n + 1];
        for i in (0..n).rev() {
            best[i] = (i + 1..=n)
                .map(|j| (merge_loss(size(i, j), target) + best[j].0, j - i))
                .fold((f64::INFINITY, 0), |a, b| if b.0 < a.0 { b } else { a });
        }
        let mut out = vec![];
        let mut i = 0;
        while i < n {
            out.push(best[i].1);
            i += best[i].1;
        }
        return out;
    }
    // every composition of n, in distributed-kron's order: the first group's length
    // ascending, then the rest in the same order; the loss summed left to right
    let mut best: Option<(f64, Vec<usize>)> = None;
    let mut groups: Vec<usize> = vec![];
    fn walk(
        at: usize,
        n: usize,
        loss: f64,
        groups: &mut Vec<usize>,
        size: &dyn Fn(usize, usize) -> usize,
        target: usize,
        best: &mut Option<(f64, Vec<usize>)>,
    ) {
        if at == n {
            if best.as_ref().is_none_or(|b| loss < b.0) {
                *best = Some((loss, groups.clone()));
            }
            return;
        }
        for j in at + 1..=n {
            groups.push(j - at);
            let l = loss + merge_loss(size(at, j), target);
            walk(j, n, l, groups, size, target, best);
            groups.pop();
        }
    }
    walk(0, n, 0.0, &mut groups, &size, target, &mut best);
    best.map(|b| b.1).unwrap_or_else(|| vec![n])
}

/// `'twoD'`: distributed-kron `pro`'s `_merge_dims`. A leaf with fewer than two axes is
/// kept; one whose largest axis holds all its elements becomes that axis alone; a 2-D one
/// is kept; else the axes are split in two at the position whose sides' sizes are the
/// most balanced (the first among equals). Returns the groups' lengths.
pub fn merge_two_d_groups(shape: &[usize]) -> Vec<usize> {
    let n = shape.len();
    if n < 2 {
        return vec![1; n];
    }
    let total: usize = shape.iter().product();
    if Some(&total) == shape.iter().max() {
        return vec![n];
    }
    if n == 2 {
        return vec![1, 1];
    }
    let mut best = (f64::INFINITY, 1);
    for s in 1..n {
        let (l, r) = (
            shape[..s].iter().product::<usize>() as f64,
            shape[s..].iter().product::<usize>() as f64,
        );
        let ratio = l.max(r) / l.min(r);
        if ratio < best.0 {
            best = (ratio, s);
        }
    }
    vec![best.1, n - best.1]
}

/// The merged shape of `shape` under `mode`.
pub fn merged_shape(shape: &[usize], mode: Option<MergeDims>, target: usize) -> Vec<usize> {
    let groups = match mode {
        None => return shape.to_vec(),
        Some(MergeDims::Small) => merge_small_groups(shape, target),
        Some(MergeDims::TwoD) => merge_two_d_groups(shape),
    };
    let mut at = 0;
    groups
        .iter()
        .map(|&g| {
            let d = shape[at..at + g].iter().product();
            at += g;
            d
        })
        .collect()
}

/// Block lengths of an axis of length `d`: `d` itself, or blocks of `bs` and a shorter
/// last one when `bs < d`.
pub fn block_lengths(d: usize, bs: Option<usize>) -> Vec<usize> {
    match bs {
        Some(bs) if bs > 0 && bs < d => {
            let mut v = vec![bs; d.div_ceil(bs)];
            *v.last_mut().expect("d > 0") = d - bs * (v.len() - 1);
            v
        }
        _ => vec![d],
    }
}

/// One tensor Kron preconditions: a whole leaf, or the blocks of one shape of a leaf,
/// stacked (block-major, then the layers of a scanned leaf).
#[derive(Debug, Clone)]
pub(super) struct Part {
    /// As a leaf: `[batch, block…]` and scanned when it stacks layers or blocks.
    pub spec: LeafSpec,
    /// The factor kinds (true: diagonal), decided on the merged shape.
    pub diag: Vec<bool>,
}

/// How one user leaf maps to its parts.
#[derive(Debug, Clone)]
struct LeafLayout {
    /// The layers (1 for an unscanned leaf).
    batch: usize,
    /// The merged axes, without the layer axis.
    merged: Vec<usize>,
    /// Block lengths per merged axis.
    blocks: Vec<Vec<usize>>,
    /// Per block (row-major over the block grid): its part and its index in that part.
    block_part: Vec<(usize, usize)>,
    /// Its parts (indices into [`Layout::parts`]), in order.
    parts: Vec<usize>,
}

impl LeafLayout {
    fn blocked(&self) -> bool {
        self.block_part.len() > 1
    }
}

/// Every leaf's merging and blocks (see the module docs).
#[derive(Debug, Clone)]
pub(super) struct Layout {
    leaves: Vec<LeafLayout>,
    /// The optimizer's leaves.
    specs: Vec<LeafSpec>,
    parts: Vec<Part>,
    /// No leaf is merged or blocked: parts are the leaves.
    identity: bool,
    /// The options' description, kept in saved states (None: the default layout).
    tag: Option<String>,
}

/// A leaf's layers (the leading axis of a scanned leaf, else 1) and the shape of one.
pub(super) fn layers(spec: &LeafSpec) -> Result<(usize, &[usize])> {
    if !spec.scanned {
        return Ok((1, spec.shape.as_slice()));
    }
    match spec.shape.split_first() {
        Some((&b, rest)) => Ok((b, rest)),
        None => Err(PsgdError::option_range(
            "scanned_layers",
            format!("leaf '{}' is 0-d and has no layer axis to scan", spec.path),
        )),
    }
}

/// The grid coordinates of block `k` of a grid with `counts` blocks per axis, row-major.
fn grid_index(mut k: usize, counts: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; counts.len()];
    for a in (0..counts.len()).rev() {
        idx[a] = k % counts[a];
        k /= counts[a];
    }
    idx
}

impl Layout {
    pub fn new(leaves: &[LeafSpec], o: &KronOptions) -> Result<Self> {
        let mut parts: Vec<Part> = vec![];
        let mut out = Vec::with_capacity(leaves.len());
        for spec in leaves {
            let (batch, slice) = layers(spec)?;
            let merged = merged_shape(slice, o.merge_dims, o.target_merged_dim_size);
            let diag = factor_kinds(&merged, o);
            let blocks: Vec<Vec<usize>> = merged
                .iter()
                .zip(&diag)
                .map(|(&d, &dg)| block_lengths(d, if dg { None } else { o.block_size }))
                .collect();
            let counts: Vec<usize> = blocks.iter().map(Vec::len).collect();
            let n_blocks: usize = counts.iter().product();
            let first = parts.len();
            let mut block_part = Vec::with_capacity(n_blocks);
            let mut shapes: Vec<(Vec<usize>, usize)> = vec![];
            for k in 0..n_blocks {
                let idx = grid_index(k, &counts);
                let shape: Vec<usize> = idx.iter().zip(&blocks).map(|(&i, b)| b[i]).collect();
                match shapes.iter_mut().position(|(s, _)| *s == shape) {
                    Some(p) => {
                        block_part.push((first + p, shapes[p].1));
                        shapes[p].1 += 1;
                    }
                    None => {
                        block_part.push((first + shapes.len(), 0));
                        shapes.push((shape, 1));
                    }
                }
            }
            let whole = n_blocks == 1;
            for (shape, count) in &shapes {
                let stacked = batch * count;
                let scanned = spec.scanned || !whole;
                let mut s = if scanned { vec![stacked] } else { vec![] };
                s.extend(shape);
                let path = if whole {
                    spec.path.clone()
                } else {
                    format!("{} (blocks {shape:?})", spec.path)
                };
                parts.push(Part {
                    spec: LeafSpec {
                        path,
                        shape: s,
                        scanned,
                        weight_decay: spec.weight_decay,
                    },
                    diag: diag.clone(),
                });
            }
            out.push(LeafLayout {
                batch,
                merged,
                blocks,
                block_part,
                parts: (first..parts.len()).collect(),
            });
        }
        let identity = out
            .iter()
            .zip(leaves)
            .all(|(ll, spec)| !ll.blocked() && parts[ll.parts[0]].spec.shape == spec.shape);
        let tag = (o.merge_dims.is_some() || o.block_size.is_some()).then(|| describe(o));
        Ok(Layout {
            leaves: out,
            specs: leaves.to_vec(),
            parts,
            identity,
            tag,
        })
    }

    /// The parts, in order: each leaf's in turn.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// The optimizer's leaf count.
    pub fn leaf_count(&self) -> usize {
        self.specs.len()
    }

    /// The parts of leaf `l` (indices into [`Layout::parts`]).
    pub fn parts_of(&self, l: usize) -> &[usize] {
        &self.leaves[l].parts
    }

    /// The options' description kept in saved states, `None` for the default layout.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// Per-leaf tensors (each leaf's shape) as per-part tensors.
    pub fn split(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        if self.identity {
            return Ok(xs.to_vec());
        }
        let mut out: Vec<Vec<Tensor>> = vec![vec![]; self.parts.len()];
        for (ll, x) in self.leaves.iter().zip(xs) {
            let mut shape = vec![ll.batch];
            shape.extend(&ll.merged);
            let x = x.reshape(shape)?;
            if !ll.blocked() {
                let p = ll.parts[0];
                out[p].push(x.reshape(self.parts[p].spec.shape.as_slice())?);
                continue;
            }
            let counts: Vec<usize> = ll.blocks.iter().map(Vec::len).collect();
            for (k, &(p, _)) in ll.block_part.iter().enumerate() {
                let mut b = x.clone();
                for (a, &i) in grid_index(k, &counts).iter().enumerate() {
                    let start: usize = ll.blocks[a][..i].iter().sum();
                    b = b.narrow(a + 1, start, ll.blocks[a][i])?;
                }
                out[p].push(b);
            }
        }
        out.into_iter()
            .zip(&self.parts)
            .map(|(ts, part)| {
                let t = if ts.len() == 1 {
                    ts.into_iter().next().expect("one")
                } else {
                    Tensor::cat(&ts, 0)?
                };
                Ok(t.reshape(part.spec.shape.as_slice())?)
            })
            .collect()
    }

    /// Per-part tensors back as per-leaf tensors of the leaves' shapes.
    pub fn join(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if self.identity {
            return Ok(parts);
        }
        self.leaves
            .iter()
            .zip(&self.specs)
            .map(|(ll, spec)| {
                if !ll.blocked() {
                    return Ok(parts[ll.parts[0]].reshape(spec.shape.as_slice())?);
                }
                // each part as its blocks, `(B, block…)` each
                let blocks: Vec<Tensor> = ll
                    .block_part
                    .iter()
                    .map(|&(p, j)| Ok(parts[p].narrow(0, j * ll.batch, ll.batch)?))
                    .collect::<Result<_>>()?;
                let counts: Vec<usize> = ll.blocks.iter().map(Vec::len).collect();
                let whole = assemble(&blocks, &counts, 0)?;
                Ok(whole.reshape(spec.shape.as_slice())?)
            })
            .collect()
    }
}

/// The row-major grid of `blocks` (`counts` per axis, axis 0 the batch) concatenated back
/// into one tensor, starting at grid axis `axis`.
fn assemble(blocks: &[Tensor], counts: &[usize], axis: usize) -> Result<Tensor> {
    if axis == counts.len() {
        return Ok(blocks[0].clone());
    }
    let stride: usize = counts[axis + 1..].iter().product();
    let rows = (0..counts[axis])
        .map(|i| assemble(&blocks[i * stride..], counts, axis + 1))
        .collect::<Result<Vec<_>>>()?;
    Ok(if rows.len() == 1 {
        rows.into_iter().next().expect("one")
    } else {
        Tensor::cat(&rows, axis + 1)?
    })
}

/// The layout options as a saved state records them.
fn describe(o: &KronOptions) -> String {
    format!(
        "mergeDims {}, targetMergedDimSize {}, blockSize {}",
        o.merge_dims.map_or("null".to_string(), |m| format!(
            "'{}'",
            crate::options::choice_name(m)
        )),
        o.target_merged_dim_size,
        o.block_size.map_or("null".to_string(), |b| b.to_string())
    )
}

/// The message of a state saved under another layout than `ours`.
pub(super) fn mismatch(saved: Option<&str>, ours: Option<&str>) -> PsgdError {
    let show =
        |t: Option<&str>| t.map_or("mergeDims null, blockSize null".to_string(), str::to_string);
    PsgdError::State(format!(
        "was saved with {}, this optimizer has {}: its factors follow those options \
         (mergeDims, targetMergedDimSize, blockSize), so load it with the ones it was saved \
         with",
        show(saved),
        show(ours)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// `'small'` and `'twoD'` give distributed-kron 2.0.0's merged shapes: the values below
    /// are what its `kron._merge_small_dims` (at targets 4096, 256, 64) and
    /// `pro._merge_dims` return for these shapes.
    #[test]
    fn merged_shapes_are_distributed_krons() {
        #[rustfmt::skip]
        let cases: &[(&[usize], [&[usize]; 4])] = &[
            // shape, [small 4096, small 256, small 64, twoD]
            (&[], [&[], &[], &[], &[]]),
            (&[1], [&[1], &[1], &[1], &[1]]),
            (&[5], [&[5], &[5], &[5], &[5]]),
            (&[4, 3], [&[12], &[12], &[12], &[4, 3]]),
            (&[2, 3, 4], [&[24], &[24], &[24], &[6, 4]]),
            (&[1, 4, 1], [&[4], &[4], &[4], &[4]]),
            (&[3, 3, 64, 128], [&[576, 128], &[576, 128], &[9, 64, 128], &[576, 128]]),
            (&[64, 3, 3, 3], [&[1728], &[1728], &[64, 27], &[64, 27]]),
            (&[512, 512], [&[512, 512], &[512, 512], &[512, 512], &[512, 512]]),
            (&[8, 8, 8, 8], [&[4096], &[64, 64], &[64, 64], &[64, 64]]),
            (&[7, 5, 3, 2], [&[210], &[210], &[210], &[7, 30]]),
            (&[4096, 2], [&[8192], &[4096, 2], &[4096, 2], &[4096, 2]]),
            (&[1, 1, 8], [&[8], &[8], &[8], &[8]]),
            (&[16, 16, 16, 16, 16], [&[256, 4096], &[16, 256, 256], &[16, 16, 16, 16, 16], &[256, 4096]]),
            (&[128, 4, 32], [&[16384], &[128, 128], &[128, 128], &[128, 128]]),
            (&[2, 1], [&[2], &[2], &[2], &[2]]),
            (&[3, 1, 5], [&[15], &[15], &[15], &[3, 5]]),
            (&[10000, 3], [&[30000], &[10000, 3], &[10000, 3], &[10000, 3]]),
            (&[8192, 8192], [&[8192, 8192], &[8192, 8192], &[8192, 8192], &[8192, 8192]]),
        ];
        for (shape, want) in cases {
            for (k, target) in [4096, 256, 64].into_iter().enumerate() {
                let got = merged_shape(shape, Some(MergeDims::Small), target);
                assert_eq!(got, want[k], "'small' {shape:?} at {target}");
            }
            let got = merged_shape(shape, Some(MergeDims::TwoD), 4096);
            assert_eq!(got, want[3], "'twoD' {shape:?}");
            assert_eq!(merged_shape(shape, None, 4096), shape.to_vec());
        }
    }

    /// A leaf with many axes is merged without trying every grouping (no hang), and the
    /// merged sizes keep every element.
    #[test]
    fn many_axes_merge_quickly() {
        let shape = vec![2usize; 40];
        let merged = merged_shape(&shape, Some(MergeDims::Small), 4096);
        assert_eq!(
            merged.iter().map(|&d| d as f64).product::<f64>(),
            2f64.powi(40)
        );
        assert!(
            merged.iter().all(|&d| d == 4096 || d < 4096 * 8),
            "{merged:?}"
        );
        // the exhaustive search and the dynamic programme agree where both run
        for shape in [vec![3, 5, 7, 11, 2, 2, 9], vec![16, 16, 16, 16, 16, 16]] {
            for target in [64, 256, 4096] {
                let groups = merge_small_groups(&shape, target);
                let total = |g: &[usize]| {
                    let mut at = 0;
                    g.iter()
                        .map(|&n| {
                            at += n;
                            merge_loss(shape[at - n..at].iter().product(), target)
                        })
                        .sum::<f64>()
                };
                // the same least loss as every other grouping of at most 2 splits
                let n = shape.len();
                for a in 1..n {
                    for b in a..=n {
                        let alt: Vec<usize> =
                            [a, b - a, n - b].into_iter().filter(|&g| g > 0).collect();
                        assert!(total(&groups) <= total(&alt) + 1e-9, "{shape:?} {alt:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn block_lengths_cut_long_axes() {
        assert_eq!(block_lengths(10, Some(4)), vec![4, 4, 2]);
        assert_eq!(block_lengths(8, Some(4)), vec![4, 4]);
        assert_eq!(block_lengths(4, Some(4)), vec![4]);
        assert_eq!(block_lengths(3, Some(256)), vec![3]);
        assert_eq!(block_lengths(257, Some(256)), vec![256, 1]);
        assert_eq!(block_lengths(9, None), vec![9]);
    }

    fn leaf(path: &str, shape: &[usize], scanned: bool) -> LeafSpec {
        LeafSpec {
            path: path.into(),
            shape: shape.to_vec(),
            scanned,
            weight_decay: true,
        }
    }

    /// Splitting leaves into parts and joining them back gives the leaves bit for bit, for
    /// merged, blocked (ragged last blocks), scanned, diagonal and 0-d leaves; the parts
    /// have the shapes the layout promises.
    #[test]
    fn parts_round_trip() {
        let leaves = vec![
            leaf("a", &[10, 7], false),
            leaf("b", &[3, 2, 3, 4], true),
            leaf("c", &[], false),
            leaf("d", &[9], false),
            leaf("e", &[2, 3, 4], false),
            leaf("f", &[5, 4, 1], false),
        ];
        for (merge, bs) in [
            (None, Some(4)),
            (Some(MergeDims::TwoD), Some(4)),
            (Some(MergeDims::Small), Some(3)),
            (Some(MergeDims::TwoD), None),
            (None, Some(256)),
        ] {
            let o = KronOptions {
                merge_dims: merge,
                block_size: bs,
                target_merged_dim_size: 8,
                ..Default::default()
            };
            let layout = Layout::new(&leaves, &o).unwrap();
            let xs: Vec<Tensor> = leaves
                .iter()
                .map(|l| {
                    let n: usize = l.shape.iter().product();
                    Tensor::arange(0f32, n as f32, &Device::Cpu)
                        .unwrap()
                        .reshape(l.shape.as_slice())
                        .unwrap()
                })
                .collect();
            let parts = layout.split(&xs).unwrap();
            assert_eq!(parts.len(), layout.parts().len());
            for (t, p) in parts.iter().zip(layout.parts()) {
                assert_eq!(t.dims(), p.spec.shape.as_slice(), "{merge:?} {bs:?}");
                let block: &[usize] = if p.spec.scanned {
                    &p.spec.shape[1..]
                } else {
                    &p.spec.shape
                };
                if let Some(bs) = bs {
                    for (&d, &dg) in block.iter().zip(&p.diag) {
                        assert!(dg || d <= bs, "{merge:?} {bs}: {:?}", p.spec);
                    }
                }
            }
            let back = layout.join(parts).unwrap();
            for (x, y) in xs.iter().zip(&back) {
                assert_eq!(x.dims(), y.dims());
                let (x, y) = (
                    x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert_eq!(x, y, "{merge:?} {bs:?}");
            }
            // the elements are all there once
            let total: usize = layout
                .parts()
                .iter()
                .map(|p| p.spec.shape.iter().product::<usize>())
                .sum();
            let want: usize = leaves
                .iter()
                .map(|l| l.shape.iter().product::<usize>())
                .sum();
            assert_eq!(total, want);
        }
        // `[10, 7]` with blocks of 4: blocks 4×4 (×2), 4×3 (×2), 2×4, 2×3, stacked per shape
        let o = KronOptions {
            block_size: Some(4),
            ..Default::default()
        };
        let layout = Layout::new(&leaves[..1], &o).unwrap();
        let shapes: Vec<_> = layout
            .parts()
            .iter()
            .map(|p| p.spec.shape.clone())
            .collect();
        assert_eq!(
            shapes,
            vec![vec![2, 4, 4], vec![2, 4, 3], vec![1, 2, 4], vec![1, 2, 3]]
        );
        // the default layout is the identity, and states carry no layout tag
        let plain = Layout::new(&leaves, &KronOptions::default()).unwrap();
        assert!(plain.identity && plain.tag().is_none());
        let t = Tensor::zeros((10, 7), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(plain.split(&[t]).unwrap()[0].dims(), &[10, 7]);
    }
}
