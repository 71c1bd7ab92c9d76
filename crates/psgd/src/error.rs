//! One error type for every optimizer, with a kind that bindings map to `TypeError` or
//! `RangeError`.

/// Which JavaScript error class an error belongs to (the binding maps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Wrong type: a dtype, an unknown option, a value of the wrong kind.
    Type,
    /// Right type, bad value: a shape, NaN/Inf, an option out of range.
    Range,
    /// Anything else (internal candle errors, I/O).
    Other,
}

/// Errors raised by the PSGD optimizers.
#[derive(Debug, thiserror::Error)]
pub enum PsgdError {
    /// A leaf's shape differs from the one the optimizer was built for.
    #[error("{what} '{path}' has shape {got:?}, expected {expected:?}")]
    Shape {
        what: &'static str,
        path: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// A leaf's dtype is not a floating-point type the optimizer can use.
    #[error("{what} '{path}' has dtype {got}, expected a floating-point dtype (float32, bfloat16, float16, float64)")]
    Dtype {
        what: &'static str,
        path: String,
        got: String,
    },
    /// A leaf holds NaN or Inf.
    #[error("{what} '{path}' contains NaN or Inf")]
    NonFinite { what: &'static str, path: String },
    /// A step's update of a leaf came out NaN or Inf (with `allowNonFinite` off).
    /// The inputs were finite (they are checked first), so float32 overflowed inside the
    /// step; `cause` says where.
    #[error(
        "the updates of '{path}' would hold NaN or Inf: {cause}; the step was refused and \
         nothing changed (allowNonFinite: true lets such steps through)"
    )]
    NonFiniteUpdate { path: String, cause: String },
    /// An option has the wrong type or is unknown (`msg` continues the sentence).
    #[error("option '{name}' {msg}")]
    OptionType { name: String, msg: String },
    /// An option has a value out of its range (`msg` continues the sentence).
    #[error("option '{name}' {msg}")]
    OptionRange { name: String, msg: String },
    /// The number of leaves differs from the optimizer's.
    #[error("{what} has {got} leaves, expected {expected}")]
    LeafCount {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A saved state does not fit this optimizer.
    #[error("state: {0}")]
    State(String),
    /// A replayed random source was asked for a draw it does not have.
    #[error("random draw: {0}")]
    Draw(String),
    /// A size that cannot be allocated or counted: an element count that overflows, or a
    /// state larger than this machine's memory (the message names the leaf or option).
    #[error("{0}")]
    Size(String),
    /// An error from candle, without the backtrace candle attaches when `RUST_BACKTRACE`
    /// is set (see [`strip_backtrace`]).
    #[error(transparent)]
    Candle(candle_core::Error),
    /// An error raised again as it was, its class and message (see [`PsgdError::again`]).
    #[error("{msg}")]
    Again { kind: ErrorKind, msg: String },
}

/// `e` without its `WithBacktrace` layers: a backtrace in an error message tells a
/// JavaScript user nothing and makes messages differ between environments.
pub fn strip_backtrace(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => strip_backtrace(*inner),
        E::Context { inner, context } => E::Context {
            inner: Box::new(strip_backtrace(*inner)),
            context,
        },
        E::WithPath { inner, path } => E::WithPath {
            inner: Box::new(strip_backtrace(*inner)),
            path,
        },
        other => other,
    }
}

impl From<candle_core::Error> for PsgdError {
    fn from(e: candle_core::Error) -> Self {
        PsgdError::Candle(strip_backtrace(e))
    }
}

impl PsgdError {
    /// The JavaScript error class this error maps to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PsgdError::Dtype { .. } | PsgdError::OptionType { .. } => ErrorKind::Type,
            PsgdError::Shape { .. }
            | PsgdError::NonFinite { .. }
            | PsgdError::NonFiniteUpdate { .. }
            | PsgdError::OptionRange { .. }
            | PsgdError::LeafCount { .. }
            | PsgdError::State(_)
            | PsgdError::Size(_) => ErrorKind::Range,
            PsgdError::Draw(_) | PsgdError::Candle(_) => ErrorKind::Other,
            PsgdError::Again { kind, .. } => *kind,
        }
    }

    /// The same error (class and message) once more: for a result two callers share, such
    /// as a preconditioner fit shared by a state and its copy, each of which raises it.
    pub fn again(&self) -> PsgdError {
        PsgdError::Again {
            kind: self.kind(),
            msg: self.to_string(),
        }
    }

    pub(crate) fn option_range(name: &str, msg: impl Into<String>) -> Self {
        PsgdError::OptionRange {
            name: name.to_string(),
            msg: msg.into(),
        }
    }

    pub(crate) fn option_type(name: &str, msg: impl Into<String>) -> Self {
        PsgdError::OptionType {
            name: name.to_string(),
            msg: msg.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, PsgdError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_errors_lose_their_backtrace() {
        let e = candle_core::Error::Msg("bad".into()).bt();
        let e = candle_core::Error::WithBacktrace {
            inner: Box::new(e),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        assert_eq!(PsgdError::from(e).to_string(), "bad");
    }
}
