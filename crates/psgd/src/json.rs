//! Typed reads of option values from JSON, with errors that name the option.

use crate::error::{PsgdError, Result};
use serde_json::Value;

pub(crate) fn num(k: &str, v: &Value) -> Result<f64> {
    v.as_f64()
        .ok_or_else(|| PsgdError::option_type(k, format!("expected a number, got {v}")))
}

pub(crate) fn uint(k: &str, v: &Value) -> Result<usize> {
    v.as_u64().map(|u| u as usize).ok_or_else(|| {
        PsgdError::option_type(k, format!("expected a non-negative integer, got {v}"))
    })
}

pub(crate) fn boolean(k: &str, v: &Value) -> Result<bool> {
    v.as_bool()
        .ok_or_else(|| PsgdError::option_type(k, format!("expected a boolean, got {v}")))
}

pub(crate) fn opt_str<'a>(k: &str, v: &'a Value) -> Result<Option<&'a str>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        _ => Err(PsgdError::option_type(
            k,
            format!("expected a string or null, got {v}"),
        )),
    }
}
