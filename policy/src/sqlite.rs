//! SQLite's value semantics, reimplemented for the evaluator: storage-class
//! ordering, affinity conversions in comparisons, text/number conversions,
//! arithmetic, LIKE. Checked against SQLite itself by the differential tests.

use std::borrow::Cow;
use std::cmp::Ordering;

use tenantsync_types::Value;

use crate::schema::Affinity;
pub use tenantsync_types::affinity::real_to_text;
use tenantsync_types::num;

/// A value during evaluation: borrowed from the row or the parameters when it
/// can be, owned when computed. TEXT is bytes, as in SQLite: a BLOB read as
/// text (`lower(blob)`, `blob || 'x'`) keeps bytes that are not UTF-8.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Val<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(Cow<'a, [u8]>),
    Blob(Cow<'a, [u8]>),
}

impl<'a> Val<'a> {
    pub(crate) fn borrow(v: &'a Value) -> Val<'a> {
        match v {
            Value::Null => Val::Null,
            Value::Integer(i) => Val::Int(*i),
            Value::Real(r) => Val::Real(*r),
            Value::Text(t) => Val::Text(Cow::Borrowed(t.as_bytes())),
            Value::Blob(b) => Val::Blob(Cow::Borrowed(b)),
        }
    }

    pub(crate) fn into_value(self) -> Value {
        match self {
            Val::Null => Value::Null,
            Val::Int(i) => Value::Integer(i),
            Val::Real(r) => Value::Real(r),
            // Only values that came in as `Value`s (valid UTF-8) or numbers'
            // text forms become values again (index keys, membership sets).
            Val::Text(t) => Value::Text(match String::from_utf8(t.into_owned()) {
                Ok(s) => s,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            }),
            Val::Blob(b) => Value::Blob(b.into_owned()),
        }
    }

    pub(crate) fn is_null(&self) -> bool {
        matches!(self, Val::Null)
    }

    fn class(&self) -> u8 {
        match self {
            Val::Null => 0,
            Val::Int(_) | Val::Real(_) => 1,
            Val::Text(_) => 2,
            Val::Blob(_) => 3,
        }
    }
}

/// SQLite's ordering of two values (`sqlite3MemCompare` with BINARY
/// collation): NULL < INTEGER/REAL (compared numerically, exactly) < TEXT
/// (bytewise) < BLOB (bytewise).
pub(crate) fn compare(a: &Val<'_>, b: &Val<'_>) -> Ordering {
    match (a, b) {
        (Val::Int(x), Val::Int(y)) => x.cmp(y),
        (Val::Real(x), Val::Real(y)) => x.partial_cmp(y).unwrap_or(Ordering::Equal),
        (Val::Int(x), Val::Real(y)) => cmp_int_real(*x, *y),
        (Val::Real(x), Val::Int(y)) => cmp_int_real(*y, *x).reverse(),
        (Val::Text(x), Val::Text(y)) => x.as_ref().cmp(y.as_ref()),
        (Val::Blob(x), Val::Blob(y)) => x.as_ref().cmp(y.as_ref()),
        _ => a.class().cmp(&b.class()),
    }
}

fn cmp_int_real(i: i64, r: f64) -> Ordering {
    if r.is_nan() {
        return Ordering::Greater;
    }
    if r < -9_223_372_036_854_775_808.0 {
        return Ordering::Greater;
    }
    if r >= 9_223_372_036_854_775_808.0 {
        return Ordering::Less;
    }
    let t = r as i64;
    match i.cmp(&t) {
        Ordering::Equal => {
            let frac = r - t as f64;
            0.0f64.partial_cmp(&frac).unwrap_or(Ordering::Equal)
        }
        o => o,
    }
}

/// The affinity SQLite applies to both operands of a comparison
/// (`sqlite3CompareAffinity`): two columns -> NUMERIC if either is numeric,
/// else none; one column -> its affinity; no column -> none.
pub(crate) fn comparison_affinity(a: Option<Affinity>, b: Option<Affinity>) -> Option<Affinity> {
    match (a, b) {
        (Some(x), Some(y)) => {
            if x.is_numeric() || y.is_numeric() {
                Some(Affinity::Numeric)
            } else {
                None
            }
        }
        (Some(x), None) | (None, Some(x)) => match x {
            Affinity::Blob => None,
            other => Some(other),
        },
        (None, None) => None,
    }
}

/// Applies a comparison affinity to both operands the way the comparison
/// opcodes do, then compares. `None` when either side is NULL.
pub(crate) fn compare_with_affinity(
    a: &Val<'_>,
    b: &Val<'_>,
    aff: Option<Affinity>,
) -> Option<Ordering> {
    if a.is_null() || b.is_null() {
        return None;
    }
    match aff {
        Some(x) if x.is_numeric() => {
            let a2 = numeric_affinity(a);
            let b2 = numeric_affinity(b);
            Some(compare(a2.as_ref().unwrap_or(a), b2.as_ref().unwrap_or(b)))
        }
        Some(Affinity::Text) if matches!(a, Val::Text(_)) || matches!(b, Val::Text(_)) => {
            let a2 = text_affinity(a);
            let b2 = text_affinity(b);
            Some(compare(a2.as_ref().unwrap_or(a), b2.as_ref().unwrap_or(b)))
        }
        _ => Some(compare(a, b)),
    }
}

/// NUMERIC affinity on a value in a comparison: TEXT that is entirely a number
/// becomes INTEGER or REAL; everything else is left alone. `None` = unchanged.
pub(crate) fn numeric_affinity(v: &Val<'_>) -> Option<Val<'static>> {
    let Val::Text(t) = v else { return None };
    // `applyNumericAffinity(pRec, 0)`: a REAL unless it is an integer
    // (`alsoAnInt`); no REAL becomes an INTEGER here.
    let (r, rc) = num::atof(t);
    if rc <= 0 {
        return None;
    }
    if rc & num::ATOF_FRACTION == 0 {
        let i = num::real_to_i64(r);
        if num::real_same_as_int(r, i) {
            return Some(Val::Int(i));
        }
        if let (i, 0) = num::atoi64(t) {
            return Some(Val::Int(i));
        }
    }
    Some(Val::Real(r))
}

/// Applies a column affinity to a value as a stored or compared value would
/// see it (used for index keys): numeric affinities as in comparisons, TEXT
/// turns numbers into text.
pub(crate) fn apply_affinity(v: &Val<'_>, aff: Option<Affinity>) -> Option<Val<'static>> {
    match aff {
        Some(x) if x.is_numeric() => numeric_affinity(v),
        Some(Affinity::Text) => text_affinity(v),
        _ => None,
    }
}

fn text_affinity(v: &Val<'_>) -> Option<Val<'static>> {
    match v {
        Val::Int(i) => Some(Val::Text(Cow::Owned(i.to_string().into_bytes()))),
        Val::Real(r) => Some(Val::Text(Cow::Owned(real_to_text(*r).into_bytes()))),
        _ => None,
    }
}

/// A number for arithmetic.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Num {
    Int(i64),
    Real(f64),
}

impl Num {
    pub(crate) fn as_real(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Real(r) => r,
        }
    }

    pub(crate) fn as_int(self) -> i64 {
        match self {
            Num::Int(i) => i,
            Num::Real(r) => real_to_i64(r),
        }
    }
}

/// `sqlite3RealToI64`: truncation, saturating at the ends of the range.
fn real_to_i64(r: f64) -> i64 {
    if r.is_nan() {
        0
    } else if r <= -9.223_372_036_854_775e18 {
        i64::MIN
    } else if r >= 9.223_372_036_854_775e18 {
        i64::MAX
    } else {
        r as i64
    }
}

/// The numeric value of an operand of arithmetic (`numericType`): TEXT and
/// BLOB are read as the number their longest numeric prefix spells (0 when
/// none). `None` for NULL.
pub(crate) fn to_num(v: &Val<'_>) -> Option<Num> {
    match v {
        Val::Null => None,
        Val::Int(i) => Some(Num::Int(*i)),
        Val::Real(r) => Some(Num::Real(*r)),
        Val::Text(t) => Some(bytes_to_num(t)),
        Val::Blob(b) => Some(bytes_to_num(b)),
    }
}

/// `computeNumericType`: the number an arithmetic operand of TEXT or BLOB
/// is, read as SQLite reads it.
fn bytes_to_num(s: &[u8]) -> Num {
    let (r, rc) = num::atof(s);
    let integral = rc & num::ATOF_FRACTION == 0;
    let (i, irc) = num::atoi64(s);
    if rc <= 0 {
        if integral && irc <= 1 {
            Num::Int(i)
        } else {
            Num::Real(r)
        }
    } else if integral && irc == 0 {
        Num::Int(i)
    } else {
        Num::Real(r)
    }
}

/// Arithmetic operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ArithOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/` (integer division on integers)
    Div,
    /// `%`
    Rem,
}

/// SQLite arithmetic: integers overflow to REAL, division by zero is NULL,
/// integer division truncates, a NaN result is NULL.
pub(crate) fn arith(op: ArithOp, a: &Val<'_>, b: &Val<'_>) -> Val<'static> {
    let (Some(x), Some(y)) = (to_num(a), to_num(b)) else {
        return Val::Null;
    };
    if let (Num::Int(x), Num::Int(y)) = (x, y) {
        let r = match op {
            ArithOp::Add => x.checked_add(y),
            ArithOp::Sub => x.checked_sub(y),
            ArithOp::Mul => x.checked_mul(y),
            ArithOp::Div => {
                if y == 0 {
                    return Val::Null;
                }
                x.checked_div(y)
            }
            ArithOp::Rem => {
                if y == 0 {
                    return Val::Null;
                }
                let y = if y == -1 { 1 } else { y };
                Some(x % y)
            }
        };
        if let Some(r) = r {
            return Val::Int(r);
        }
    }
    let (rx, ry) = (x.as_real(), y.as_real());
    let r = match op {
        ArithOp::Add => rx + ry,
        ArithOp::Sub => rx - ry,
        ArithOp::Mul => rx * ry,
        ArithOp::Div => {
            if ry == 0.0 {
                return Val::Null;
            }
            rx / ry
        }
        ArithOp::Rem => {
            // `sqlite3VdbeIntValue` of the operands as they were: text is
            // read by its integer prefix, not by its numeric value.
            let (ix, iy) = (int_value(a, x), int_value(b, y));
            if iy == 0 {
                return Val::Null;
            }
            let iy = if iy == -1 { 1 } else { iy };
            (ix % iy) as f64
        }
    };
    if r.is_nan() { Val::Null } else { Val::Real(r) }
}

fn int_value(v: &Val<'_>, n: Num) -> i64 {
    match v {
        Val::Text(t) => atoi_prefix(t),
        Val::Blob(b) => atoi_prefix(b),
        _ => n.as_int(),
    }
}

/// `memIntValue`: the integer `sqlite3Atoi64` reads, whatever follows it.
fn atoi_prefix(s: &[u8]) -> i64 {
    num::atoi64(s).0
}

/// SQLite's truth value of a WHERE/CASE/AND operand: NULL is unknown,
/// numbers are true when non-zero, text and blobs by their numeric prefix.
pub(crate) fn truth(v: &Val<'_>) -> Option<bool> {
    match v {
        Val::Null => None,
        Val::Int(i) => Some(*i != 0),
        Val::Real(r) => Some(*r != 0.0),
        Val::Text(t) => Some(num::atof(t).0 != 0.0),
        Val::Blob(b) => Some(num::atof(b).0 != 0.0),
    }
}

/// The text form of a value (`sqlite3_value_text`): its bytes, for a BLOB
/// too (not UTF-8 checked, as SQLite); `None` for NULL.
pub(crate) fn to_text<'b>(v: &'b Val<'_>) -> Option<Cow<'b, [u8]>> {
    match v {
        Val::Null => None,
        Val::Int(i) => Some(Cow::Owned(i.to_string().into_bytes())),
        Val::Real(r) => Some(Cow::Owned(real_to_text(*r).into_bytes())),
        Val::Text(t) | Val::Blob(t) => Some(Cow::Borrowed(t.as_ref())),
    }
}

/// A C string's bytes: SQLite's text functions stop at the first NUL.
fn c_str(b: &[u8]) -> &[u8] {
    b.iter().position(|&c| c == 0).map_or(b, |i| &b[..i])
}

/// `sqlite3Utf8Trans1`: the payload bits of a lead byte 0xc0..=0xff.
const UTF8_TRANS1: [u8; 64] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x00, 0x01, 0x02, 0x03, 0x00, 0x01, 0x00, 0x00,
];

/// `sqlite3Utf8Read` on a NUL-free slice: the next character (invalid
/// sequences read as SQLite reads them), 0 at the end.
fn utf8_read(s: &[u8], i: &mut usize) -> u32 {
    let Some(&b) = s.get(*i) else { return 0 };
    *i += 1;
    let mut c = u32::from(b);
    if c >= 0xc0 {
        c = u32::from(UTF8_TRANS1[(c - 0xc0) as usize]);
        while let Some(&n) = s.get(*i) {
            if n & 0xc0 != 0x80 {
                break;
            }
            c = c.wrapping_shl(6).wrapping_add(u32::from(0x3f & n));
            *i += 1;
        }
        if c < 0x80 || (c & 0xFFFF_F800) == 0xD800 {
            c = 0xFFFD;
        }
    }
    c
}

/// How [`pattern_compare`] ended (SQLite's three answers).
#[derive(PartialEq, Eq)]
enum Pattern {
    Matches,
    NoMatch,
    NoWildcardMatch,
}

/// SQLite's LIKE (`likeFunc` and `patternCompare`, case-insensitive for
/// ASCII letters only, on bytes as SQLite reads them): `%` any run, `_` one
/// character, `escape` makes the next character literal (an escape of `%`
/// or `_` turns that wildcard off).
pub(crate) fn like(pattern: &[u8], text: &[u8], escape: Option<char>) -> bool {
    let (mut all, mut one) = (u32::from(b'%'), u32::from(b'_'));
    let esc = escape.map_or(0, u32::from);
    if esc == all {
        all = 0;
    }
    if esc == one {
        one = 0;
    }
    pattern_compare(c_str(pattern), 0, c_str(text), 0, all, one, esc) == Pattern::Matches
}

fn lower(c: u32) -> u32 {
    if (u32::from(b'A')..=u32::from(b'Z')).contains(&c) {
        c + 32
    } else {
        c
    }
}

#[allow(clippy::too_many_arguments)]
fn pattern_compare(
    p: &[u8],
    mut pi: usize,
    s: &[u8],
    mut si: usize,
    all: u32,
    one: u32,
    esc: u32,
) -> Pattern {
    let mut escaped_at: Option<usize> = None;
    loop {
        let mut c = utf8_read(p, &mut pi);
        if c == 0 {
            break;
        }
        if c == all {
            loop {
                c = utf8_read(p, &mut pi);
                if !(c == all || (c == one && one != 0)) {
                    break;
                }
                if c == one && utf8_read(s, &mut si) == 0 {
                    return Pattern::NoWildcardMatch;
                }
            }
            if c == 0 {
                return Pattern::Matches;
            } else if c == esc {
                c = utf8_read(p, &mut pi);
                if c == 0 {
                    return Pattern::NoWildcardMatch;
                }
            }
            if c < 0x80 {
                let (up, low) = (
                    if (u32::from(b'a')..=u32::from(b'z')).contains(&c) {
                        c - 32
                    } else {
                        c
                    },
                    lower(c),
                );
                loop {
                    match s[si..]
                        .iter()
                        .position(|&b| u32::from(b) == up || u32::from(b) == low)
                    {
                        None => break,
                        Some(k) => si += k,
                    }
                    si += 1;
                    let m = pattern_compare(p, pi, s, si, all, one, esc);
                    if m != Pattern::NoMatch {
                        return m;
                    }
                }
            } else {
                loop {
                    let c2 = utf8_read(s, &mut si);
                    if c2 == 0 {
                        break;
                    }
                    if c2 != c {
                        continue;
                    }
                    let m = pattern_compare(p, pi, s, si, all, one, esc);
                    if m != Pattern::NoMatch {
                        return m;
                    }
                }
            }
            return Pattern::NoWildcardMatch;
        }
        if c == esc {
            c = utf8_read(p, &mut pi);
            if c == 0 {
                return Pattern::NoMatch;
            }
            escaped_at = Some(pi);
        }
        let c2 = utf8_read(s, &mut si);
        if c == c2 {
            continue;
        }
        if lower(c) == lower(c2) && c < 0x80 && c2 < 0x80 {
            continue;
        }
        if c == one && escaped_at != Some(pi) && c2 != 0 {
            continue;
        }
        return Pattern::NoMatch;
    }
    if si >= s.len() {
        Pattern::Matches
    } else {
        Pattern::NoMatch
    }
}

/// `lower()`/`upper()` without ICU: bytewise, ASCII letters only.
pub(crate) fn ascii_case(v: &Val<'_>, upper: bool) -> Val<'static> {
    match to_text(v) {
        None => Val::Null,
        Some(t) => Val::Text(Cow::Owned(if upper {
            t.to_ascii_uppercase()
        } else {
            t.to_ascii_lowercase()
        })),
    }
}

/// `length()`: bytes for a BLOB and for a number's text form; for TEXT the
/// characters before the first NUL as `lengthFunc` counts them (a byte of
/// 0x80 or more starts a character, the continuation bytes after it do not).
pub(crate) fn length(v: &Val<'_>) -> Val<'static> {
    match v {
        Val::Null => Val::Null,
        Val::Blob(b) => Val::Int(b.len() as i64),
        Val::Int(_) | Val::Real(_) => Val::Int(to_text(v).map_or(0, |t| t.len()) as i64),
        Val::Text(t) => {
            let t = c_str(t);
            let (mut i, mut n) = (0, 0i64);
            while i < t.len() {
                let b = t[i];
                i += 1;
                if b >= 0x80 {
                    while i < t.len() && t[i] & 0xc0 == 0x80 {
                        i += 1;
                    }
                }
                n += 1;
            }
            Val::Int(n)
        }
    }
}

/// `||`: NULL if either side is NULL, else the texts' bytes joined.
pub(crate) fn concat(a: &Val<'_>, b: &Val<'_>) -> Val<'static> {
    match (to_text(a), to_text(b)) {
        (Some(x), Some(y)) => {
            let mut s = Vec::with_capacity(x.len() + y.len());
            s.extend_from_slice(&x);
            s.extend_from_slice(&y);
            Val::Text(Cow::Owned(s))
        }
        _ => Val::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_matches_sqlite() {
        let cases = [
            ("a%", "ABC", None, true),
            ("_b_", "abc", None, true),
            ("%", "", None, true),
            ("_", "", None, false),
            ("a\\%", "a%", Some('\\'), true),
            ("a\\%", "ab", Some('\\'), false),
            ("%é%", "xÉx", None, false),
            ("%é%", "xéx", None, true),
            ("a%c%e", "abcde", None, true),
        ];
        for (p, t, e, m) in cases {
            assert_eq!(like(p.as_bytes(), t.as_bytes(), e), m, "{t:?} LIKE {p:?}");
        }
    }
}
