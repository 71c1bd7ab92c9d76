//! Fused, multithreaded float32 passes over long vectors on the CPU.
//!
//! XMat and LRA spend their time in elementwise maps and thin reductions over vectors as
//! long as the whole parameter count. As candle ops, each such map is a separate
//! single-pass loop that allocates (and page-faults in) a fresh tensor, so a step costs
//! dozens of passes over memory. Here one pass computes a whole expression per element
//! (or per row of a tall `n × r` matrix), in parallel chunks, and writes only the results
//! that are kept.
//!
//! The kernels work on [`Flat`] host views, which [`with_host`] gives only for contiguous
//! float32 CPU tensors; for anything else it returns `None` and the caller takes its
//! candle-op path, so other devices and dtypes keep working unchanged.
//!
//! Reductions are combined in a fixed order (per task, then tasks in index order), so a
//! result does not depend on how the tasks were scheduled.

use candle_core::{Storage, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// Rows per parallel task: enough work to amortise scheduling, while a task's slices of a
/// few vectors (or of an `n × 10` matrix) still fit in the L2 cache.
const TASK_ROWS: usize = 8192;

/// A float32 vector on the host: the contents of one tensor, or of several tensors read
/// one after the other (a list of leaves as one flattened parameter vector).
#[derive(Debug, Clone)]
pub struct Flat<'a> {
    pieces: Vec<&'a [f32]>,
    /// Where each piece starts in the flat vector, then its total length.
    starts: Vec<usize>,
}

impl<'a> Flat<'a> {
    fn new(pieces: Vec<&'a [f32]>) -> Self {
        let mut starts = Vec::with_capacity(pieces.len() + 1);
        let mut at = 0;
        starts.push(0);
        for p in &pieces {
            at += p.len();
            starts.push(at);
        }
        Flat { pieces, starts }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `s..e`: borrowed when they lie in one piece, else gathered into `scratch`.
    pub fn range<'s>(&'s self, s: usize, e: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        assert!(
            s <= e && e <= self.len(),
            "range {s}..{e} of {}",
            self.len()
        );
        // the piece holding element s: the last start <= s (skipping empty pieces)
        let first = self.starts.partition_point(|&st| st <= s).saturating_sub(1);
        if first < self.pieces.len() && e <= self.starts[first + 1] {
            let off = self.starts[first];
            return &self.pieces[first][s - off..e - off];
        }
        scratch.clear();
        let mut k = first;
        while scratch.len() < e - s {
            let off = self.starts[k];
            let lo = (s + scratch.len()) - off;
            let hi = (e - off).min(self.pieces[k].len());
            scratch.extend_from_slice(&self.pieces[k][lo..hi]);
            k += 1;
        }
        scratch
    }

    /// Element `i`.
    pub fn get(&self, i: usize) -> f32 {
        let k = self.piece_of(i);
        self.pieces[k][i - self.starts[k]]
    }

    /// The index of the piece (tensor) holding element `i`.
    pub fn piece_of(&self, i: usize) -> usize {
        assert!(i < self.len(), "element {i} of {}", self.len());
        // the last start <= i, which skips the empty pieces starting there too
        self.starts.partition_point(|&st| st <= i) - 1
    }
}

impl<'a> From<&'a [f32]> for Flat<'a> {
    fn from(x: &'a [f32]) -> Self {
        Flat::new(vec![x])
    }
}

/// Runs `f` on host views of `groups`, each group of tensors read as one flat vector
/// (in order, each tensor flattened). Returns `None`, without calling `f`, unless every
/// tensor is a contiguous float32 tensor on the CPU.
pub fn with_host<R>(groups: &[&[Tensor]], f: impl FnOnce(&[Flat<'_>]) -> R) -> Option<R> {
    let guards: Vec<Vec<_>> = groups
        .iter()
        .map(|g| g.iter().map(|t| t.storage_and_layout()).collect())
        .collect();
    let mut flats = Vec::with_capacity(groups.len());
    for group in &guards {
        let mut pieces = Vec::with_capacity(group.len());
        for (storage, layout) in group {
            let Storage::Cpu(cpu) = &**storage else {
                return None;
            };
            let (s, e) = layout.contiguous_offsets()?;
            pieces.push(&cpu.as_slice::<f32>().ok()?[s..e]);
        }
        flats.push(Flat::new(pieces));
    }
    Some(f(&flats))
}

/// Splits `O` output buffers into per-task chunks of `TASK_ROWS` rows, task by task.
fn task_chunks<T, const O: usize>(
    outs: [&mut [T]; O],
    widths: [usize; O],
    tasks: usize,
) -> Vec<[&mut [T]; O]> {
    let mut k = 0;
    let mut iters = outs.map(|v| {
        let step = TASK_ROWS * widths[k].max(1);
        k += 1;
        v.chunks_mut(step).collect::<Vec<_>>().into_iter()
    });
    (0..tasks)
        .map(|_| iters.each_mut().map(|it| it.next().unwrap_or_default()))
        .collect()
}

/// One parallel pass over rows `0..n`: `f` gets a range of rows and, for each output `o`,
/// its rows there (`widths[o]` elements per row), and returns a partial result; the
/// partials are combined with `combine` in row order, starting from `init`. Returns the
/// outputs (`n × widths[o]` elements, zero where `f` does not write) and the combination.
pub fn map_fold_rows<const O: usize, A: Send>(
    n: usize,
    widths: [usize; O],
    init: A,
    f: impl Fn(Range<usize>, [&mut [f32]; O]) -> A + Sync,
    combine: impl Fn(A, A) -> A,
) -> ([Vec<f32>; O], A) {
    // zeroed allocations come straight from the kernel, so pages are first touched (and
    // faulted in) by the parallel writers rather than by one memset
    let mut outs: [Vec<f32>; O] = widths.map(|w| vec![0f32; n * w]);
    let tasks = n.div_ceil(TASK_ROWS);
    let chunks = task_chunks(outs.each_mut().map(|v| v.as_mut_slice()), widths, tasks);
    let parts: Vec<A> = chunks
        .into_par_iter()
        .enumerate()
        .map(|(t, c)| f(t * TASK_ROWS..((t + 1) * TASK_ROWS).min(n), c))
        .collect();
    (outs, parts.into_iter().fold(init, combine))
}

/// [`map_fold_rows`] without a reduction.
pub fn map_rows<const O: usize>(
    n: usize,
    widths: [usize; O],
    f: impl Fn(Range<usize>, [&mut [f32]; O]) + Sync,
) -> [Vec<f32>; O] {
    map_fold_rows(n, widths, (), f, |_, _| ()).0
}

/// [`map_fold_rows`] without outputs: a parallel reduction over rows `0..n`.
pub fn fold_rows<A: Send>(
    n: usize,
    init: A,
    f: impl Fn(Range<usize>) -> A + Sync,
    combine: impl Fn(A, A) -> A,
) -> A {
    map_fold_rows(n, [], init, |r, []| f(r), combine).1
}

/// Rows `rows` of each input, `widths[k]` elements per row: borrowed, or gathered into the
/// matching scratch buffer when they span several tensors.
pub fn gather_rows<'s, const I: usize>(
    inputs: &[&'s Flat<'_>; I],
    widths: [usize; I],
    rows: Range<usize>,
    scratch: &'s mut [Vec<f32>; I],
) -> [&'s [f32]; I] {
    let mut sc = scratch.iter_mut();
    std::array::from_fn(|k| {
        let w = widths[k];
        let buf = sc.next().expect("one buffer per input");
        inputs[k].range(rows.start * w, rows.end * w, buf)
    })
}

/// The length shared by all inputs.
fn common_len<const I: usize>(inputs: &[&Flat<'_>; I]) -> usize {
    let n = inputs.first().map_or(0, |x| x.len());
    assert!(
        inputs.iter().all(|x| x.len() == n),
        "inputs of different lengths"
    );
    n
}

/// A task's chunks of each output in a mirrored pass: one from the first half, and its
/// mirror image from the second.
type MirrorChunks<'o, const O: usize> = ([&'o mut [f32]; O], [&'o mut [f32]; O]);

/// One parallel pass over the mirrored pairs `(i, j = n-1-i)` of `I` inputs of length
/// `n`, for expressions that read a vector and its reversal (`flip`) together, without
/// materialising the reversal. `f(x_i, x_j, i == j, acc)` gets the inputs at both ends of
/// a pair and the task's partial reduction, and returns the outputs at `i` and at `j`
/// (for the middle element of an odd `n`, only the first are kept), so work the two
/// share is done once. Returns the `O` outputs (length `n`) and the partial reductions
/// combined in a fixed order, starting from `init`.
pub fn mirror_map_fold<const I: usize, const O: usize, A: Send + Sync + Clone>(
    inputs: [&Flat<'_>; I],
    init: A,
    f: impl Fn(&[f32; I], &[f32; I], bool, &mut A) -> ([f32; O], [f32; O]) + Sync,
    combine: impl Fn(A, A) -> A,
) -> ([Vec<f32>; O], A) {
    let n = common_len(&inputs);
    let half = n / 2;
    let mut outs: [Vec<f32>; O] = std::array::from_fn(|_| vec![0f32; n]);
    // per output: the first half in chunks, the middle, the second half in chunks from its
    // end, so that task t's two chunks are mirror images of each other
    let mut los = Vec::with_capacity(O);
    let mut mids = Vec::with_capacity(O);
    let mut his = Vec::with_capacity(O);
    for o in outs.iter_mut() {
        let (lo, rest) = o.split_at_mut(half);
        let (mid, hi) = rest.split_at_mut(n - 2 * half);
        los.push(lo.chunks_mut(TASK_ROWS).collect::<Vec<_>>().into_iter());
        his.push(hi.rchunks_mut(TASK_ROWS).collect::<Vec<_>>().into_iter());
        mids.push(mid);
    }
    let tasks = half.div_ceil(TASK_ROWS);
    let chunks: Vec<MirrorChunks<O>> = (0..tasks)
        .map(|_| {
            let mut lo = los.iter_mut();
            let mut hi = his.iter_mut();
            (
                std::array::from_fn(|_| lo.next().and_then(Iterator::next).unwrap_or_default()),
                std::array::from_fn(|_| hi.next().and_then(Iterator::next).unwrap_or_default()),
            )
        })
        .collect();
    let parts: Vec<A> = chunks
        .into_par_iter()
        .enumerate()
        .map(|(t, (lo, hi))| {
            let (s, e) = (t * TASK_ROWS, ((t + 1) * TASK_ROWS).min(half));
            let len = e - s;
            let mut sl: [Vec<f32>; I] = std::array::from_fn(|_| Vec::new());
            let mut sh: [Vec<f32>; I] = std::array::from_fn(|_| Vec::new());
            // every slice cut to `len` up front, so the loop below needs no bounds checks
            let xl = gather_rows(&inputs, [1; I], s..e, &mut sl).map(|x| &x[..len]);
            let xh = gather_rows(&inputs, [1; I], n - e..n - s, &mut sh).map(|x| &x[..len]);
            let lo = lo.map(|x| &mut x[..len]);
            let hi = hi.map(|x| &mut x[..len]);
            let mut acc = init.clone();
            for k in 0..len {
                let m = len - 1 - k;
                let xi: [f32; I] = std::array::from_fn(|q| xl[q][k]);
                let xj: [f32; I] = std::array::from_fn(|q| xh[q][m]);
                let (yi, yj) = f(&xi, &xj, false, &mut acc);
                for o in 0..O {
                    lo[o][k] = yi[o];
                    hi[o][m] = yj[o];
                }
            }
            acc
        })
        .collect();
    let mut acc = init.clone();
    for p in parts {
        acc = combine(acc, p);
    }
    if n % 2 == 1 {
        let x: [f32; I] = std::array::from_fn(|q| inputs[q].get(half));
        let mut last = init;
        let (y, _) = f(&x, &x, true, &mut last);
        for (mid, v) in mids.iter_mut().zip(y) {
            mid[0] = v;
        }
        acc = combine(acc, last);
    }
    (outs, acc)
}

/// [`mirror_map_fold`] without a reduction.
pub fn mirror_map<const I: usize, const O: usize>(
    inputs: [&Flat<'_>; I],
    f: impl Fn(&[f32; I], &[f32; I], bool) -> ([f32; O], [f32; O]) + Sync,
) -> [Vec<f32>; O] {
    mirror_map_fold(inputs, (), |xi, xj, mid, _| f(xi, xj, mid), |_, _| ()).0
}

/// [`mirror_map_fold`] without outputs: `f(x_i, x_j, i == j, acc)` adds the pair
/// `(i, j = n-1-i)` (the middle element of an odd `n` once) to a task's partial reduction.
pub fn mirror_fold<const I: usize, A: Send + Sync + Clone>(
    inputs: [&Flat<'_>; I],
    init: A,
    f: impl Fn(&[f32; I], &[f32; I], bool, &mut A) + Sync,
    combine: impl Fn(A, A) -> A,
) -> A {
    let g = |xi: &[f32; I], xj: &[f32; I], mid: bool, acc: &mut A| {
        f(xi, xj, mid, acc);
        ([], [])
    };
    mirror_map_fold(inputs, init, g, combine).1
}

/// One parallel pass computing `O` outputs per element from `I` inputs of one length:
/// `f` gets the inputs at an element and returns the outputs there.
pub fn zip_map<const I: usize, const O: usize>(
    inputs: [&Flat<'_>; I],
    f: impl Fn([f32; I]) -> [f32; O] + Sync,
) -> [Vec<f32>; O] {
    zip_map_checked(inputs, f, false).0
}

/// [`zip_map`], and with `check` whether every output is finite, tested on each block of
/// outputs while it is still in registers (no second pass over memory).
pub fn zip_map_checked<const I: usize, const O: usize>(
    inputs: [&Flat<'_>; I],
    f: impl Fn([f32; I]) -> [f32; O] + Sync,
    check: bool,
) -> ([Vec<f32>; O], bool) {
    let (outs, finite, _) = zip_map_summed(inputs, f, check, false);
    (outs, finite)
}

/// What [`zip_map_summed`] sums over a pass besides its outputs: the sum of squares and
/// the largest `|value|` of the first input, and the sum of squares of the first output,
/// each block's in float32 and the blocks' in float64, in row order.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PassSums {
    /// `Σ x²` over the first input.
    pub in_sq: f64,
    /// `max |x|` over the first input (NaN when one is).
    pub in_max: f32,
    /// `Σ y²` over the first output.
    pub out_sq: f64,
}

impl PassSums {
    fn add(self, o: PassSums) -> PassSums {
        PassSums {
            in_sq: self.in_sq + o.in_sq,
            in_max: max_nan(self.in_max, o.in_max),
            out_sq: self.out_sq + o.out_sq,
        }
    }

    /// The sums of one block, in independent lanes so that they vectorise.
    fn of_block(x: &[f32], y: &[f32]) -> PassSums {
        let (mut sx, mut sy, mut mx) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        // `f32::max` skips NaN: a count of NaNs beside it makes the max NaN when one is
        let mut nan = [0f32; 8];
        let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
        let (xr, yr) = (xc.remainder(), yc.remainder());
        for (a, b) in xc.zip(yc) {
            for k in 0..8 {
                sx[k] += a[k] * a[k];
                sy[k] += b[k] * b[k];
                mx[k] = mx[k].max(a[k].abs());
                nan[k] += a[k].is_nan() as u8 as f32;
            }
        }
        for (&a, &b) in xr.iter().zip(yr) {
            sx[0] += a * a;
            sy[0] += b * b;
            mx[0] = mx[0].max(a.abs());
            nan[0] += a.is_nan() as u8 as f32;
        }
        let sum = |v: [f32; 8]| v.iter().map(|&v| v as f64).sum::<f64>();
        let max = mx.iter().fold(0f32, |m, &v| m.max(v));
        PassSums {
            in_sq: sum(sx),
            in_max: if sum(nan) > 0.0 { f32::NAN } else { max },
            out_sq: sum(sy),
        }
    }
}

/// The larger of two values, NaN when either is.
fn max_nan(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// [`zip_map_checked`], and with `sums` the [`PassSums`] of the pass, taken on each block
/// while it is in registers (no second pass over memory); default sums without.
pub fn zip_map_summed<const I: usize, const O: usize>(
    inputs: [&Flat<'_>; I],
    f: impl Fn([f32; I]) -> [f32; O] + Sync,
    check: bool,
    sums: bool,
) -> ([Vec<f32>; O], bool, PassSums) {
    let bad = std::sync::atomic::AtomicBool::new(false);
    /// Elements per block: the block's inputs and outputs live in local arrays, which the
    /// compiler knows alias nothing, so it vectorises `f` across the block (over slices of
    /// the tensors it cannot rule out overlap and stays scalar, several times slower).
    const B: usize = 64;
    let n = common_len(&inputs);
    // Uninitialised outputs, unlike `map_rows`' zeroed ones: the allocator then hands back
    // memory it already has, as it does for candle's own ops, where a zeroed allocation
    // this large is fresh pages, each faulted in on first write (costly in a VM).
    let mut outs: [Vec<f32>; O] = std::array::from_fn(|_| Vec::with_capacity(n));
    let spare = outs.each_mut().map(|v| &mut v.spare_capacity_mut()[..n]);
    let chunks = task_chunks(spare, [1; O], n.div_ceil(TASK_ROWS));
    let partial: Vec<PassSums> = chunks
        .into_par_iter()
        .enumerate()
        .map(|(t, mut outs)| {
            let mut acc = PassSums::default();
            let r = t * TASK_ROWS..((t + 1) * TASK_ROWS).min(n);
            let len = r.len();
            let mut sc: [Vec<f32>; I] = std::array::from_fn(|_| Vec::new());
            let xs = gather_rows(&inputs, [1; I], r, &mut sc);
            let mut at = 0;
            while at < len {
                let m = B.min(len - at);
                let mut x = [[0f32; B]; I];
                for (xq, s) in x.iter_mut().zip(&xs) {
                    xq[..m].copy_from_slice(&s[at..at + m]);
                }
                let mut y = [[0f32; B]; O];
                for k in 0..B {
                    let v = f(std::array::from_fn(|q| x[q][k]));
                    for o in 0..O {
                        y[o][k] = v[o];
                    }
                }
                // a branch-free fold over the block's outputs, so it vectorises
                if check
                    && y.iter()
                        .any(|yo| yo[..m].iter().fold(false, |h, v| h | !v.is_finite()))
                {
                    bad.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                if let (true, Some(xi), Some(yo)) = (sums, x.first(), y.first()) {
                    acc = acc.add(PassSums::of_block(&xi[..m], &yo[..m]));
                }
                for (o, yo) in outs.iter_mut().zip(&y) {
                    for (d, &v) in o[at..at + m].iter_mut().zip(&yo[..m]) {
                        d.write(v);
                    }
                }
                at += m;
            }
            acc
        })
        .collect();
    for v in &mut outs {
        // SAFETY: the tasks' chunks cover `0..n` of every output, and each task wrote
        // every element of its chunks (`at` runs over all of `0..len`).
        unsafe { v.set_len(n) };
    }
    let total = partial.into_iter().fold(PassSums::default(), PassSums::add);
    (outs, !bad.into_inner(), total)
}

/// The sum of `f(x)` over the elements, each term computed in float32 and accumulated in
/// float64.
fn sum_by(x: &Flat<'_>, f: impl Fn(f32) -> f32 + Sync) -> f64 {
    fold_rows(
        x.len(),
        0.0,
        |r| {
            let mut sc = vec![];
            let x = x.range(r.start, r.end, &mut sc);
            // independent lanes, so the additions pipeline (and vectorise)
            let mut lanes = [0f64; 8];
            let mut blocks = x.chunks_exact(8);
            for b in &mut blocks {
                for (l, &v) in lanes.iter_mut().zip(b) {
                    *l += f(v) as f64;
                }
            }
            let tail: f64 = blocks.remainder().iter().map(|&v| f(v) as f64).sum();
            lanes.iter().sum::<f64>() + tail
        },
        |a, b| a + b,
    )
}

/// The sum of squares, accumulated in float64.
pub fn sum_sq(x: &Flat<'_>) -> f64 {
    sum_by(x, |v| v * v)
}

/// The sum of absolute values, accumulated in float64.
pub fn sum_abs(x: &Flat<'_>) -> f64 {
    sum_by(x, f32::abs)
}

/// The first index whose element satisfies `pred`, by a parallel scan of the whole vector.
pub fn position(x: &Flat<'_>, pred: impl Fn(f32) -> bool + Sync) -> Option<usize> {
    const BLOCK: usize = 64;
    fold_rows(
        x.len(),
        None,
        |r| {
            let mut sc = vec![];
            let xs = x.range(r.start, r.end, &mut sc);
            // the usual answer is "none": test whole blocks without branching per element
            // (so the test vectorises), and search only a block that has a hit
            xs.chunks(BLOCK).enumerate().find_map(|(b, blk)| {
                blk.iter()
                    .fold(false, |hit, &v| hit | pred(v))
                    .then(|| blk.iter().position(|&v| pred(v)))
                    .flatten()
                    .map(|k| r.start + b * BLOCK + k)
            })
        },
        |a, b| a.or(b),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pass_sums_take_squares_and_the_largest_magnitude_nan_first() {
        let x: Vec<f32> = (0..21).map(|i| i as f32 - 10.0).collect();
        let y: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
        let s = PassSums::of_block(&x, &y);
        let sq: f64 = x.iter().map(|&v| (v * v) as f64).sum();
        assert_eq!((s.in_sq, s.out_sq, s.in_max), (sq, 4.0 * sq, 10.0));
        let mut z = x.clone();
        z[13] = f32::NEG_INFINITY;
        assert_eq!(PassSums::of_block(&z, &y).in_max, f32::INFINITY);
        z[20] = f32::NAN;
        assert!(PassSums::of_block(&z, &y).in_max.is_nan());
        let a = PassSums::of_block(&x, &y);
        assert!(a.add(PassSums::of_block(&z, &y)).in_max.is_nan());
        assert_eq!(a.add(a).in_sq, 2.0 * sq);
    }

    #[test]
    fn flat_ranges_cross_pieces() {
        let a = [1f32, 2., 3.];
        let b: [f32; 0] = [];
        let c = [4f32, 5.];
        let f = Flat::new(vec![&a, &b, &c]);
        assert_eq!(f.len(), 5);
        let mut sc = vec![];
        assert_eq!(f.range(0, 5, &mut sc), &[1., 2., 3., 4., 5.]);
        assert_eq!(f.range(1, 3, &mut sc), &[2., 3.]);
        assert_eq!(f.range(3, 5, &mut sc), &[4., 5.]);
        assert_eq!(f.range(2, 4, &mut sc), &[3., 4.]);
        assert_eq!(f.range(3, 3, &mut sc), &[] as &[f32]);
        assert_eq!(
            (0..5).map(|i| f.get(i)).collect::<Vec<_>>(),
            [1., 2., 3., 4., 5.]
        );
    }

    /// The pieces as separate tensors, and the whole vector as one.
    fn as_tensors(all: &[f32], parts: &[Vec<f32>]) -> (Vec<Tensor>, [Tensor; 1]) {
        let ts = parts
            .iter()
            .map(|p| Tensor::new(p.as_slice(), &Device::Cpu).unwrap())
            .collect();
        (ts, [Tensor::new(all, &Device::Cpu).unwrap()])
    }

    fn pieces(n: usize) -> (Vec<f32>, Vec<Vec<f32>>) {
        let all: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 - 500.0).collect();
        // uneven pieces, one empty, so tasks straddle them
        let mut cuts = vec![0, 3.min(n), 3.min(n), (n / 3).max(3).min(n), n];
        cuts.dedup();
        let parts = cuts.windows(2).map(|w| all[w[0]..w[1]].to_vec()).collect();
        (all, parts)
    }

    #[test]
    fn mirror_passes_pair_each_element_with_its_mirror() {
        for n in [0, 1, 2, 5, TASK_ROWS * 2 + 1, TASK_ROWS * 3 + 10] {
            let (all, parts) = pieces(n);
            let (ts, one) = as_tensors(&all, &parts);
            let (outs, sum) = with_host(&[&ts, &one], |x| {
                mirror_map_fold(
                    [&x[0], &x[1]],
                    0f64,
                    |i, j, mid, acc| {
                        *acc += if mid {
                            i[0] as f64
                        } else {
                            (i[0] + j[0]) as f64
                        };
                        ([i[0] - 2.0 * j[1], i[1]], [j[0] - 2.0 * i[1], j[1]])
                    },
                    |a, b| a + b,
                )
            })
            .unwrap();
            let want: Vec<f32> = (0..n).map(|i| all[i] - 2.0 * all[n - 1 - i]).collect();
            assert_eq!(outs[0], want, "n = {n}");
            assert_eq!(outs[1], all);
            assert_eq!(sum, all.iter().map(|&v| v as f64).sum::<f64>());
            let sq = with_host(&[&ts], |x| sum_sq(&x[0])).unwrap();
            assert_eq!(sq, all.iter().map(|&v| (v * v) as f64).sum::<f64>());
        }
    }

    #[test]
    fn elementwise_passes_read_across_pieces() {
        for n in [0, 1, 5, TASK_ROWS * 2 + 1, TASK_ROWS * 3 + 10] {
            let (all, parts) = pieces(n);
            let (ts, one) = as_tensors(&all, &parts);
            with_host(&[&ts, &one], |x| {
                let [s, d] = zip_map([&x[0], &x[1]], |[a, b]| [a + b, a - 2.0 * b]);
                assert_eq!(s, all.iter().map(|v| v + v).collect::<Vec<_>>());
                assert_eq!(d, all.iter().map(|v| v - 2.0 * v).collect::<Vec<_>>());
                let abs: f64 = all.iter().map(|v| v.abs() as f64).sum();
                assert_eq!(sum_abs(&x[0]), abs);
                // every element in turn is the first hit, and it is found in its piece
                for i in (0..n).step_by(n / 7 + 1).chain(n.checked_sub(1)) {
                    let at = position(&x[0], |v| v == all[i]);
                    assert_eq!(at, all.iter().position(|&v| v == all[i]));
                    let k = x[0].piece_of(i);
                    let before: usize = parts[..k].iter().map(Vec::len).sum();
                    assert!(before <= i && i < before + parts[k].len());
                }
                assert_eq!(position(&x[0], f32::is_nan), None);
            })
            .unwrap();
        }
    }

    #[test]
    fn row_passes_cover_every_row_once() {
        let n = TASK_ROWS * 2 + 3;
        let ([a, b], rows) = map_fold_rows(
            n,
            [1, 3],
            0usize,
            |r, [a, b]| {
                for (k, i) in r.clone().enumerate() {
                    a[k] = i as f32;
                    b[3 * k..3 * k + 3].fill(-(i as f32));
                }
                r.len()
            },
            |x, y| x + y,
        );
        assert_eq!(rows, n);
        assert!(a.iter().enumerate().all(|(i, &v)| v == i as f32));
        assert!(b.iter().enumerate().all(|(i, &v)| v == -((i / 3) as f32)));
    }

    #[test]
    fn only_contiguous_f32_cpu_tensors_are_viewed() {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap();
        assert!(with_host(&[std::slice::from_ref(&t)], |_| ()).is_some());
        let strided = t.reshape((2, 3)).unwrap().t().unwrap();
        assert!(with_host(&[&[strided]], |_| ()).is_none());
        let f64s = t.to_dtype(candle_core::DType::F64).unwrap();
        assert!(with_host(&[&[t, f64s]], |_| ()).is_none());
    }
}
