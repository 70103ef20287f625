//! cr-sqlite's packed primary-key encoding (`crsql_pack_columns`), byte for byte.
//!
//! ```text
//! blob    := u8 column_count, column*
//! column  := u8 tag, payload            tag = (n << 3) | type
//! type    := 1 INTEGER | 2 REAL | 3 TEXT | 4 BLOB | 5 NULL
//! INTEGER : n = bytes that follow (0..=8), the low n bytes of the i64, big-endian
//! REAL    : n = 0, 8 bytes IEEE-754 big-endian
//! TEXT/BLOB: n = width of the length (0..=4), the length big-endian, the bytes
//! ```
//!
//! Widths count the bytes needed for the value seen as an *unsigned* 64-bit
//! pattern, so every negative integer takes 8 bytes and 0 takes none. Decoding
//! zero-extends and is lenient like cr-sqlite's (non-minimal widths and trailing
//! bytes are accepted); [`PackedPk::canonical`] re-encodes minimally.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Value, ValueRef};

const T_INTEGER: u8 = 1;
const T_REAL: u8 = 2;
const T_TEXT: u8 = 3;
const T_BLOB: u8 = 4;
const T_NULL: u8 = 5;

/// Why a packed primary key could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PkError {
    /// The blob is empty: not even the column count byte.
    #[error("empty packed primary key (no column count byte)")]
    Empty,
    /// The blob ends inside a value.
    #[error(
        "packed primary key truncated at byte {offset}: value {index} needs {needed} more bytes"
    )]
    Truncated {
        /// Byte offset where the missing bytes were expected.
        offset: usize,
        /// 0-based index of the value being decoded.
        index: usize,
        /// How many bytes were missing.
        needed: usize,
    },
    /// A tag byte names no SQLite type.
    #[error("packed primary key: value {index} at byte {offset} has unknown type tag 0x{tag:02x}")]
    BadType {
        /// Byte offset of the tag.
        offset: usize,
        /// 0-based index of the value.
        index: usize,
        /// The tag byte.
        tag: u8,
    },
    /// An integer or length width above 8 bytes.
    #[error(
        "packed primary key: value {index} at byte {offset} declares a {width}-byte width (at most 8)"
    )]
    BadWidth {
        /// Byte offset of the tag.
        offset: usize,
        /// 0-based index of the value.
        index: usize,
        /// The declared width.
        width: usize,
    },
    /// A TEXT value whose bytes are not UTF-8.
    #[error("packed primary key: value {index} is TEXT but not valid UTF-8")]
    NotUtf8 {
        /// 0-based index of the value.
        index: usize,
    },
    /// More than 255 values (the count is one byte).
    #[error("cannot pack {count} values: a packed primary key holds at most 255")]
    TooMany {
        /// The number of values given.
        count: usize,
    },
    /// A TEXT or BLOB longer than 4 GiB.
    #[error("cannot pack a {len}-byte value: lengths are at most 4 bytes wide")]
    TooLong {
        /// The length.
        len: usize,
    },
}

/// cr-sqlite packed primary-key bytes: the `pk` column of `crsql_changes`.
///
/// `Display` and serde use lowercase hex.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PackedPk(pub Vec<u8>);

impl PackedPk {
    /// Packs values in primary-key order.
    pub fn pack(values: &[Value]) -> Result<PackedPk, PkError> {
        let mut out = Vec::with_capacity(1 + values.len() * 9);
        pack_into(
            values.iter().map(Value::as_value_ref),
            values.len(),
            &mut out,
        )?;
        Ok(PackedPk(out))
    }

    /// Decodes the values (lenient, like cr-sqlite: non-minimal widths and
    /// trailing bytes are accepted).
    pub fn unpack(&self) -> Result<Vec<Value>, PkError> {
        unpack(&self.0)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The minimal (canonical) encoding of the same values, as cr-sqlite
    /// re-encodes a key it received.
    pub fn canonical(&self) -> Result<PackedPk, PkError> {
        PackedPk::pack(&self.unpack()?)
    }

    /// Lowercase hex of the bytes.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }

    /// Parses hex (either case).
    pub fn from_hex(s: &str) -> Result<PackedPk, hex::FromHexError> {
        hex::decode(s).map(PackedPk)
    }
}

impl fmt::Display for PackedPk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PackedPk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackedPk({})", self.to_hex())
    }
}

impl From<Vec<u8>> for PackedPk {
    fn from(v: Vec<u8>) -> Self {
        PackedPk(v)
    }
}

impl Serialize for PackedPk {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for PackedPk {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PackedPk::from_hex(&s).map_err(|e| serde::de::Error::custom(format!("pk must be hex: {e}")))
    }
}

/// Bytes needed for `v` seen as an unsigned 64-bit pattern (0 for 0).
fn width(v: u64) -> usize {
    (64 - v.leading_zeros() as usize).div_ceil(8)
}

/// Appends the packed form of `count` values to `out`.
pub fn pack_into<'a>(
    values: impl IntoIterator<Item = ValueRef<'a>>,
    count: usize,
    out: &mut Vec<u8>,
) -> Result<(), PkError> {
    let n = u8::try_from(count).map_err(|_| PkError::TooMany { count })?;
    out.push(n);
    for v in values {
        match v {
            ValueRef::Null => out.push(T_NULL),
            ValueRef::Integer(i) => {
                let w = width(i as u64);
                out.push(((w as u8) << 3) | T_INTEGER);
                out.extend_from_slice(&(i as u64).to_be_bytes()[8 - w..]);
            }
            ValueRef::Real(r) => {
                out.push(T_REAL);
                out.extend_from_slice(&r.to_be_bytes());
            }
            ValueRef::Text(b) => put_bytes(out, T_TEXT, b)?,
            ValueRef::Blob(b) => put_bytes(out, T_BLOB, b)?,
        }
    }
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, ty: u8, b: &[u8]) -> Result<(), PkError> {
    let len = u32::try_from(b.len()).map_err(|_| PkError::TooLong { len: b.len() })?;
    let w = width(u64::from(len));
    out.push(((w as u8) << 3) | ty);
    out.extend_from_slice(&len.to_be_bytes()[4 - w..]);
    out.extend_from_slice(b);
    Ok(())
}

/// A reading position in a packed key.
struct Reader<'a> {
    data: &'a [u8],
    offset: usize,
    index: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], PkError> {
        let rest = &self.data[self.offset..];
        if rest.len() < len {
            return Err(PkError::Truncated {
                offset: self.offset,
                index: self.index,
                needed: len - rest.len(),
            });
        }
        self.offset += len;
        Ok(&rest[..len])
    }

    /// A big-endian unsigned number of `len` bytes (zero-extended).
    fn be(&mut self, len: usize, tag_offset: usize) -> Result<u64, PkError> {
        if len > 8 {
            return Err(PkError::BadWidth {
                offset: tag_offset,
                index: self.index,
                width: len,
            });
        }
        Ok(self
            .take(len)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }
}

/// Decodes a packed key into borrowed values (TEXT checked for UTF-8).
pub fn unpack_refs(data: &[u8]) -> Result<Vec<ValueRef<'_>>, PkError> {
    let (&count, _) = data.split_first().ok_or(PkError::Empty)?;
    let mut out = Vec::with_capacity(count as usize);
    let mut r = Reader {
        data,
        offset: 1,
        index: 0,
    };
    for index in 0..count as usize {
        r.index = index;
        let tag_offset = r.offset;
        let tag = r.take(1)?[0];
        let n = (tag >> 3) as usize;
        let v = match tag & 0x07 {
            T_INTEGER => ValueRef::Integer(r.be(n, tag_offset)? as i64),
            T_REAL => ValueRef::Real(f64::from_bits(r.be(8, tag_offset)?)),
            T_NULL => ValueRef::Null,
            ty @ (T_TEXT | T_BLOB) => {
                let len = r.be(n, tag_offset)?;
                let bytes = r.take(usize::try_from(len).unwrap_or(usize::MAX))?;
                if ty == T_TEXT {
                    std::str::from_utf8(bytes).map_err(|_| PkError::NotUtf8 { index })?;
                    ValueRef::Text(bytes)
                } else {
                    ValueRef::Blob(bytes)
                }
            }
            _ => {
                return Err(PkError::BadType {
                    offset: tag_offset,
                    index,
                    tag,
                });
            }
        };
        out.push(v);
    }
    Ok(out)
}

/// The packed form of one integer.
pub fn pack_int(i: i64) -> Vec<u8> {
    let w = width(i as u64);
    let mut out = Vec::with_capacity(2 + w);
    out.push(1);
    out.push(((w as u8) << 3) | T_INTEGER);
    out.extend_from_slice(&(i as u64).to_be_bytes()[8 - w..]);
    out
}

/// The integer of a canonical one-integer packed key.
pub fn single_int(pk: &[u8]) -> Option<i64> {
    match pk {
        [1, tag, rest @ ..]
            if tag & 0x07 == T_INTEGER && rest.len() == (tag >> 3) as usize && rest.len() <= 8 =>
        {
            Some(rest.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)) as i64)
        }
        _ => None,
    }
}

/// Decodes a packed key into owned values.
pub fn unpack(data: &[u8]) -> Result<Vec<Value>, PkError> {
    Ok(unpack_refs(data)?
        .into_iter()
        .map(|v| Value::from_value_ref(v).expect("unpack_refs checked UTF-8"))
        .collect())
}

/// Re-encodes a (possibly non-minimal) packed key minimally; returns the
/// number of values too.
pub fn canonicalize(data: &[u8]) -> Result<(Vec<u8>, usize), PkError> {
    let vals = unpack_refs(data)?;
    let mut out = Vec::with_capacity(data.len());
    pack_into(vals.iter().copied(), vals.len(), &mut out)?;
    Ok((out, vals.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(values: &[Value], hex: &str) {
        let packed = PackedPk::pack(values).unwrap();
        assert_eq!(packed.to_hex().to_uppercase(), hex, "packing {values:?}");
        let back = PackedPk::from_hex(hex).unwrap().unpack().unwrap();
        assert_eq!(back.len(), values.len());
        for (b, v) in back.iter().zip(values) {
            match (b, v) {
                (Value::Real(x), Value::Real(y)) => assert_eq!(x.to_bits(), y.to_bits()),
                _ => assert_eq!(b, v, "decoding {hex}"),
            }
        }
    }

    fn i(v: i64) -> Value {
        Value::Integer(v)
    }

    #[test]
    fn integers_match_cr_sqlite_byte_for_byte() {
        check(&[i(0)], "0101");
        check(&[i(1)], "010901");
        check(&[i(127)], "01097F");
        check(&[i(128)], "010980");
        check(&[i(255)], "0109FF");
        check(&[i(256)], "01110100");
        check(&[i(65535)], "0111FFFF");
        check(&[i(65536)], "0119010000");
        check(&[i((1 << 31) - 1)], "01217FFFFFFF");
        check(&[i(1 << 31)], "012180000000");
        check(&[i(1 << 32)], "01290100000000");
        check(&[i(1 << 40)], "0131010000000000");
        check(&[i((1 << 56) - 1)], "0139FFFFFFFFFFFFFF");
        check(&[i(1 << 56)], "01410100000000000000");
        check(&[i(-1)], "0141FFFFFFFFFFFFFFFF");
        check(&[i(-128)], "0141FFFFFFFFFFFFFF80");
        check(&[i(i64::MIN)], "01418000000000000000");
        check(&[i(i64::MAX)], "01417FFFFFFFFFFFFFFF");
    }

    #[test]
    fn reals_text_blobs_null_match_cr_sqlite() {
        check(&[Value::Real(1.5)], "01023FF8000000000000");
        check(&[Value::Real(0.0)], "01020000000000000000");
        check(&[Value::Real(-2.25)], "0102C002000000000000");
        check(&[Value::Text("abc".into())], "010B03616263");
        check(&[Value::Text(String::new())], "0103");
        check(&[Value::Text("é".into())], "010B02C3A9");
        check(&[Value::Blob(vec![1, 2])], "010C020102");
        check(&[Value::Blob(vec![])], "0104");
        check(&[Value::Null], "0105");
        let blob256 = PackedPk::pack(&[Value::Blob(vec![7; 256])]).unwrap();
        assert_eq!(blob256.to_hex()[..8].to_uppercase(), "01140100");
        let text256 = PackedPk::pack(&[Value::Text("x".repeat(256))]).unwrap();
        assert_eq!(text256.to_hex()[..8].to_uppercase(), "01130100");
        let blob70k = PackedPk::pack(&[Value::Blob(vec![0; 70000])]).unwrap();
        assert_eq!(blob70k.to_hex()[..10].to_uppercase(), "011C011170");
        assert_eq!(blob70k.unpack().unwrap(), vec![Value::Blob(vec![0; 70000])]);
    }

    #[test]
    fn composite_keys() {
        check(&[i(1), Value::Text("abc".into())], "0209010B03616263");
        check(
            &[Value::Blob(vec![0xff]), Value::Null, Value::Real(2.0)],
            "030C01FF05024000000000000000",
        );
        check(
            &[
                Value::Text("a".into()),
                Value::Text("b".into()),
                Value::Text("c".into()),
            ],
            "030B01610B01620B0163",
        );
        check(&[], "00");
    }

    #[track_caller]
    fn check_lenient(hex: &str, expected: &[Value], canonical: &str) {
        let pk = PackedPk::from_hex(hex).unwrap();
        assert_eq!(pk.unpack().unwrap(), expected);
        assert_eq!(pk.canonical().unwrap().to_hex().to_uppercase(), canonical);
    }

    #[test]
    fn decoding_is_lenient_and_zero_extends() {
        // Non-minimal 8-byte 1 (e12): accepted, re-encoded canonically.
        check_lenient("01410000000000000001", &[i(1)], "010901");
        // 0x80 in one byte is +128 (zero-extension, not sign extension).
        check_lenient("010980", &[i(128)], "010980");
        // A 2-byte-wide 5.
        check_lenient("01110005", &[i(5)], "010905");
        // Trailing bytes after the declared values are ignored.
        check_lenient("010901FFFF", &[i(1)], "010901");
        // A text length written with a 2-byte width.
        check_lenient("01130002C3A9", &[Value::Text("é".into())], "010B02C3A9");
    }

    #[track_caller]
    fn check_error(hex: &str, expected: PkError) {
        let err = PackedPk::from_hex(hex).unwrap().unpack().unwrap_err();
        assert_eq!(err, expected, "{hex}: {err}");
    }

    #[test]
    fn malformed_keys_are_refused_with_a_reason() {
        check_error("", PkError::Empty);
        check_error(
            "0109",
            PkError::Truncated {
                offset: 2,
                index: 0,
                needed: 1,
            },
        );
        check_error(
            "0209010B",
            PkError::Truncated {
                offset: 4,
                index: 1,
                needed: 1,
            },
        );
        check_error(
            "010B0561",
            PkError::Truncated {
                offset: 3,
                index: 0,
                needed: 4,
            },
        );
        check_error(
            "0100",
            PkError::BadType {
                offset: 1,
                index: 0,
                tag: 0,
            },
        );
        check_error(
            "0106",
            PkError::BadType {
                offset: 1,
                index: 0,
                tag: 6,
            },
        );
        check_error(
            "0149",
            PkError::BadWidth {
                offset: 1,
                index: 0,
                width: 9,
            },
        );
        check_error("010B01FF", PkError::NotUtf8 { index: 0 });
        assert_eq!(
            PackedPk::pack(&vec![Value::Null; 256]).unwrap_err(),
            PkError::TooMany { count: 256 }
        );
    }

    #[test]
    fn serde_is_hex() {
        let pk = PackedPk(vec![1, 9, 1]);
        assert_eq!(serde_json::to_string(&pk).unwrap(), "\"010901\"");
        let back: PackedPk = serde_json::from_str("\"010901\"").unwrap();
        assert_eq!(back, pk);
        assert!(serde_json::from_str::<PackedPk>("\"zz\"").is_err());
    }
}
