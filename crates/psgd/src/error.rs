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
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl PsgdError {
    /// The JavaScript error class this error maps to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PsgdError::Dtype { .. } | PsgdError::OptionType { .. } => ErrorKind::Type,
            PsgdError::Shape { .. }
            | PsgdError::NonFinite { .. }
            | PsgdError::OptionRange { .. }
            | PsgdError::LeafCount { .. }
            | PsgdError::State(_) => ErrorKind::Range,
            PsgdError::Draw(_) | PsgdError::Candle(_) => ErrorKind::Other,
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
