//! The CommitBatch: after a commit, every clock it stamped, grouped by row,
//! each change encoded to its wire JSON once, with the row's after-image;
//! and whole rows (every clock) for rows entering views, read on the same
//! connection, still exactly at the commit's version.

use std::collections::BTreeMap;
use std::sync::Arc;

use tenantsync_core::{Change, ChangesQuery, CrrConnection, PackedPk};

use super::filters::{ChangedRow, FxMap};
use crate::engine::outbox::{Enc, RowChanges};
use crate::engine::schema::ServerSchema;

/// Reads the rows a commit changed: versions `(since, until]`.
pub(crate) fn read_batch(
    db: &CrrConnection,
    schema: &ServerSchema,
    since: i64,
    until: i64,
) -> tenantsync_core::Result<Vec<ChangedRow>> {
    let changes = db.changes(&ChangesQuery {
        since,
        until: Some(until),
        ..ChangesQuery::default()
    })?;
    // Group by row, keeping the order of first appearance.
    let mut order: Vec<(u16, PackedPk)> = Vec::new();
    let mut groups: FxMap<(u16, PackedPk), Vec<Enc>> = FxMap::default();
    for c in &changes {
        let Some(t) = schema.table(&c.table) else {
            continue;
        };
        let key = (t.id, c.pk.clone());
        let g = groups.entry(key.clone()).or_insert_with(|| {
            order.push(key);
            Vec::new()
        });
        g.push(Enc::new(c));
    }
    let mut out = Vec::with_capacity(order.len());
    for key in order {
        let encs = groups.remove(&key).expect("grouped");
        let t = &schema.tables[key.0 as usize];
        let after = db.row_values(&t.name, &key.1)?;
        out.push(ChangedRow {
            table: key.0,
            delta: Arc::new(RowChanges {
                table: t.name.clone(),
                pk: key.1.clone(),
                changes: encs,
            }),
            pk: key.1,
            after,
        });
    }
    Ok(out)
}

/// Whole rows (every clock, current values), encoded, per (table, pk).
pub(crate) fn whole_rows(
    db: &CrrConnection,
    schema: &ServerSchema,
    wanted: impl IntoIterator<Item = (u16, PackedPk)>,
) -> tenantsync_core::Result<FxMap<(u16, PackedPk), Arc<RowChanges>>> {
    let mut by_table: BTreeMap<u16, Vec<PackedPk>> = BTreeMap::new();
    for (t, pk) in wanted {
        by_table.entry(t).or_default().push(pk);
    }
    let mut out = FxMap::default();
    for (t, mut pks) in by_table {
        pks.sort();
        pks.dedup();
        let table = &schema.tables[t as usize];
        let mut grouped: FxMap<PackedPk, Vec<Enc>> = FxMap::default();
        for chunk in pks.chunks(500) {
            for c in db.row_changes(&table.name, chunk)? {
                grouped.entry(c.pk.clone()).or_default().push(Enc::new(&c));
            }
        }
        for pk in pks {
            let changes = grouped.remove(&pk).unwrap_or_default();
            out.insert(
                (t, pk.clone()),
                Arc::new(RowChanges {
                    table: table.name.clone(),
                    pk,
                    changes,
                }),
            );
        }
    }
    Ok(out)
}

/// Whole rows as changes (for refusals' `state`).
pub(crate) fn whole_changes(
    db: &CrrConnection,
    table: &str,
    pks: &[PackedPk],
) -> tenantsync_core::Result<Vec<Change>> {
    let mut out = Vec::new();
    for chunk in pks.chunks(500) {
        out.extend(db.row_changes(table, chunk)?);
    }
    Ok(out)
}
