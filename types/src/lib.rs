//! tenantsync-types: the SQLite value type every tenantsync crate shares, and its
//! exact JSON encoding.
//!
//! Module map:
//! - [`Value`]: one SQLite value of one of the five storage classes, with
//!   `serde` in the project's exact JSON encoding (see below), `Display` as an
//!   SQL literal, and (feature `rusqlite`) `ToSql`/`FromSql`.
//! - [`affinity`]: SQLite's column affinities and the conversions a column
//!   makes of the values written to it ([`affinity::ColumnType::store`]),
//!   The core keys rows with it, the policy evaluator compares with it.
//! - [`schema`]: the tables of a database as the core reads them and the
//!   policy engine takes them.
//! - [`num`]: SQLite's own number <-> text conversions (`sqlite3AtoF`,
//!   `sqlite3Atoi64`, the `%!.17g` rendering of a REAL), ported exactly.
//! - [`pack`]: cr-sqlite's packed primary keys, [`PackedPk`]; [`site`]:
//!   [`SiteId`]; [`change`]: [`Change`], a row of `crsql_changes`. The wire
//!   identities, shared by the protocol (which needs no SQLite) and the core.
//! - [`ValueRef`]: a borrowed value (rusqlite's with the `rusqlite` feature).
//!
//! # The JSON encoding
//!
//! | storage class | JSON |
//! |---|---|
//! | INTEGER | a JSON integer, exact over the whole `i64` range: `-9223372036854775808` |
//! | REAL | a JSON number always written with a fraction or an exponent: `1.0`, `-0.0`, `1e+300`; infinities as `{"real":"inf"}` / `{"real":"-inf"}` |
//! | TEXT | a JSON string |
//! | BLOB | `{"blob":"<lowercase hex>"}` |
//! | NULL | `null` |
//!
//! Decoding is the inverse: a JSON number without `.`/`e`/`E` is an INTEGER
//! (one outside the `i64` range is an error, never a silent REAL), any other
//! number is a REAL. Types therefore survive every hop: `1` and `1.0` stay
//! distinct, as they are in SQLite and in cr-sqlite's merge rules.

use std::fmt;

pub mod affinity;
pub mod change;
pub mod num;
pub mod pack;
pub mod schema;
pub mod site;

pub use affinity::Affinity;
pub use change::Change;
pub use pack::{PackedPk, PkError};
pub use site::{SiteId, SiteIdParseError};

/// A borrowed SQLite value: rusqlite's `ValueRef` with the `rusqlite`
/// feature, the same five variants without it (so the wire types need no
/// SQLite).
#[cfg(feature = "rusqlite")]
pub use rusqlite::types::ValueRef;

/// A borrowed SQLite value: the same five variants as rusqlite's
/// `ValueRef` (which this is, with the `rusqlite` feature).
#[cfg(not(feature = "rusqlite"))]
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueRef<'a> {
    /// NULL.
    Null,
    /// INTEGER.
    Integer(i64),
    /// REAL.
    Real(f64),
    /// TEXT (its UTF-8 bytes).
    Text(&'a [u8]),
    /// BLOB.
    Blob(&'a [u8]),
}

impl Value {
    /// Borrows the value as a [`ValueRef`].
    pub fn as_value_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Null => ValueRef::Null,
            Value::Integer(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(t) => ValueRef::Text(t.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }
    }

    /// An owned value; fails only on TEXT that is not valid UTF-8 (SQLite
    /// lets `CAST(blob AS TEXT)` make such values): refusing is better than
    /// a silent lossy copy.
    pub fn from_value_ref(v: ValueRef<'_>) -> Result<Value, std::string::FromUtf8Error> {
        Ok(match v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(r) => Value::Real(r),
            ValueRef::Text(t) => Value::Text(String::from_utf8(t.to_vec())?),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        })
    }
}

use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One SQLite value. Equality is structural (`Real(1.0) != Integer(1)`,
/// `Real(-0.0) == Real(0.0)` as for `f64`); SQLite's comparison rules live in
/// the crates that need them (the policy evaluator, the merge rules).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// NULL.
    Null,
    /// A 64-bit signed integer.
    Integer(i64),
    /// An IEEE-754 double. SQLite never stores NaN (it becomes NULL).
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl Value {
    /// SQLite's name of the storage class, as `typeof()` returns it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Integer(_) => "integer",
            Value::Real(_) => "real",
            Value::Text(_) => "text",
            Value::Blob(_) => "blob",
        }
    }

    /// Whether this is NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Integer(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Real(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Blob(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Formats the value as an SQLite literal that reads back as the same value:
/// `NULL`, `42`, `1.0`, `'it''s'`, `X'00ff'`; infinities as `9e999` / `-9e999`.
/// TEXT holding a NUL character, which no SQLite string literal can (SQL text
/// ends at a NUL), is written `CAST(X'..' AS TEXT)` with its UTF-8 bytes.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Integer(i) => write!(f, "{i}"),
            Value::Real(r) if r.is_infinite() => {
                f.write_str(if *r > 0.0 { "9e999" } else { "-9e999" })
            }
            Value::Real(r) => write!(f, "{}", real_to_json(*r)),
            Value::Text(s) if s.contains('\0') => {
                write!(f, "CAST(X'{}' AS TEXT)", hex::encode(s.as_bytes()))
            }
            Value::Text(s) => write!(f, "'{}'", s.replace('\'', "''")),
            Value::Blob(b) => write!(f, "X'{}'", hex::encode(b)),
        }
    }
}

/// The shortest decimal text that reads back as exactly `r`, always with a
/// fraction or an exponent (`1.0`, not `1`). `r` must be finite.
fn real_to_json(r: f64) -> String {
    // `{:?}` is the shortest round-trip representation and keeps `.0` on
    // integral values; it switches to exponent form (`1e300`) on its own.
    format!("{r:?}")
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Integer(i) => s.serialize_i64(*i),
            Value::Real(r) if r.is_finite() => s.serialize_f64(*r),
            Value::Real(r) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("real", if *r > 0.0 { "inf" } else { "-inf" })?;
                m.end()
            }
            Value::Text(t) => s.serialize_str(t),
            Value::Blob(b) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("blob", &hex::encode(b))?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "an SQLite value: null, an integer, a number, a string, {\"blob\": \"<hex>\"} or {\"real\": \"inf\"|\"-inf\"}",
        )
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Integer(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v).map(Value::Integer).map_err(|_| {
            E::custom(format!(
                "integer {v} is outside SQLite's 64-bit signed range"
            ))
        })
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Real(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Text(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Text(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let Some(key) = map.next_key::<String>()? else {
            return Err(de::Error::custom(
                "an empty object is not a value: expected {\"blob\": \"<hex>\"} or {\"real\": \"inf\"|\"-inf\"}",
            ));
        };
        let text: String = map.next_value()?;
        let value = match key.as_str() {
            "blob" => Value::Blob(hex::decode(&text).map_err(|e| {
                de::Error::custom(format!("{{\"blob\": ...}} must hold hex digits: {e}"))
            })?),
            "real" => match text.as_str() {
                "inf" => Value::Real(f64::INFINITY),
                "-inf" => Value::Real(f64::NEG_INFINITY),
                other => {
                    return Err(de::Error::custom(format!(
                        "{{\"real\": {other:?}}} is not a value: only \"inf\" and \"-inf\" are written this way"
                    )));
                }
            },
            other => {
                return Err(de::Error::custom(format!(
                    "unknown value object key {other:?}: expected \"blob\" or \"real\""
                )));
            }
        };
        if let Some(extra) = map.next_key::<String>()? {
            return Err(de::Error::custom(format!(
                "a value object has exactly one key; found also {extra:?}"
            )));
        }
        Ok(value)
    }
}

#[cfg(feature = "rusqlite")]
mod sql {
    use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

    use super::Value;

    impl ToSql for Value {
        fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
            Ok(ToSqlOutput::Borrowed(self.as_value_ref()))
        }
    }

    impl FromSql for Value {
        fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
            Value::try_from(value)
        }
    }

    /// Fails only on TEXT that is not valid UTF-8 ([`Value::from_value_ref`]).
    impl TryFrom<ValueRef<'_>> for Value {
        type Error = FromSqlError;

        fn try_from(v: ValueRef<'_>) -> FromSqlResult<Self> {
            Value::from_value_ref(v).map_err(|e| FromSqlError::Other(Box::new(e)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Value;

    #[track_caller]
    fn check(v: Value, json: &str) {
        assert_eq!(serde_json::to_string(&v).unwrap(), json, "encoding {v:?}");
        let back: Value = serde_json::from_str(json).unwrap();
        match (&back, &v) {
            (Value::Real(a), Value::Real(b)) => assert_eq!(a.to_bits(), b.to_bits(), "{json}"),
            _ => assert_eq!(back, v, "decoding {json}"),
        }
    }

    #[test]
    fn json_encoding_is_exact() {
        check(Value::Null, "null");
        check(Value::Integer(0), "0");
        check(Value::Integer(i64::MAX), "9223372036854775807");
        check(Value::Integer(i64::MIN), "-9223372036854775808");
        check(Value::Integer((1 << 53) + 1), "9007199254740993");
        check(Value::Real(1.0), "1.0");
        check(Value::Real(-0.0), "-0.0");
        check(Value::Real(2.5), "2.5");
        check(Value::Real(1e300), "1e+300");
        check(Value::Real(5e-324), "5e-324");
        check(Value::Real(0.1), "0.1");
        check(Value::Real(f64::INFINITY), r#"{"real":"inf"}"#);
        check(Value::Real(f64::NEG_INFINITY), r#"{"real":"-inf"}"#);
        check(Value::Text("é'\"\n".into()), r#""é'\"\n""#);
        check(Value::Text(String::new()), r#""""#);
        check(Value::Blob(vec![0, 0xff, 0x10]), r#"{"blob":"00ff10"}"#);
        check(Value::Blob(vec![]), r#"{"blob":""}"#);
    }

    #[test]
    fn integral_json_numbers_are_integers_and_others_reals() {
        let v: Vec<Value> = serde_json::from_str("[1, 1.0, 1e2, 3E-1, 1e300]").unwrap();
        assert_eq!(
            v,
            vec![
                Value::Integer(1),
                Value::Real(1.0),
                Value::Real(100.0),
                Value::Real(0.3),
                Value::Real(1e300)
            ]
        );
        // serde_json reads `-0` as the REAL -0.0 (it keeps the sign); our
        // encoder never writes it for an INTEGER.
        let minus_zero: Value = serde_json::from_str("-0").unwrap();
        assert!(matches!(minus_zero, Value::Real(r) if r == 0.0 && r.is_sign_negative()));
    }

    #[track_caller]
    fn check_error(json: &str, expected: &str) {
        let err = serde_json::from_str::<Value>(json).unwrap_err().to_string();
        assert!(err.contains(expected), "{json}: {err}");
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        check_error(
            "9223372036854775808",
            "outside SQLite's 64-bit signed range",
        );
        check_error(r#"{"blob":"zz"}"#, "must hold hex digits");
        check_error(r#"{"real":"nan"}"#, "only \"inf\" and \"-inf\"");
        check_error(r#"{"text":"x"}"#, "unknown value object key");
        check_error(r#"{"blob":"00","real":"inf"}"#, "exactly one key");
        check_error("{}", "empty object");
        check_error("[1]", "an SQLite value");
        check_error("true", "an SQLite value");
    }

    #[test]
    fn display_is_a_literal() {
        let cases = [
            (Value::Null, "NULL"),
            (Value::Integer(-3), "-3"),
            (Value::Real(1.0), "1.0"),
            (Value::Real(f64::NEG_INFINITY), "-9e999"),
            (Value::Text("it's".into()), "'it''s'"),
            (Value::Blob(vec![0, 255]), "X'00ff'"),
            // Found by fuzz/pk_value: SQL text ends at a NUL, so no string
            // literal can hold one.
            (Value::Text("a\0'b".into()), "CAST(X'61002762' AS TEXT)"),
        ];
        for (v, lit) in cases {
            assert_eq!(v.to_string(), lit);
        }
    }
}
