//! Sizes checked before anything is allocated: a leaf's element count in checked
//! arithmetic, and the memory an optimizer's state and step would need against what this
//! machine has. An allocation that fails aborts the process (Rust does not unwind on out
//! of memory), so a state too large for the machine must be refused before it is made,
//! and a state or step that would not fit the memory left now (a process limit such as
//! `ulimit -v`, or memory other programs hold) is refused before it starts: see
//! [`ensure_available`] and [`reserve`].

use crate::error::{PsgdError, Result};
use crate::transform::LeafSpec;

/// What one part of the state holds, for the estimate and the error naming it.
#[derive(Debug, Clone, PartialEq)]
pub struct StateSize {
    /// What it is, for the error: e.g. `"the factor of leaf 'w' (a 4096×4096 matrix)"`.
    pub what: String,
    /// The option that decides its size (e.g. `maxSizeTriangular`), if one does.
    pub option: Option<&'static str>,
    /// Its element count (float32 elements), in wide arithmetic so it cannot overflow.
    pub elems: u128,
}

/// The peak memory of a step measured for a large leaf, as a multiple of the leaf's bytes
/// (gradient copies, momentum, the preconditioned gradient and the fit's temporaries):
/// about 15× for Kron on a 1 GiB leaf. The estimate refuses what would certainly not fit.
const STEP_PEAK_PER_LEAF: u128 = 16;

/// The element count of `shape`, or a `RangeError` naming the leaf when it overflows or is
/// too large to address in bytes.
pub fn leaf_elems(leaf: &LeafSpec) -> Result<usize> {
    let n = leaf
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n.checked_mul(8).is_some_and(|b| b <= isize::MAX as usize));
    n.ok_or_else(|| {
        PsgdError::Size(format!(
            "params '{}' has shape {:?}, whose element count overflows",
            leaf.path, leaf.shape
        ))
    })
}

/// Checks every leaf's element count (see [`leaf_elems`]).
pub fn check_leaf_sizes(leaves: &[LeafSpec]) -> Result<()> {
    leaves.iter().try_for_each(|l| leaf_elems(l).map(drop))
}

fn gib(bytes: u128) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// This machine's memory for the process: the smaller of the physical memory and the
/// cgroup's limit, when they can be read (Linux); `None` elsewhere.
pub fn memory_limit() -> Option<u128> {
    let mem_total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u128>().ok())
            .map(|kb| kb * 1024)
    });
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .filter_map(|s| s.trim().parse::<u128>().ok())
    .min();
    match (mem_total, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What an optimizer's memory comes to, from [`check_state_size`]: its state, and the
/// state plus one step's working memory (the new state and the temporaries).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryNeed {
    /// Bytes the state holds (factors and momentum).
    pub state: u128,
    /// Bytes a step allocates at its peak, the new state included.
    pub step: u128,
}

/// Refuses, with a `RangeError` naming the largest part and its option, a state (plus a
/// step's working memory) larger than `limit` bytes, or than the address space. Returns
/// what the state and a step need, for [`ensure_available`] and [`reserve`].
pub fn check_state_size(
    leaves: &[LeafSpec],
    parts: &[StateSize],
    momentum: bool,
    limit: Option<u128>,
) -> Result<MemoryNeed> {
    let leaf_bytes: Vec<u128> = leaves.iter().map(|l| l.numel() as u128 * 4).collect();
    let largest_leaf = leaf_bytes.iter().copied().max().unwrap_or(0);
    let state: u128 = parts.iter().map(|p| p.elems * 4).sum::<u128>()
        + if momentum { leaf_bytes.iter().sum() } else { 0 };
    let need = state + STEP_PEAK_PER_LEAF * largest_leaf;
    let address_space = isize::MAX as u128;
    let limit = limit.unwrap_or(address_space).min(address_space);
    if need <= limit {
        return Ok(MemoryNeed { state, step: need });
    }
    let by = |p: &&StateSize| p.elems;
    let culprit = match parts.iter().max_by_key(by) {
        // the state's own largest part, when it is most of the total
        Some(p) if p.elems * 4 * 2 >= need => format!(
            "{} needs {}{}",
            p.what,
            gib(p.elems * 4),
            p.option
                .map(|o| format!(" (set by option '{o}')"))
                .unwrap_or_default()
        ),
        _ => {
            let (i, _) = leaf_bytes
                .iter()
                .enumerate()
                .max_by_key(|(_, b)| **b)
                .unwrap_or((0, &0));
            format!(
                "params '{}' ({}) needs about {} for a step",
                leaves.get(i).map(|l| l.path.as_str()).unwrap_or("?"),
                gib(largest_leaf),
                gib(STEP_PEAK_PER_LEAF * largest_leaf)
            )
        }
    };
    Err(PsgdError::Size(format!(
        "{culprit}; the optimizer would need about {} in all, more than this machine's {}",
        gib(need),
        gib(limit)
    )))
}

/// Below this many bytes a state or step is not checked against the memory left: a
/// probe that small proves little (the allocator serves it from memory it holds), and
/// skipping it keeps small steps free of system calls.
const ENSURE_FROM: u128 = 64 << 20;

/// Memory that can be had now: the system's available memory (`MemAvailable`, Linux) and
/// what the cgroup's limit leaves (its limit less its usage), the smaller; `None` when
/// neither can be read.
pub fn memory_available() -> Option<u128> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let mem_available = read("/proc/meminfo").and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u128>().ok())
            .map(|kb| kb * 1024)
    });
    let num = |p: &str| read(p).and_then(|s| s.trim().parse::<u128>().ok());
    let cgroup = [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ]
    .iter()
    .filter_map(|(max, cur)| Some(num(max)?.saturating_sub(num(cur)?)))
    .min();
    match (mem_available, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The `RangeError` of [`ensure_available`] and [`reserve`].
fn refuse(what: &str, bytes: u128, why: &str) -> PsgdError {
    PsgdError::Size(format!(
        "{what} would need about {}, but {why}; nothing was allocated (free memory, raise the \
         process's memory limit, or choose options with a smaller state)",
        gib(bytes)
    ))
}

/// Refuses, with a `RangeError`, what would need `bytes` (`what` allocates them at its
/// peak, see [`MemoryNeed`]) when `available` (see [`memory_available`]) is less. Amounts
/// below 64 MiB are not checked, and `available` is not called for them.
pub fn ensure_available(
    bytes: u128,
    what: &str,
    available: impl FnOnce() -> Option<u128>,
) -> Result<()> {
    if bytes < ENSURE_FROM {
        return Ok(());
    }
    match available() {
        Some(a) if a < bytes => Err(refuse(
            what,
            bytes,
            &format!("only {} of memory is available now", gib(a)),
        )),
        _ => Ok(()),
    }
}

/// Refuses, with a `RangeError`, to start what allocates `bytes` at its peak when the
/// process cannot get that much address space now (a process limit such as `ulimit -v`,
/// or strict overcommit with memory in use): an allocation that failed halfway would abort
/// the process. The probe is one fallible allocation of `bytes`, freed at once and never
/// touched: a system call or two (about 15 µs), no memory. Amounts below 64 MiB are not
/// probed.
pub fn reserve(bytes: u128, what: &str) -> Result<()> {
    if bytes < ENSURE_FROM {
        return Ok(());
    }
    let fits = usize::try_from(bytes).ok().is_some_and(|n| {
        let mut probe = Vec::<u8>::new();
        let ok = probe.try_reserve_exact(n).is_ok();
        // kept opaque, or the compiler may drop an allocation nothing reads
        std::hint::black_box(&mut probe);
        ok
    });
    match fits {
        true => Ok(()),
        false => Err(refuse(
            what,
            bytes,
            "the process cannot allocate that much (a memory limit, e.g. ulimit -v?)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflowing_shapes_are_refused_naming_the_leaf() {
        let l = LeafSpec::new("w".to_string(), &[1 << 40, 1 << 40]);
        let e = leaf_elems(&l).unwrap_err();
        assert!(e.to_string().contains("params 'w'"), "{e}");
        assert_eq!(e.kind(), crate::ErrorKind::Range);
        assert_eq!(
            leaf_elems(&LeafSpec::new("b".to_string(), &[3, 0, 1 << 62])).unwrap(),
            0
        );
    }

    #[test]
    fn a_state_larger_than_the_limit_is_refused_naming_its_option() {
        let leaves = vec![LeafSpec::new("w".to_string(), &[10, 1 << 20])];
        let parts = vec![StateSize {
            what: "the factor of leaf 'w' (a 1048576×1048576 matrix)".into(),
            option: Some("maxSizeTriangular"),
            elems: 1 << 40,
        }];
        let e = check_state_size(&leaves, &parts, true, Some(64 << 30)).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("leaf 'w'") && m.contains("maxSizeTriangular"),
            "{m}"
        );
        assert!(m.contains("4096.0 GiB"), "{m}");
        // the same state fits a larger limit; a small one fits this one
        check_state_size(&leaves, &parts, true, Some(1 << 50)).unwrap();
        check_state_size(&leaves, &parts[..0], true, Some(64 << 30)).unwrap();
        // a huge leaf alone is named by its step's working memory
        let big = vec![LeafSpec::new("e".to_string(), &[1 << 30])];
        let m = check_state_size(&big, &[], true, Some(8 << 30))
            .unwrap_err()
            .to_string();
        assert!(m.contains("params 'e'") && m.contains("for a step"), "{m}");
    }

    #[test]
    fn a_state_or_step_that_does_not_fit_the_memory_left_is_refused() {
        // below the threshold nothing is read or probed
        ensure_available(1 << 20, "x", || panic!("not asked")).unwrap();
        reserve(1 << 20, "x").unwrap();
        // what fits is allowed; the probe of 1 GiB reserves address space only
        ensure_available(1 << 30, "a step", || Some(8 << 30)).unwrap();
        ensure_available(1 << 30, "a step", || None).unwrap();
        reserve(1 << 30, "a step").unwrap();
        // memory in use: less available than needed
        let e = ensure_available(4 << 30, "a kron state", || Some(1 << 30)).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Range);
        let m = e.to_string();
        assert!(
            m.contains("a kron state would need about 4.0 GiB") && m.contains("only 1.0 GiB"),
            "{m}"
        );
        // more than the address space cannot be reserved
        let m = reserve(u128::MAX / 2, "a step").unwrap_err().to_string();
        assert!(m.contains("cannot allocate"), "{m}");
        // the sizes the check of a state reports
        let leaves = vec![LeafSpec::new("w".to_string(), &[1024, 1024])];
        let parts = vec![StateSize {
            what: "f".into(),
            option: None,
            elems: 1 << 20,
        }];
        let need = check_state_size(&leaves, &parts, true, None).unwrap();
        let step = (8 << 20) + 16 * (4 << 20);
        assert_eq!(
            need,
            MemoryNeed {
                state: 8 << 20,
                step
            }
        );
    }
}
