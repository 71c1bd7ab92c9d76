//! Options, declared once. Each variant's options are one struct written with
//! `declare_options!`: per field its doc, type, default and range check. From that one
//! declaration come the struct and its `Default`, the JSON/serde reader (camelCase names,
//! unknown names rejected, missing ones defaulted, every error naming the option and
//! carrying its `TypeError`/`RangeError` kind), and the table [`OptionInfo`] from which
//! [`crate::codegen`] generates the TypeScript option types and the options reference.

use crate::error::{PsgdError, Result};
use crate::kernels::precision::Precision;
use crate::schedule::Schedule;
use candle_core::DType;
use serde_json::Value;

/// A value an option can hold, read from JSON with errors that name the option.
pub trait OptionValue: Sized {
    /// The TypeScript type of the option.
    const TS: &'static str;
    /// Reads the value; `name` is the option's camelCase name.
    fn read(name: &str, v: &Value) -> Result<Self>;
    /// The TypeScript type as written in the generated file.
    fn ts() -> String {
        Self::TS.to_string()
    }
}

/// Characters of a value quoted in an error, at most: a message never carries a whole
/// array someone passed by mistake.
const DESCRIBE_MAX: usize = 60;

/// `'x'` for strings, the JSON text otherwise: how a bad value is quoted in an error, cut
/// to [`DESCRIBE_MAX`] characters (with `…` and, for an array, its length).
pub(crate) fn describe(v: &Value) -> String {
    let text = match v {
        Value::String(s) => format!("'{s}'"),
        other => other.to_string(),
    };
    if text.chars().count() <= DESCRIBE_MAX {
        return text;
    }
    let head: String = text.chars().take(DESCRIBE_MAX - 1).collect();
    match v {
        Value::Array(a) => format!("{head}… (an array of {} items)", a.len()),
        _ => format!("{head}…"),
    }
}

fn type_err(name: &str, want: &str, v: &Value) -> PsgdError {
    PsgdError::option_type(name, format!("must be {want}, got {}", describe(v)))
}

fn number(name: &str, v: &Value) -> Result<f64> {
    v.as_f64().ok_or_else(|| type_err(name, "a number", v))
}

impl OptionValue for f64 {
    const TS: &'static str = "number";
    fn read(name: &str, v: &Value) -> Result<f64> {
        number(name, v)
    }
}

impl OptionValue for bool {
    const TS: &'static str = "boolean";
    fn read(name: &str, v: &Value) -> Result<bool> {
        v.as_bool().ok_or_else(|| type_err(name, "a boolean", v))
    }
}

impl OptionValue for usize {
    const TS: &'static str = "number";
    fn read(name: &str, v: &Value) -> Result<usize> {
        let x = number(name, v)?;
        match v.as_u64() {
            Some(u) if u <= (1u64 << 53) => Ok(u as usize),
            _ => Err(PsgdError::option_range(
                name,
                format!("must be a non-negative integer, got {x}"),
            )),
        }
    }
}

impl OptionValue for u64 {
    const TS: &'static str = "number";
    fn read(name: &str, v: &Value) -> Result<u64> {
        usize::read(name, v).map(|u| u as u64)
    }
}

impl<T: OptionValue> OptionValue for Option<T> {
    const TS: &'static str = "null";
    fn read(name: &str, v: &Value) -> Result<Option<T>> {
        match v {
            Value::Null => Ok(None),
            v => T::read(name, v).map(Some),
        }
    }
    fn ts() -> String {
        format!("{} | null", T::ts())
    }
}

impl OptionValue for Schedule {
    const TS: &'static str = "number | Schedule";
    fn read(name: &str, v: &Value) -> Result<Schedule> {
        number(name, v).map(Schedule::Constant)
    }
}

/// A string option with a fixed set of spellings.
pub trait Choice: Sized + Copy + 'static {
    /// Every value with its spelling (psgd-jax's).
    const CHOICES: &'static [(&'static str, Self)];
}

/// The spelling of `value` among `C`'s choices.
pub fn choice_name<C: Choice + PartialEq>(value: C) -> &'static str {
    C::CHOICES
        .iter()
        .find(|(_, c)| *c == value)
        .map_or("?", |(n, _)| n)
}

fn read_choice<C: Choice>(name: &str, v: &Value) -> Result<C> {
    let names: Vec<String> = C::CHOICES.iter().map(|(n, _)| format!("'{n}'")).collect();
    v.as_str()
        .and_then(|s| C::CHOICES.iter().find(|(n, _)| *n == s))
        .map(|(_, c)| *c)
        .ok_or_else(|| type_err(name, &format!("one of {}", names.join(", ")), v))
}

/// Implements [`OptionValue`] for a [`Choice`] (its TypeScript type is the union of its
/// spellings).
macro_rules! choice_option {
    ($ty:ty, $ts:literal) => {
        impl $crate::options::OptionValue for $ty {
            const TS: &'static str = $ts;
            fn read(name: &str, v: &serde_json::Value) -> $crate::error::Result<Self> {
                $crate::options::read_choice_pub(name, v)
            }
        }
    };
}
pub(crate) use choice_option;

#[doc(hidden)]
pub fn read_choice_pub<C: Choice>(name: &str, v: &Value) -> Result<C> {
    read_choice(name, v)
}

/// A floating-point dtype of the state (`muDtype`, `precondDtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateDType(pub DType);

impl Choice for StateDType {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("float32", StateDType(DType::F32)),
        ("bfloat16", StateDType(DType::BF16)),
        ("float16", StateDType(DType::F16)),
        ("float64", StateDType(DType::F64)),
    ];
}
choice_option!(StateDType, "'float32' | 'bfloat16' | 'float16' | 'float64'");

impl StateDType {
    /// The dtype named `name` (one of [`Choice::CHOICES`]).
    pub fn parse(name: &str) -> Option<DType> {
        Self::CHOICES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, d)| d.0)
    }

    /// The name of a dtype (`other` for those no option accepts).
    pub fn name(d: DType) -> &'static str {
        match d {
            DType::U8 => "uint8",
            DType::U32 => "uint32",
            DType::I64 => "int64",
            d => Self::CHOICES
                .iter()
                .find(|(_, s)| s.0 == d)
                .map_or("other", |(n, _)| n),
        }
    }
}

impl Choice for Precision {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("bfloat16", Precision::Bfloat16),
        ("tensorfloat32", Precision::Tensorfloat32),
        ("float32", Precision::Float32),
    ];
}
choice_option!(Precision, "'bfloat16' | 'tensorfloat32' | 'float32'");

/// One option as the generator and the bindings see it.
#[derive(Debug, Clone)]
pub struct OptionInfo {
    /// camelCase name.
    pub name: String,
    /// The Rust field's snake_case name (psgd-jax's keyword, where psgd-jax has the option).
    pub snake: String,
    /// TypeScript type.
    pub ts: String,
    /// The doc comment.
    pub doc: String,
    /// Resolved by the TypeScript layer (a mask tree or predicate), never read here.
    pub ts_only: bool,
}

/// `snake_case` → `camelCase`.
pub fn camel_case(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut up = false;
    for c in snake.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// `camelCase` → `snake_case`.
pub fn snake_case(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for c in camel.chars() {
        if c.is_uppercase() {
            out.push('_');
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// An options object with psgd-jax's snake_case keyword names renamed to ours (for the
/// fixtures and benchmark workloads, which are written in the reference's names).
pub fn from_psgd_jax_names(obj: &serde_json::Map<String, Value>) -> serde_json::Map<String, Value> {
    obj.iter()
        .map(|(k, v)| (camel_case(k), v.clone()))
        .collect()
}

/// What every options struct declared with `declare_options!` provides.
pub trait Options: Sized + Clone + Default + std::fmt::Debug + Send + Sync {
    /// The variant's name (`kron`), in errors.
    const VARIANT: &'static str;
    /// Every option, in declaration order.
    fn info() -> Vec<OptionInfo>;
    /// Sets the option `name` (camelCase) from JSON; false when no option has that name.
    fn set(&mut self, name: &str, v: &Value) -> Result<bool>;
    /// Checks every option's range.
    fn validate(&self) -> Result<()>;

    /// Options from a JSON object with camelCase names: missing ones take their defaults,
    /// unknown ones are a `TypeError`, every value is checked.
    fn from_json(obj: &serde_json::Map<String, Value>) -> Result<Self> {
        let mut o = Self::default();
        let ts_only: Vec<String> = Self::info()
            .into_iter()
            .filter(|i| i.ts_only)
            .map(|i| i.name)
            .collect();
        for (k, v) in obj {
            if ts_only.iter().any(|n| n == k) {
                continue;
            }
            if !o.set(k, v)? {
                return Err(PsgdError::option_type(
                    k,
                    format!("is not an option of {}", Self::VARIANT),
                ));
            }
        }
        o.validate()?;
        Ok(o)
    }
}

/// Range checks for `declare_options!`: each returns the message's tail.
pub mod check {
    use crate::schedule::Schedule;

    /// A finite number.
    pub fn finite(v: &f64) -> Result<(), String> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(format!("must be finite, got {v}"))
        }
    }

    /// A finite number ≥ 0.
    pub fn non_negative(v: &f64) -> Result<(), String> {
        if v.is_finite() && *v >= 0.0 {
            Ok(())
        } else {
            Err(format!("must be a finite number >= 0, got {v}"))
        }
    }

    /// A finite number > 0.
    pub fn positive(v: &f64) -> Result<(), String> {
        if v.is_finite() && *v > 0.0 {
            Ok(())
        } else {
            Err(format!("must be > 0, got {v}"))
        }
    }

    /// `None` or a finite number > 0.
    pub fn positive_or_none(v: &Option<f64>) -> Result<(), String> {
        v.as_ref().map_or(Ok(()), positive)
    }

    /// `None` or a finite number ≥ 0.
    pub fn non_negative_or_none(v: &Option<f64>) -> Result<(), String> {
        v.as_ref().map_or(Ok(()), non_negative)
    }

    /// A momentum coefficient in [0, 1).
    pub fn momentum(v: &f64) -> Result<(), String> {
        if v.is_finite() && (0.0..1.0).contains(v) {
            Ok(())
        } else {
            Err(format!("must be in [0, 1), got {v}"))
        }
    }

    /// A learning rate: finite and ≥ 0 (a negative one would ascend).
    pub fn learning_rate(v: f64) -> Result<(), String> {
        non_negative(&v)
    }

    /// A probability in [0, 1].
    pub fn probability(v: f64) -> Result<(), String> {
        if (0.0..=1.0).contains(&v) {
            Ok(())
        } else {
            Err(format!("must be in [0, 1], got {v}"))
        }
    }

    /// A constant schedule passes `f`; a function is checked at each step.
    pub fn schedule(f: fn(f64) -> Result<(), String>) -> impl Fn(&Schedule) -> Result<(), String> {
        move |s| match s {
            Schedule::Constant(v) => f(*v),
            Schedule::Fn(_) => Ok(()),
        }
    }

    /// A preconditioner step size (`precondLr`, `preconditionerLr`): finite and ≥ 0 (a
    /// negative one would fit the preconditioner away from the gradients' whitening, and
    /// its factors blow up within a few steps).
    pub fn precond_lr(v: f64) -> Result<(), String> {
        non_negative(&v)
    }

    /// A preconditioner step-size schedule (see [`precond_lr`]).
    pub fn precond_lr_schedule(s: &Schedule) -> Result<(), String> {
        schedule(precond_lr)(s)
    }

    /// A learning-rate schedule.
    pub fn learning_rate_schedule(s: &Schedule) -> Result<(), String> {
        schedule(learning_rate)(s)
    }

    /// A probability schedule.
    pub fn probability_schedule(s: &Schedule) -> Result<(), String> {
        schedule(probability)(s)
    }
}

/// Declares an options struct once: fields with docs, types, defaults and checks, plus
/// options that only the TypeScript layer resolves (`ts_only`: masks). See the module docs.
#[macro_export]
#[doc(hidden)]
macro_rules! declare_options {
    (
        $(#[$meta:meta])*
        pub struct $name:ident for $variant:literal {
            $(
                $(#[doc = $doc:literal])*
                $field:ident : $ty:ty = $default:expr $(, check $check:expr)? ;
            )*
        }
        ts_only {
            $( $(#[doc = $tdoc:literal])* $tname:literal : $tts:literal ; )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub struct $name {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $( $field: $default, )* }
            }
        }

        impl $crate::options::Options for $name {
            const VARIANT: &'static str = $variant;

            fn info() -> Vec<$crate::options::OptionInfo> {
                let mut out = vec![$(
                    $crate::options::OptionInfo {
                        name: $crate::options::camel_case(stringify!($field)),
                        snake: stringify!($field).to_string(),
                        ts: $crate::options::ts_type::<$ty>(),
                        doc: [$($doc),*].join("\n"),
                        ts_only: false,
                    },
                )*];
                $(out.push($crate::options::OptionInfo {
                    name: $tname.to_string(),
                    snake: $crate::options::snake_case($tname),
                    ts: $tts.to_string(),
                    doc: [$($tdoc),*].join("\n"),
                    ts_only: true,
                });)*
                out
            }

            fn set(&mut self, name: &str, v: &serde_json::Value) -> $crate::error::Result<bool> {
                $(
                    if name == $crate::options::camel_case(stringify!($field)) {
                        self.$field = <$ty as $crate::options::OptionValue>::read(name, v)?;
                        return Ok(true);
                    }
                )*
                Ok(false)
            }

            fn validate(&self) -> $crate::error::Result<()> {
                $($(
                    ($check)(&self.$field).map_err(|m: String| {
                        $crate::error::PsgdError::option_range(
                            &$crate::options::camel_case(stringify!($field)),
                            m,
                        )
                    })?;
                )?)*
                Ok(())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            /// The same reader as the bindings use: camelCase names, unknown names
            /// rejected, defaults for the rest.
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let obj = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
                <$name as $crate::options::Options>::from_json(&obj)
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}

/// The TypeScript type of a field of type `T`.
pub fn ts_type<T: OptionValue>() -> String {
    T::ts()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn camel_case_names() {
        assert_eq!(
            camel_case("preconditioner_update_probability"),
            "preconditionerUpdateProbability"
        );
        assert_eq!(camel_case("b1"), "b1");
        assert_eq!(camel_case("lax_map_scanned_layers"), "laxMapScannedLayers");
        assert_eq!(snake_case("weightDecayMask"), "weight_decay_mask");
        assert_eq!(snake_case("b1"), "b1");
    }
}
