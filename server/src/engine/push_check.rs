//! Cheap checks of a push before it reaches the engine: the shape of its
//! range and of each change (what cr-sqlite itself would emit).

use tenantsync_core::Change;
use tenantsync_protocol::ErrorCode;

use crate::contract::ApiError;
use crate::engine::schema::ServerSchema;

/// Why a change is not one cr-sqlite emits (docs/TESTING.md, "Fuzzing":
/// ill-formed changes merge, but not idempotently, so a server refuses
/// them): a causal length below 1, a column change of a deleted row (even
/// `cl`), a sentinel whose `col_version` is not its causal length or whose
/// value is not NULL, a column version below 1, a negative `seq`.
pub(crate) fn ill_formed(c: &Change) -> Option<String> {
    if c.cl < 1 {
        return Some(format!("its causal length {} is below 1", c.cl));
    }
    if c.seq < 0 {
        return Some(format!("its seq {} is negative", c.seq));
    }
    if c.is_sentinel() {
        if c.col_version != c.cl {
            return Some(format!(
                "a sentinel's col_version ({}) must equal its causal length ({})",
                c.col_version, c.cl
            ));
        }
        if c.val != tenantsync_types::Value::Null {
            return Some("a sentinel's value must be null".into());
        }
    } else {
        if c.cl % 2 == 0 {
            return Some(format!(
                "a column change must have an odd causal length (a live row), not {}",
                c.cl
            ));
        }
        if c.col_version < 1 {
            return Some(format!("its col_version {} is below 1", c.col_version));
        }
    }
    None
}

/// What a push costs its tenant's byte budget: about the size of its
/// changes on the wire (the JSON of each change: its table, key, column and
/// value, and the fixed fields), whichever transport carried them.
pub(crate) fn push_bytes(changes: &[Change]) -> usize {
    use tenantsync_types::Value;
    changes
        .iter()
        .map(|c| {
            let val = match &c.val {
                Value::Null => 4,
                Value::Integer(_) | Value::Real(_) => 20,
                Value::Text(t) => t.len() + 2,
                Value::Blob(b) => 2 * b.len() + 8,
            };
            // Fixed fields and their names; hex of the key.
            120 + c.table.len() + 2 * c.pk.as_bytes().len() + c.cid.len() + val
        })
        .sum()
}

/// Cheap checks of a push before it reaches the engine.
pub(crate) fn validate_push(
    schema: &ServerSchema,
    site: &tenantsync_core::SiteId,
    from: i64,
    to: i64,
    changes: &[Change],
) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::BadPush, m);
    if to < from {
        return Err(bad(format!(
            "the range ({from}, {to}] is empty: `to` must be at least `from`"
        )));
    }
    if to > tenantsync_protocol::MAX_CLOCK {
        return Err(bad(format!(
            "`to` {to} is above {}, the largest version a peer may push (docs/PROTOCOL.md, \"Clocks\")",
            tenantsync_protocol::MAX_CLOCK
        )));
    }
    for (i, c) in changes.iter().enumerate() {
        if c.site_id != *site {
            return Err(ApiError::new(
                ErrorCode::SiteMismatch,
                format!(
                    "change {i} was authored by site {}, not by the pushing peer {site}: push only your own changes",
                    c.site_id
                ),
            ));
        }
        if c.db_version <= from || c.db_version > to {
            return Err(bad(format!(
                "change {i} has db_version {}, outside the push's range ({from}, {to}]",
                c.db_version
            )));
        }
        let Some(t) = schema.table(&c.table) else {
            return Err(bad(format!(
                "change {i}: table {:?} is not a CRR of this server",
                c.table
            )));
        };
        if !c.is_sentinel() && t.column(&c.cid).is_none() {
            return Err(bad(format!(
                "change {i}: table {:?} has no column {:?}",
                c.table, c.cid
            )));
        }
        if let Some(why) = ill_formed(c) {
            return Err(bad(format!(
                "change {i} ({:?}, pk {}, column {:?}) is not a change cr-sqlite emits: {why}",
                c.table, c.pk, c.cid
            )));
        }
        match c.pk.unpack() {
            Ok(v) if v.len() == t.pk.len() => {}
            Ok(v) => {
                return Err(bad(format!(
                    "change {i}: the pk of {:?} has {} values, the table's key has {}",
                    c.table,
                    v.len(),
                    t.pk.len()
                )));
            }
            Err(e) => {
                return Err(bad(format!(
                    "change {i}: the pk {} does not decode: {e}",
                    c.pk
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tenantsync_core::Change;

    /// Regression (issue 6): ill-formed changes merge in cr-sqlite 0.16, but
    /// not idempotently, so a push carrying one is refused before the
    /// engine (docs/TESTING.md, "Fuzzing").
    #[test]
    fn ill_formed_changes_are_named() {
        fn change(cid: &str, val: tenantsync_types::Value, col_version: i64, cl: i64) -> Change {
            Change {
                table: "t".into(),
                pk: tenantsync_core::PackedPk::pack(&[tenantsync_types::Value::Integer(1)])
                    .unwrap(),
                cid: cid.into(),
                val,
                col_version,
                db_version: 1,
                site_id: tenantsync_core::SiteId([1; 16]),
                cl,
                seq: 0,
            }
        }
        use tenantsync_types::Value::{Integer, Null};
        let check = |c: Change, expected: Option<&str>| {
            let got = super::ill_formed(&c);
            match expected {
                None => assert_eq!(got, None, "{c:?}"),
                Some(e) => assert!(got.as_deref().unwrap_or("").contains(e), "{c:?}: {got:?}"),
            }
        };
        check(change("a", Integer(5), 1, 1), None);
        check(change("a", Integer(5), 4, 3), None);
        check(change("-1", Null, 1, 1), None);
        check(change("-1", Null, 2, 2), None);
        check(change("a", Integer(5), 1, 2), Some("odd causal length"));
        check(
            change("a", Integer(5), 0, 1),
            Some("col_version 0 is below 1"),
        );
        check(
            change("-1", Null, 3, 1),
            Some("must equal its causal length"),
        );
        check(change("-1", Integer(1), 1, 1), Some("value must be null"));
        check(change("-1", Null, 0, 0), Some("causal length 0 is below 1"));
        let mut neg = change("a", Integer(5), 1, 1);
        neg.seq = -1;
        check(neg, Some("seq -1 is negative"));
    }
}
