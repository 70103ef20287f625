//! SQLite's column affinities and the value conversions they make: the one
//! reading of "what SQLite stores when this value is written to that
//! column" that the core (primary keys, clock keys) and the policy
//! evaluator (comparisons) share.
//!
//! Followed line by line from SQLite's `applyAffinity`,
//! `applyNumericAffinity`, `sqlite3AtoF`, `alsoAnInt`,
//! `sqlite3VdbeIntegerAffinity` and `vdbeMemRenderNum`, and held against
//! the bundled SQLite by the core's property tests
//! (`core/tests/affinity.rs`): every value, written to a real column of
//! every affinity, reads back as [`stored`] says.

use crate::Value;
use crate::num;

/// A column's type affinity, derived from its declared type by SQLite's rules
/// (<https://sqlite.org/datatype3.html#determination_of_column_affinity>).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Affinity {
    /// No conversion (declared type empty, absent, or containing `BLOB`).
    Blob,
    /// Numbers written to or compared with this column become text.
    Text,
    /// Text that looks like a number becomes one.
    Numeric,
    /// As NUMERIC (declared type contains `INT`).
    Integer,
    /// As NUMERIC, and numbers read back as REAL (declared type contains
    /// `REAL`, `FLOA` or `DOUB`).
    Real,
}

impl Affinity {
    /// SQLite's rules, in their order: `INT` -> INTEGER; `CHAR`, `CLOB`,
    /// `TEXT` -> TEXT; `BLOB` or no type -> BLOB; `REAL`, `FLOA`, `DOUB` ->
    /// REAL; anything else -> NUMERIC.
    pub fn from_decl_type(decl_type: Option<&str>) -> Affinity {
        let Some(t) = decl_type else {
            return Affinity::Blob;
        };
        let t = t.to_ascii_uppercase();
        if t.contains("INT") {
            Affinity::Integer
        } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
            Affinity::Text
        } else if t.contains("BLOB") || t.trim().is_empty() {
            Affinity::Blob
        } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
            Affinity::Real
        } else {
            Affinity::Numeric
        }
    }

    /// INTEGER, REAL and NUMERIC.
    pub fn is_numeric(self) -> bool {
        matches!(self, Affinity::Numeric | Affinity::Integer | Affinity::Real)
    }
}

/// The type of a column of a `STRICT` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StrictType {
    /// `INT` or `INTEGER`.
    Integer,
    /// `REAL`.
    Real,
    /// `TEXT`.
    Text,
    /// `BLOB`.
    Blob,
    /// `ANY`: any value, stored as given.
    Any,
}

impl StrictType {
    /// The type of a STRICT table's column from its declared type (SQLite
    /// allows exactly these names there).
    pub fn from_decl_type(decl_type: &str) -> Option<StrictType> {
        match decl_type.to_ascii_uppercase().as_str() {
            "INT" | "INTEGER" => Some(StrictType::Integer),
            "REAL" => Some(StrictType::Real),
            "TEXT" => Some(StrictType::Text),
            "BLOB" => Some(StrictType::Blob),
            "ANY" => Some(StrictType::Any),
            _ => None,
        }
    }
}

/// How a column converts the values written to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ColumnType {
    /// An ordinary column: its affinity converts, nothing is refused.
    Affinity(Affinity),
    /// A column of a STRICT table: converted as its affinity does, then
    /// refused unless it is of the column's type (or NULL).
    Strict(StrictType),
    /// An `INTEGER PRIMARY KEY` of a rowid table (an alias of the rowid):
    /// converted as NUMERIC, then refused unless it is an INTEGER.
    Rowid,
}

/// Why SQLite refuses to store a value in a column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The storage class of the value after conversion.
    pub found: &'static str,
    /// What the column holds.
    pub expected: &'static str,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "datatype mismatch: a {} value cannot be stored in {} column",
            self.found, self.expected
        )
    }
}

impl ColumnType {
    /// Whether the column converts no number: SQLite then holds an INTEGER
    /// and an equal REAL (5 and 5.0, 0.0 and -0.0) as one value, though they
    /// are stored (and packed) apart. A key column like this cannot hold a
    /// REAL unambiguously.
    pub fn keeps_numbers_apart(self) -> bool {
        matches!(
            self,
            ColumnType::Affinity(Affinity::Blob) | ColumnType::Strict(StrictType::Any)
        )
    }

    /// The value SQLite stores (and reads back) when `v` is written to a
    /// column of this type, or why it refuses it. NULL is stored as NULL
    /// (NOT NULL and the rowid's NULL-means-new-row are the caller's).
    pub fn store(self, v: &Value) -> Result<Value, Mismatch> {
        match self {
            ColumnType::Affinity(a) => Ok(stored(v, a)),
            ColumnType::Rowid => match stored(v, Affinity::Numeric) {
                i @ (Value::Integer(_) | Value::Null) => Ok(i),
                other => Err(Mismatch {
                    found: other.type_name(),
                    expected: "an INTEGER PRIMARY KEY",
                }),
            },
            ColumnType::Strict(t) => {
                let (aff, name) = match t {
                    StrictType::Integer => (Affinity::Integer, "a STRICT INTEGER"),
                    StrictType::Real => (Affinity::Real, "a STRICT REAL"),
                    StrictType::Text => (Affinity::Text, "a STRICT TEXT"),
                    StrictType::Blob => (Affinity::Blob, "a STRICT BLOB"),
                    StrictType::Any => return Ok(v.clone()),
                };
                let s = stored(v, aff);
                let fits = matches!(
                    (t, &s),
                    (_, Value::Null)
                        | (StrictType::Integer, Value::Integer(_))
                        | (StrictType::Real, Value::Real(_))
                        | (StrictType::Text, Value::Text(_))
                        | (StrictType::Blob, Value::Blob(_))
                );
                if fits {
                    Ok(s)
                } else {
                    Err(Mismatch {
                        found: s.type_name(),
                        expected: name,
                    })
                }
            }
        }
    }
}

/// The value an ordinary column of affinity `aff` stores, and reads back,
/// when `v` is written to it (`applyAffinity`; REAL columns read integral
/// values back as REAL).
pub fn stored(v: &Value, aff: Affinity) -> Value {
    match aff {
        Affinity::Blob => v.clone(),
        Affinity::Text => match v {
            Value::Integer(i) => Value::Text(i.to_string()),
            Value::Real(r) => Value::Text(real_to_text(*r)),
            other => other.clone(),
        },
        Affinity::Numeric | Affinity::Integer | Affinity::Real => {
            let n = match v {
                Value::Text(t) => numeric_text(t.as_bytes()).unwrap_or_else(|| v.clone()),
                Value::Real(r) => integer_affinity(*r),
                other => other.clone(),
            };
            match (aff, n) {
                (Affinity::Real, Value::Integer(i)) => Value::Real(i as f64),
                (_, n) => n,
            }
        }
    }
}

/// `applyNumericAffinity(pRec, 1)` on a text: the number it spells when the
/// whole text (bar ASCII whitespace around it) is one, else `None`.
fn numeric_text(t: &[u8]) -> Option<Value> {
    let (r, rc) = num::atof(t);
    if rc <= 0 {
        return None;
    }
    if rc & num::ATOF_FRACTION == 0 {
        // `alsoAnInt`.
        let i = num::real_to_i64(r);
        if num::real_same_as_int(r, i) {
            return Some(Value::Integer(i));
        }
        if let (i, 0) = num::atoi64(t) {
            return Some(Value::Integer(i));
        }
    }
    Some(integer_affinity(r))
}

/// `sqlite3VdbeIntegerAffinity`: a REAL that converts to an integer and back
/// unchanged, and is neither end of the range, becomes that INTEGER.
pub fn integer_affinity(r: f64) -> Value {
    let ix = num::real_to_i64(r);
    if r == ix as f64 && ix > i64::MIN && ix < i64::MAX {
        Value::Integer(ix)
    } else {
        Value::Real(r)
    }
}

/// What SQLite's `sqlite3AtoF` and `sqlite3Atoi64` see in a text.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParsedNumber {
    /// The value of the longest numeric prefix (0.0 when there is none).
    pub real: f64,
    /// The text as `sqlite3Atoi64` reads it, when it is an integer that
    /// fits with nothing but whitespace around it.
    pub int: Option<i64>,
    /// The whole text (bar surrounding whitespace) is the number.
    pub full: bool,
    /// Some prefix of the text is a number.
    pub prefix: bool,
    /// The number has a `.` or an exponent.
    pub has_dot_or_exp: bool,
}

/// Reads a text as SQLite does (`sqlite3AtoF`, stopping at a NUL, and
/// `sqlite3Atoi64` over all of it).
pub fn parse_number(s: &[u8]) -> ParsedNumber {
    let (real, rc) = num::atof(s);
    let int = match num::atoi64(s) {
        (i, 0) => Some(i),
        _ => None,
    };
    ParsedNumber {
        real,
        int,
        full: rc > 0,
        prefix: rc != 0,
        has_dot_or_exp: rc & num::ATOF_FRACTION != 0,
    }
}

pub use num::{is_space, real_to_text};

#[cfg(test)]
mod tests {
    use super::*;
    use Value::{Blob as B, Integer as I, Null, Real as R, Text as T};

    fn t(s: &str) -> Value {
        T(s.into())
    }

    #[test]
    fn affinity_follows_sqlite_rules() {
        use Affinity::*;
        let cases = [
            (Some("INTEGER"), Integer),
            (Some("int"), Integer),
            (Some("BIGINT"), Integer),
            (Some("POINT"), Integer), // "INT" inside, as SQLite says
            (Some("TEXT"), Text),
            (Some("VARCHAR(10)"), Text),
            (Some("CLOB"), Text),
            (Some("BLOB"), Blob),
            (None, Blob),
            (Some(""), Blob),
            (Some("REAL"), Real),
            (Some("DOUBLE PRECISION"), Real),
            (Some("FLOAT"), Real),
            (Some("NUMERIC"), Numeric),
            (Some("BOOLEAN"), Numeric),
            (Some("DATETIME"), Numeric),
            (Some("CHARINT"), Integer), // INT wins over CHAR: rule order
        ];
        for (decl, aff) in cases {
            assert_eq!(Affinity::from_decl_type(decl), aff, "{decl:?}");
        }
    }

    /// The storage table the property test checks exhaustively against
    /// SQLite; these rows are the cases the attack of issue 11 used.
    #[test]
    fn rowid_keys_convert_only_what_sqlite_converts() {
        let ok = [
            (I(5), 5),
            (t("5"), 5),
            (t("  5 "), 5),
            (t("\t+5\n"), 5),
            (t("5.0"), 5),
            (t("5e0"), 5),
            (R(5.0), 5),
            (R(-0.0), 0),
            (t("-9223372036854775808"), i64::MIN),
            (t("9223372036854775807"), i64::MAX),
        ];
        for (v, want) in ok {
            assert_eq!(ColumnType::Rowid.store(&v), Ok(I(want)), "{v:?}");
        }
        let refused = [
            t("\u{a0}5"),
            t("\u{2003}5"),
            t("\u{3000}5"),
            t("5\u{a0}"),
            t("0x10"),
            t("5.5"),
            t("9223372036854775808"),
            t(""),
            R(5.5),
            R(1e19),
            R(f64::INFINITY),
            B(vec![0x35]),
        ];
        for v in refused {
            assert!(ColumnType::Rowid.store(&v).is_err(), "{v:?}");
        }
        assert_eq!(ColumnType::Rowid.store(&Null), Ok(Null));
    }

    #[test]
    fn ordinary_columns_convert_by_affinity() {
        use Affinity::*;
        let cases = [
            (Integer, t(" 7 "), I(7)),
            (Integer, t("7.0"), I(7)),
            (Integer, t("7.5"), R(7.5)),
            (Integer, t("\u{a0}7"), t("\u{a0}7")),
            (Integer, R(3.0), I(3)),
            (Integer, t("1e3"), I(1000)),
            (Integer, t("99999999999999999999"), R(1e20)),
            (Numeric, t("0x10"), t("0x10")),
            (Real, I(3), R(3.0)),
            (Real, t("3"), R(3.0)),
            (Text, I(3), t("3")),
            (Text, R(0.5), t("0.5")),
            (Text, R(3.0), t("3.0")),
            (Text, B(vec![1]), B(vec![1])),
            (Blob, t("3"), t("3")),
            (Blob, R(3.0), R(3.0)),
        ];
        for (aff, v, want) in cases {
            assert_eq!(stored(&v, aff), want, "{v:?} into {aff:?}");
        }
    }

    #[test]
    fn strict_columns_refuse_what_does_not_convert() {
        use StrictType::*;
        assert_eq!(ColumnType::Strict(Integer).store(&t("7")), Ok(I(7)));
        assert!(ColumnType::Strict(Integer).store(&t("x")).is_err());
        assert!(ColumnType::Strict(Integer).store(&R(7.5)).is_err());
        assert_eq!(ColumnType::Strict(Real).store(&I(7)), Ok(R(7.0)));
        assert_eq!(ColumnType::Strict(Text).store(&I(7)), Ok(t("7")));
        assert!(ColumnType::Strict(Text).store(&B(vec![1])).is_err());
        assert!(ColumnType::Strict(Blob).store(&t("7")).is_err());
        assert_eq!(ColumnType::Strict(Any).store(&t("7")), Ok(t("7")));
    }
}
