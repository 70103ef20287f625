//! The server's own tables in the server database (local tables, never
//! synced): peers (site binding, `pushed_version`), acknowledged
//! subscription state (cursor and held rows), and the last answer
//! delivered to each HTTP puller. Only the engine thread calls
//! these, on its connection.

use rusqlite::{Connection, OptionalExtension, params};
use tenantsync_core::{PackedPk, SiteId};

use crate::engine::PkSet;

pub(crate) const CREATE: &str = "
CREATE TABLE IF NOT EXISTS tenantsync_peers (
  site_id BLOB PRIMARY KEY,
  subject TEXT NOT NULL,
  tenant TEXT,
  claims TEXT,
  pushed_version INTEGER NOT NULL DEFAULT 0,
  first_seen INTEGER NOT NULL,
  last_seen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tenantsync_subscriptions (
  site_id BLOB NOT NULL,
  sub_id TEXT NOT NULL,
  query TEXT NOT NULL,
  tbl TEXT NOT NULL,
  cursor INTEGER NOT NULL,
  held BLOB NOT NULL,
  updated_at INTEGER NOT NULL,
  PRIMARY KEY (site_id, sub_id)
);
-- The last answer delivered to an HTTP puller and not acknowledged yet
-- (its next pull's cursor does that), kept when its state leaves memory
-- (idle, or a shutdown) so that pull can still resume.
CREATE TABLE IF NOT EXISTS tenantsync_pull_delivered (
  site_id BLOB NOT NULL,
  sub_id TEXT NOT NULL,
  query TEXT NOT NULL,
  cursor INTEGER NOT NULL,
  held BLOB NOT NULL,
  PRIMARY KEY (site_id, sub_id)
);
CREATE INDEX IF NOT EXISTS tenantsync_peers_tenant ON tenantsync_peers (tenant);
CREATE INDEX IF NOT EXISTS tenantsync_peers_last_seen ON tenantsync_peers (last_seen);
";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A peer as stored.
#[derive(Debug, Clone)]
pub(crate) struct PeerRow {
    pub subject: String,
    pub tenant: Option<String>,
    pub claims: Option<String>,
    pub pushed_version: i64,
}

pub(crate) fn load_peer(conn: &Connection, site: &SiteId) -> rusqlite::Result<Option<PeerRow>> {
    conn.prepare_cached(
        "SELECT subject, tenant, claims, pushed_version FROM tenantsync_peers WHERE site_id = ?1",
    )?
    .query_row([site.0.as_slice()], |r| {
        Ok(PeerRow {
            subject: r.get(0)?,
            tenant: r.get(1)?,
            claims: r.get(2)?,
            pushed_version: r.get(3)?,
        })
    })
    .optional()
}

/// Binds a new peer or refreshes a known one's tenant and claims.
pub(crate) fn upsert_peer(
    conn: &Connection,
    site: &SiteId,
    subject: &str,
    tenant: Option<&str>,
    claims: &str,
) -> rusqlite::Result<()> {
    let t = now();
    conn.prepare_cached(
        "INSERT INTO tenantsync_peers (site_id, subject, tenant, claims, pushed_version, first_seen, last_seen)
         VALUES (?1, ?2, ?3, ?4, 0, ?5, ?5)
         ON CONFLICT (site_id) DO UPDATE SET tenant = excluded.tenant, claims = excluded.claims, last_seen = excluded.last_seen",
    )?
    .execute(params![site.0.as_slice(), subject, tenant, claims, t])?;
    Ok(())
}

/// Records that a known peer was just active (it is loaded again after
/// its in-memory state expired, or leaves memory now).
pub(crate) fn touch_peer(conn: &Connection, site: &SiteId) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE tenantsync_peers SET last_seen = ?2 WHERE site_id = ?1")?
        .execute(params![site.0.as_slice(), now()])?;
    Ok(())
}

/// The peers a tenant has (its bound site ids).
pub(crate) fn count_peers_of(conn: &Connection, tenant: Option<&str>) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT count(*) FROM tenantsync_peers WHERE tenant IS ?1")?
        .query_row([tenant], |r| r.get::<_, i64>(0))
        .map(|n| n.max(0) as u64)
}

/// Forgets the peers not seen for `retention` (except those in `keep`,
/// the connected ones) with their subscriptions' state; returns how many.
pub(crate) fn forget_peers(
    conn: &Connection,
    retention: std::time::Duration,
    keep: &dyn Fn(&SiteId) -> bool,
) -> rusqlite::Result<usize> {
    let before = now().saturating_sub(retention.as_secs().min(i64::MAX as u64) as i64);
    let old: Vec<Vec<u8>> = conn
        .prepare_cached("SELECT site_id FROM tenantsync_peers WHERE last_seen < ?1")?
        .query_map([before], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut n = 0;
    for raw in old {
        let Ok(bytes) = <[u8; 16]>::try_from(raw.as_slice()) else {
            continue;
        };
        if keep(&SiteId(bytes)) {
            continue;
        }
        conn.prepare_cached("DELETE FROM tenantsync_subscriptions WHERE site_id = ?1")?
            .execute([&raw])?;
        conn.prepare_cached("DELETE FROM tenantsync_pull_delivered WHERE site_id = ?1")?
            .execute([&raw])?;
        conn.prepare_cached("DELETE FROM tenantsync_peers WHERE site_id = ?1")?
            .execute([&raw])?;
        n += 1;
    }
    Ok(n)
}

pub(crate) fn set_pushed_version(conn: &Connection, site: &SiteId, v: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE tenantsync_peers SET pushed_version = ?2 WHERE site_id = ?1")?
        .execute(params![site.0.as_slice(), v])?;
    Ok(())
}

/// A subscription's acknowledged state as stored.
#[derive(Debug, Clone)]
pub(crate) struct SubRow {
    pub query: String,
    pub table: String,
    pub cursor: i64,
    pub held: PkSet,
}

pub(crate) fn load_sub(
    conn: &Connection,
    site: &SiteId,
    sub: &str,
) -> rusqlite::Result<Option<SubRow>> {
    conn.prepare_cached(
        "SELECT query, tbl, cursor, held FROM tenantsync_subscriptions WHERE site_id = ?1 AND sub_id = ?2",
    )?
    .query_row(params![site.0.as_slice(), sub], |r| {
        let blob: Vec<u8> = r.get(3)?;
        Ok(SubRow {
            query: r.get(0)?,
            table: r.get(1)?,
            cursor: r.get(2)?,
            held: decode_held(&blob).unwrap_or_default(),
        })
    })
    .optional()
}

pub(crate) fn load_subs_of(
    conn: &Connection,
    site: &SiteId,
) -> rusqlite::Result<Vec<(String, SubRow)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT sub_id, query, tbl, cursor, held FROM tenantsync_subscriptions WHERE site_id = ?1 ORDER BY sub_id",
    )?;
    let rows = stmt.query_map([site.0.as_slice()], |r| {
        let blob: Vec<u8> = r.get(4)?;
        Ok((
            r.get(0)?,
            SubRow {
                query: r.get(1)?,
                table: r.get(2)?,
                cursor: r.get(3)?,
                held: decode_held(&blob).unwrap_or_default(),
            },
        ))
    })?;
    rows.collect()
}

/// Writes a subscription's acknowledged state; `held` None keeps the stored
/// held set (only the cursor moved).
pub(crate) fn save_sub(
    conn: &Connection,
    site: &SiteId,
    sub: &str,
    query: &str,
    table: &str,
    cursor: i64,
    held: Option<&PkSet>,
) -> rusqlite::Result<()> {
    match held {
        Some(h) => {
            conn.prepare_cached(
                "INSERT INTO tenantsync_subscriptions (site_id, sub_id, query, tbl, cursor, held, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (site_id, sub_id) DO UPDATE SET query = excluded.query, tbl = excluded.tbl,
                   cursor = excluded.cursor, held = excluded.held, updated_at = excluded.updated_at",
            )?
            .execute(params![site.0.as_slice(), sub, query, table, cursor, encode_held(h), now()])?;
        }
        None => {
            conn.prepare_cached(
                "UPDATE tenantsync_subscriptions SET cursor = ?3, updated_at = ?4 WHERE site_id = ?1 AND sub_id = ?2",
            )?
            .execute(params![site.0.as_slice(), sub, cursor, now()])?;
        }
    }
    Ok(())
}

pub(crate) fn delete_sub(conn: &Connection, site: &SiteId, sub: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM tenantsync_subscriptions WHERE site_id = ?1 AND sub_id = ?2")?
        .execute(params![site.0.as_slice(), sub])?;
    conn.prepare_cached(
        "DELETE FROM tenantsync_pull_delivered WHERE site_id = ?1 AND sub_id = ?2",
    )?
    .execute(params![site.0.as_slice(), sub])?;
    Ok(())
}

/// Keeps the last answer delivered to a puller (not acknowledged yet).
pub(crate) fn save_delivered(
    conn: &Connection,
    site: &SiteId,
    sub: &str,
    query: &str,
    cursor: i64,
    held: &PkSet,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO tenantsync_pull_delivered (site_id, sub_id, query, cursor, held)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        site.0.as_slice(),
        sub,
        query,
        cursor,
        encode_held(held)
    ])?;
    Ok(())
}

/// The last answer delivered to a puller for `query`, if kept.
pub(crate) fn load_delivered(
    conn: &Connection,
    site: &SiteId,
    sub: &str,
    query: &str,
) -> rusqlite::Result<Option<(i64, PkSet)>> {
    conn.prepare_cached(
        "SELECT cursor, held FROM tenantsync_pull_delivered WHERE site_id = ?1 AND sub_id = ?2 AND query = ?3",
    )?
    .query_row(params![site.0.as_slice(), sub, query], |r| {
        let blob: Vec<u8> = r.get(1)?;
        Ok((r.get(0)?, decode_held(&blob).unwrap_or_default()))
    })
    .optional()
}

/// The sorted, length-prefixed (unsigned LEB128) list of packed pks.
pub(crate) fn encode_held(h: &PkSet) -> Vec<u8> {
    let mut pks: Vec<&PackedPk> = h.iter().collect();
    pks.sort();
    let mut out = Vec::with_capacity(pks.iter().map(|p| p.0.len() + 2).sum());
    for p in pks {
        let mut n = p.0.len();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        out.extend_from_slice(&p.0);
    }
    out
}

pub(crate) fn decode_held(mut b: &[u8]) -> Option<PkSet> {
    let mut out = PkSet::default();
    while !b.is_empty() {
        let mut n = 0usize;
        let mut shift = 0;
        loop {
            let (&x, rest) = b.split_first()?;
            b = rest;
            n |= ((x & 0x7f) as usize) << shift;
            if x & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 28 {
                return None;
            }
        }
        if b.len() < n {
            return None;
        }
        out.insert(PackedPk(b[..n].to_vec()));
        b = &b[n..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_sets_round_trip() {
        let mut h = PkSet::default();
        for i in 0..300u32 {
            h.insert(PackedPk(vec![1; (i % 200) as usize]));
            h.insert(PackedPk(i.to_be_bytes().to_vec()));
        }
        let b = encode_held(&h);
        assert_eq!(decode_held(&b).unwrap(), h);
        assert_eq!(decode_held(&[]).unwrap(), PkSet::default());
        assert!(decode_held(&[5, 1]).is_none());
    }
}
