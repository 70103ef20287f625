//! Changes on the wire.
//!
//! A change is cr-sqlite's `crsql_changes` row as a JSON array in the
//! vtab's column order:
//!
//! ```text
//! [table, pk, cid, val, col_version, db_version, site_id, cl, seq]
//! ```
//!
//! `pk` and `site_id` are lowercase hex, `val` uses the exact value encoding.
//! Lists of changes are `Vec<Change>` in Rust; use [`WireChanges`] (or the
//! `#[serde(with = "tenantsync_protocol::change::array_list")]` attribute) to
//! put them on the wire.

use std::fmt::Write as _;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tenantsync_types::Value;
use tenantsync_types::{Change, PackedPk, SiteId};

/// A row named by table and packed pk: what an eviction or a refused-row
/// report names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RowKey {
    /// The CRR.
    pub table: String,
    /// Packed primary key (hex on the wire).
    pub pk: PackedPk,
}

/// A list of changes with the array wire form.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WireChanges(pub Vec<Change>);

impl Serialize for WireChanges {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        array_list::serialize(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for WireChanges {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        array_list::deserialize(d).map(WireChanges)
    }
}

/// One change in the array form (borrowing, for serialisation).
struct ArrayRef<'a>(&'a Change);

impl Serialize for ArrayRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let c = self.0;
        let mut seq = s.serialize_seq(Some(9))?;
        seq.serialize_element(&c.table)?;
        seq.serialize_element(&c.pk.to_hex())?;
        seq.serialize_element(&c.cid)?;
        seq.serialize_element(&c.val)?;
        seq.serialize_element(&c.col_version)?;
        seq.serialize_element(&c.db_version)?;
        seq.serialize_element(&c.site_id.to_string())?;
        seq.serialize_element(&c.cl)?;
        seq.serialize_element(&c.seq)?;
        seq.end()
    }
}

/// One change in the array form (owning, for deserialisation).
struct ArrayOwned(Change);

impl<'de> Deserialize<'de> for ArrayOwned {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(ChangeVisitor).map(ArrayOwned)
    }
}

struct ChangeVisitor;

impl<'de> Visitor<'de> for ChangeVisitor {
    type Value = Change;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "a change: [table, pk hex, cid, val, col_version, db_version, site_id hex, cl, seq]",
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Change, A::Error> {
        fn next<'de, A: SeqAccess<'de>, T: Deserialize<'de>>(
            seq: &mut A,
            index: usize,
            name: &str,
        ) -> Result<T, A::Error> {
            seq.next_element::<T>()
                .map_err(|e| de::Error::custom(format!("change element {index} ({name}): {e}")))?
                .ok_or_else(|| {
                    de::Error::custom(format!(
                        "a change has 9 elements; element {index} ({name}) is missing"
                    ))
                })
        }
        let table: String = next(&mut seq, 0, "table")?;
        let pk: String = next(&mut seq, 1, "pk")?;
        let pk = PackedPk::from_hex(&pk)
            .map_err(|e| de::Error::custom(format!("change element 1 (pk) is not hex: {e}")))?;
        let cid: String = next(&mut seq, 2, "cid")?;
        let val: Value = next(&mut seq, 3, "val")?;
        let col_version: i64 = next(&mut seq, 4, "col_version")?;
        let db_version: i64 = next(&mut seq, 5, "db_version")?;
        let site: String = next(&mut seq, 6, "site_id")?;
        let site_id: SiteId = site
            .parse()
            .map_err(|e| de::Error::custom(format!("change element 6 (site_id): {e}")))?;
        let cl: i64 = next(&mut seq, 7, "cl")?;
        let seq_no: i64 = next(&mut seq, 8, "seq")?;
        if seq.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::custom("a change has 9 elements; found more"));
        }
        Ok(Change {
            table,
            pk,
            cid,
            val,
            col_version,
            db_version,
            site_id,
            cl,
            seq: seq_no,
        })
    }
}

/// `#[serde(with = "array_list")]` for `Vec<Change>` fields.
pub mod array_list {
    use super::*;

    /// Serialises changes as a JSON array of 9-element arrays.
    pub fn serialize<S: Serializer>(changes: &[Change], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(changes.len()))?;
        for c in changes {
            seq.serialize_element(&ArrayRef(c))?;
        }
        seq.end()
    }

    /// Reads a JSON array of 9-element arrays.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Change>, D::Error> {
        let list: Vec<ArrayOwned> = Vec::deserialize(d)?;
        Ok(list.into_iter().map(|a| a.0).collect())
    }
}

/// Appends the wire JSON of one change to `out` (no separators). The server
/// encodes each change of a fan-out batch once with this and splices the text
/// into every recipient's message.
pub fn encode_change(c: &Change, out: &mut String) {
    // serde_json writes into a Vec<u8>; the result is valid UTF-8 JSON.
    let json = serde_json::to_string(&ArrayRef(c)).expect("a change always serialises");
    out.push_str(&json);
}

/// Appends `[c1,c2,...]` for pre-encoded changes.
pub fn join_encoded<'a>(encoded: impl IntoIterator<Item = &'a str>, out: &mut String) {
    out.push('[');
    for (i, e) in encoded.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(e);
    }
    out.push(']');
}

/// Appends a JSON string literal (quoted and escaped) to `out`.
pub fn push_json_str(s: &str, out: &mut String) {
    let _ = write!(out, "{}", serde_json::Value::String(s.to_owned()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change() -> Change {
        Change {
            table: "todos".into(),
            pk: PackedPk(vec![0x01, 0x09, 0x05]),
            cid: "title".into(),
            val: Value::Real(2.0),
            col_version: 3,
            db_version: 9_007_199_254_740_993,
            site_id: SiteId([0xab; 16]),
            cl: 1,
            seq: 0,
        }
    }

    #[test]
    fn a_change_is_a_nine_element_array() {
        let json = serde_json::to_string(&WireChanges(vec![change()])).unwrap();
        assert_eq!(
            json,
            r#"[["todos","010905","title",2.0,3,9007199254740993,"abababababababababababababababab",1,0]]"#
        );
        let back: WireChanges = serde_json::from_str(&json).unwrap();
        assert_eq!(back.0, vec![change()]);
        let mut out = String::new();
        encode_change(&change(), &mut out);
        assert_eq!(format!("[{out}]"), json);
    }

    #[track_caller]
    fn check_refused(json: &str, expected: &str) {
        let err = serde_json::from_str::<WireChanges>(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{json}: {err}");
    }

    #[test]
    fn malformed_changes_are_refused_with_the_element_named() {
        let site = "ab".repeat(16);
        check_refused(r#"[["t","0109"]]"#, "element 2 (cid) is missing");
        check_refused(
            &format!(r#"[["t","zz","a",1,1,1,"{site}",1,0]]"#),
            "element 1 (pk) is not hex",
        );
        check_refused(
            r#"[["t","0109","a",1,1,1,"abc",1,0]]"#,
            "element 6 (site_id)",
        );
        check_refused(
            &format!(r#"[["t","0109","a",1,"1",1,"{site}",1,0]]"#),
            "element 4 (col_version)",
        );
        check_refused(
            &format!(r#"[["t","0109","a",1,1,1,"{site}",1,0,9]]"#),
            "found more",
        );
        check_refused(r#"[{"table":"t"}]"#, "a change: [table");
    }
}
