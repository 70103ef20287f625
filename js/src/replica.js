// The replica: a real cr-sqlite 0.16 database plus the client's own tables
// (docs/PROTOCOL.md §11 rule 1): subscriptions and their cursors, the rows
// each subscription holds, pushed_version, the local versions merges wrote,
// pushed rows to settle, and the quarantine. Every method runs inside one
// `exclusive` transaction of the caller's (data, held keys and cursors
// commit together), and follows the recipes of PROTOCOL.md §12.

import { fromHex, int, sqlValue, stringify, toHex } from "./json.js";

const TABLES = `
CREATE TABLE IF NOT EXISTS tenantsync_meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS tenantsync_subs (id TEXT PRIMARY KEY, query TEXT NOT NULL, cursor INTEGER);
CREATE TABLE IF NOT EXISTS tenantsync_held (sub TEXT NOT NULL, tbl TEXT NOT NULL, pk BLOB NOT NULL, PRIMARY KEY (sub, tbl, pk)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tenantsync_held_row ON tenantsync_held (tbl, pk);
CREATE TABLE IF NOT EXISTS tenantsync_merged (lo INTEGER PRIMARY KEY, hi INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tenantsync_settle (tbl TEXT NOT NULL, pk BLOB NOT NULL, server_version INTEGER NOT NULL, PRIMARY KEY (tbl, pk)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tenantsync_quarantine (
  id INTEGER PRIMARY KEY, tbl TEXT, pk BLOB, cid TEXT, val, col_version INTEGER,
  db_version INTEGER, site_id BLOB, cl INTEGER, seq INTEGER,
  reason TEXT NOT NULL, code TEXT, detail TEXT, at INTEGER NOT NULL);
`;

/** The client's own tables (live queries never depend on them). */
export const OWN_TABLES = new Set([
  "tenantsync_meta",
  "tenantsync_subs",
  "tenantsync_held",
  "tenantsync_merged",
  "tenantsync_settle",
  "tenantsync_quarantine",
]);

const CHANGES = `SELECT "table", pk, cid, val, col_version, db_version, site_id, cl, seq FROM crsql_changes`;
const quote = (name) => `"${String(name).replaceAll('"', '""')}"`;
const rowKey = (table, pkHex) => `${table}\u0000${pkHex}`;
const splitKey = (key) => key.split("\u0000");

/**
 * A value's SQL placeholder and its bound parameters: an empty BLOB is
 * written `X''` (wa-sqlite would bind it as NULL), anything else `?`.
 */
function valueSql(val) {
  return val instanceof Uint8Array && val.byteLength === 0 ? ["X''", []] : ["?", [val]];
}

/** A change read from crsql_changes, as the 9-value protocol array. */
function wireChange(r) {
  return [r[0], toHex(r[1]), r[2], r[3], r[4], r[5], toHex(r[6]), r[7], r[8]];
}

/** The replica's operations on an open transaction (`sql`). */
export class Replica {
  /** @param {import("./sql.js").Sql} sql */
  constructor(sql) {
    this.sql = sql;
  }

  static async install(sql) {
    await sql.exec(TABLES);
  }

  // ---- meta ---------------------------------------------------------------

  async meta(key, fallback = null) {
    const v = await this.sql.one("SELECT value FROM tenantsync_meta WHERE key = ?", [key]);
    return v === undefined ? fallback : v;
  }

  /** The server schema version the replica has (0: no schema yet; 1: a
   * schema but no version recorded). */
  async schemaVersion() {
    const v = await this.meta("schema_version");
    if (v !== null) return int(v);
    return (await this.meta("schema_applied")) ? 1 : 0;
  }

  async setMeta(key, value) {
    await this.sql.all("INSERT OR REPLACE INTO tenantsync_meta (key, value) VALUES (?, ?)", [key, value]);
  }

  async pushedVersion() {
    return int(await this.meta("pushed_version", 0n));
  }

  async setPushedVersion(v) {
    await this.setMeta("pushed_version", BigInt(v));
    await this.sql.all("DELETE FROM tenantsync_merged WHERE hi <= ?", [BigInt(v)]);
  }

  /** The last committed version (inside a transaction, not what it wrote). */
  async dbVersion() {
    return int(await this.sql.one("SELECT crsql_db_version()"));
  }

  /**
   * The greatest version this transaction stamped after `before`, or
   * `before`: cr-sqlite 0.16 stamps merged rows max(local + 1, pending, the
   * change's db_version), and `crsql_db_version()` moves only at commit.
   * (No local write shares the transaction: it holds the database.)
   */
  async stampedSince(before) {
    const v = await this.sql.one("SELECT max(db_version) FROM crsql_changes WHERE db_version > ?", [BigInt(before)]);
    return v === null || v === undefined ? before : int(v);
  }

  async siteId() {
    return toHex(await this.sql.one("SELECT crsql_site_id()"));
  }

  // ---- subscriptions --------------------------------------------------------

  async subscriptions() {
    const rows = await this.sql.all("SELECT id, query, cursor FROM tenantsync_subs ORDER BY id");
    return rows.map(([id, query, cursor]) => ({ id, query, cursor: cursor === null ? null : int(cursor) }));
  }

  /** Adds or replaces a subscription; a changed query starts over. */
  async subscribe(id, query) {
    const old = await this.sql.all("SELECT query FROM tenantsync_subs WHERE id = ?", [id]);
    if (old.length && old[0][0] === query) return false;
    await this.sql.all("INSERT OR REPLACE INTO tenantsync_subs (id, query, cursor) VALUES (?, ?, NULL)", [id, query]);
    return true;
  }

  /**
   * Drops a subscription and its held keys; rows no other subscription
   * holds leave the replica (one with unpushed changes once they are
   * pushed and answered).
   */
  async unsubscribe(id) {
    const keys = await this.heldKeys(id);
    await this.sql.all("DELETE FROM tenantsync_held WHERE sub = ?", [id]);
    await this.sql.all("DELETE FROM tenantsync_subs WHERE id = ?", [id]);
    return this.removeUnheld([...keys]);
  }

  async setCursor(sub, version) {
    await this.sql.all("UPDATE tenantsync_subs SET cursor = ? WHERE id = ?", [BigInt(version), sub]);
  }

  /** A subscription waits for a full sync (it has no cursor). */
  async syncPending() {
    return (await this.sql.one("SELECT 1 FROM tenantsync_subs WHERE cursor IS NULL LIMIT 1")) !== undefined;
  }

  // ---- held rows ------------------------------------------------------------

  async heldKeys(sub) {
    const rows = await this.sql.all("SELECT tbl, pk FROM tenantsync_held WHERE sub = ?", [sub]);
    return new Set(rows.map(([t, pk]) => rowKey(t, toHex(pk))));
  }

  async hold(sub, key) {
    const [t, pk] = splitKey(key);
    await this.sql.all("INSERT OR IGNORE INTO tenantsync_held (sub, tbl, pk) VALUES (?, ?, ?)", [sub, t, fromHex(pk)]);
  }

  async release(sub, key) {
    const [t, pk] = splitKey(key);
    await this.sql.all("DELETE FROM tenantsync_held WHERE sub = ? AND tbl = ? AND pk = ?", [sub, t, fromHex(pk)]);
    return int(await this.sql.one("SELECT changes()")) > 0;
  }

  async dropEverywhere(key) {
    const [t, pk] = splitKey(key);
    await this.sql.all("DELETE FROM tenantsync_held WHERE tbl = ? AND pk = ?", [t, fromHex(pk)]);
  }

  async heldByAny(key) {
    const [t, pk] = splitKey(key);
    return (await this.sql.one("SELECT 1 FROM tenantsync_held WHERE tbl = ? AND pk = ? LIMIT 1", [t, fromHex(pk)])) !== undefined;
  }

  // ---- cr-sqlite ------------------------------------------------------------

  /** Merges protocol changes into crsql_changes, each value bound exactly. */
  async merge(changes) {
    for (const c of changes) {
      const [v, bound] = valueSql(sqlValue(c[3]));
      await this.sql.all(`INSERT INTO crsql_changes VALUES (?, ?, ?, ${v}, ?, ?, ?, ?, ?)`, [
        c[0],
        fromHex(c[1]),
        c[2],
        ...bound,
        c[4],
        c[5],
        fromHex(c[6]),
        c[7],
        c[8],
      ]);
    }
  }

  /** Records that local versions (before, after] were written by merges. */
  async recordMerged(before, after) {
    if (after > before) {
      await this.sql.all("INSERT OR REPLACE INTO tenantsync_merged (lo, hi) VALUES (?, ?)", [BigInt(before), BigInt(after)]);
    }
  }

  async mergedRanges() {
    const rows = await this.sql.all("SELECT lo, hi FROM tenantsync_merged ORDER BY lo");
    return rows.map(([lo, hi]) => [int(lo), int(hi)]);
  }

  async pkColumns(table) {
    const rows = await this.sql.all("SELECT name FROM pragma_table_info(?) WHERE pk > 0 ORDER BY pk", [table]);
    if (!rows.length) throw new Error(`no table ${table} with a primary key in the replica`);
    return rows.map((r) => quote(r[0])).join(", ");
  }

  /**
   * Forgets a row without recording a delete (PROTOCOL.md §12): sync bit
   * set, version floor raised, base row, clocks and lookaside key deleted.
   */
  async forget(key) {
    const [table, pkHex] = splitKey(key);
    const pk = fromHex(pkHex);
    const cols = await this.pkColumns(table);
    const t = quote(table);
    await this.sql.all("SELECT crsql_internal_sync_bit(1)");
    try {
      await this.sql.all(
        "INSERT OR REPLACE INTO crsql_master (key, value) VALUES ('pre_compact_dbversion', crsql_next_db_version())",
      );
      await this.sql.all(`DELETE FROM ${t} WHERE crsql_pack_columns(${cols}) = ?`, [pk]);
      await this.sql.all(
        `DELETE FROM ${quote(`${table}__crsql_clock`)} WHERE key IN (SELECT __crsql_key FROM ${quote(
          `${table}__crsql_pks`,
        )} WHERE crsql_pack_columns(${cols}) = ?)`,
        [pk],
      );
      await this.sql.all(`DELETE FROM ${quote(`${table}__crsql_pks`)} WHERE crsql_pack_columns(${cols}) = ?`, [pk]);
    } finally {
      await this.sql.all("SELECT crsql_internal_sync_bit(0)");
    }
  }

  /**
   * This site's changes after `since` (not written by merges), as protocol
   * arrays in version order; of the rows `keys` only, when given.
   */
  async ownChanges(since, until = null, keys = null) {
    const merged = await this.mergedRanges();
    const inMerged = (v) => merged.some(([lo, hi]) => v > lo && v <= hi);
    const where = ["site_id = crsql_site_id()", "db_version > ?"];
    const params = [BigInt(since)];
    if (until !== null) {
      where.push("db_version <= ?");
      params.push(BigInt(until));
    }
    let rows = [];
    if (keys === null) {
      rows = await this.sql.all(`${CHANGES} WHERE ${where.join(" AND ")} ORDER BY db_version, seq`, params);
    } else {
      for (const key of keys) {
        const [t, pk] = splitKey(key);
        rows.push(
          ...(await this.sql.all(`${CHANGES} WHERE "table" = ? AND pk = ? AND ${where.join(" AND ")}`, [
            t,
            fromHex(pk),
            ...params,
          ])),
        );
      }
    }
    return rows.filter((r) => !inMerged(int(r[5]))).map(wireChange);
  }

  // ---- applying deliveries --------------------------------------------------

  /**
   * Applies the parts of one sync or checkpoint at `version` (PROTOCOL.md
   * §5: held rows by causal length, `evict` after the changes, `reset`
   * releasing what no chunk delivered), then removes rows no subscription
   * holds (`removeUnheld`).
   */
  async applyParts(version, parts) {
    const before = await this.dbVersion();
    for (const p of parts) await this.merge(p.changes);
    const candidates = new Set();
    for (const p of parts) {
      const heldBefore = p.reset ? await this.heldKeys(p.sub) : null;
      const delivered = new Map();
      for (const c of p.changes) {
        const key = rowKey(c[0], c[1]);
        const cl = int(c[7]);
        delivered.set(key, Math.max(delivered.get(key) ?? 0, cl));
      }
      for (const [key, cl] of delivered) {
        if (cl % 2 === 0) await this.dropEverywhere(key);
        else await this.hold(p.sub, key);
      }
      for (const k of p.evict) {
        const key = rowKey(k.table, k.pk);
        if (await this.release(p.sub, key)) candidates.add(key);
      }
      if (heldBefore) {
        for (const key of heldBefore) {
          if (!delivered.has(key) && (await this.release(p.sub, key))) candidates.add(key);
        }
      }
      await this.setCursor(p.sub, version);
    }
    const removed = await this.removeUnheld([...candidates]);
    await this.recordMerged(before, await this.stampedSince(before));
    return removed;
  }

  /**
   * Removes those of `keys` no subscription holds (rule 6). A row with local
   * changes not yet pushed, or in the push awaiting its answer, stays until
   * they are pushed and answered; while a full sync is pending, a row with
   * this site's clocks stays and settles after it.
   */
  async removeUnheld(keys) {
    const gone = [];
    for (const key of keys) if (!(await this.heldByAny(key))) gone.push(key);
    if (!gone.length) return 0;
    const byRow = (changes) => {
      const m = new Map();
      for (const c of changes) {
        const key = rowKey(c[0], c[1]);
        if (!m.has(key)) m.set(key, []);
        m.get(key).push(c);
      }
      return m;
    };
    const unpushed = byRow(await this.ownChanges(await this.pushedVersion(), null, gone));
    const withClocks = (await this.syncPending()) ? byRow(await this.ownChanges(0, null, gone)) : new Map();
    let removed = 0;
    for (const key of gone) {
      // A row with local changes the server does not hold yet stays,
      // unheld, until they are pushed and answered (PROTOCOL.md §11 rule 6):
      // the answer settles it like any pushed row, a refusal quarantines.
      if (unpushed.has(key)) continue;
      if (withClocks.has(key)) {
        await this.recordSettle(key, 0);
        continue;
      }
      await this.forget(key);
      removed++;
    }
    return removed;
  }

  // ---- pushing --------------------------------------------------------------

  /**
   * The next push: this site's changes after pushed_version, whole
   * versions, within `maxBytes`; `null` when nothing is new.
   */
  async nextPush(maxBytes) {
    const from = await this.pushedVersion();
    let to = await this.dbVersion();
    if (to <= from) return null;
    const changes = await this.ownChanges(from, to);
    if (!changes.length) {
      // Only merges wrote these versions: push past them, empty.
      return { from, to, changes: [] };
    }
    let size = 0;
    let cut = changes.length;
    for (let i = 0; i < changes.length; i++) {
      size += stringify(changes[i]).length + 1;
      if (size > maxBytes - 256 && i > 0) {
        // Cut before the version of change i (a version is never split).
        const v = changes[i][5];
        cut = changes.findIndex((c) => c[5] === v);
        if (cut === 0) cut = changes.findIndex((c) => c[5] !== changes[0][5]);
        break;
      }
    }
    if (cut < changes.length && cut > 0) {
      to = int(changes[cut - 1][5]);
      return { from, to, changes: changes.slice(0, cut) };
    }
    return { from, to, changes };
  }

  async recordSettle(key, serverVersion) {
    const [t, pk] = splitKey(key);
    await this.sql.all("INSERT OR REPLACE INTO tenantsync_settle (tbl, pk, server_version) VALUES (?, ?, ?)", [
      t,
      fromHex(pk),
      BigInt(serverVersion),
    ]);
  }

  /** `push_ok`: the server holds the push (§7). */
  async pushOk(batch, pushedVersion, serverVersion) {
    await this.setPushedVersion(Math.max(pushedVersion, await this.pushedVersion()));
    for (const c of batch.changes) await this.recordSettle(rowKey(c[0], c[1]), serverVersion);
  }

  /**
   * Drops pushed rows no subscription holds once the deliveries up to
   * their server version are applied (§7, rule 6); not while a full sync
   * is pending (its snapshot may predate the push).
   */
  async settle(upTo) {
    if (await this.syncPending()) return 0;
    const due = await this.sql.all("SELECT tbl, pk FROM tenantsync_settle WHERE server_version <= ?", [BigInt(upTo)]);
    await this.sql.all("DELETE FROM tenantsync_settle WHERE server_version <= ?", [BigInt(upTo)]);
    const pushed = await this.pushedVersion();
    let removed = 0;
    for (const [t, pk] of due) {
      const key = rowKey(t, toHex(pk));
      if (await this.heldByAny(key)) continue;
      if ((await this.ownChanges(pushed, null, [key])).length) continue;
      await this.forget(key);
      removed++;
    }
    return removed;
  }

  /**
   * `push_refused` (§7): quarantine the push's changes and later local
   * changes of its rows, make `state` rows the server's (forget, then
   * merge), forget `invisible` rows and rows no subscription holds.
   */
  async pushRefused(batch, refusal) {
    const reasons = new Map();
    for (const r of refusal.rows ?? []) reasons.set(rowKey(r.table, r.pk), r);
    const state = new Map();
    for (const c of refusal.state ?? []) {
      const key = rowKey(c[0], c[1]);
      if (!state.has(key)) state.set(key, []);
      state.get(key).push(c);
    }
    const rows = new Set([...reasons.keys(), ...state.keys()]);
    for (const k of refusal.invisible ?? []) rows.add(rowKey(k.table, k.pk));
    for (const c of batch.changes) rows.add(rowKey(c[0], c[1]));
    const whole = `${refusal.message} (the push was refused whole; this row was not refused itself)`;
    let quarantined = 0;
    for (const c of batch.changes) {
      const named = reasons.get(rowKey(c[0], c[1]));
      await this.quarantine(c, "push_refused", refusal.code, named ? named.reason : whole, named?.policy ?? null);
      quarantined++;
    }
    for (const c of await this.ownChanges(batch.to, null, [...rows])) {
      await this.quarantine(c, "push_refused", refusal.code, "a later local change of a row whose push was refused");
      quarantined++;
    }
    const before = await this.dbVersion();
    for (const [key, changes] of state) {
      await this.forget(key);
      await this.merge(changes);
      if (changes.reduce((m, c) => Math.max(m, int(c[7])), 0) % 2 === 0) await this.dropEverywhere(key);
    }
    for (const key of rows) {
      if (!state.has(key)) await this.dropEverywhere(key);
      if (!(await this.heldByAny(key))) await this.forget(key);
    }
    await this.recordMerged(before, await this.stampedSince(before));
    await this.setPushedVersion(int(refusal.pushed_version));
    return quarantined;
  }

  // ---- quarantine -----------------------------------------------------------

  async quarantine(c, reason, code, detail, policy = null) {
    const [v, bound] = valueSql(sqlValue(c[3]));
    await this.sql.all(
      `INSERT INTO tenantsync_quarantine (tbl, pk, cid, val, col_version, db_version, site_id, cl, seq, reason, code, detail, at)
       VALUES (?, ?, ?, ${v}, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      [
        c[0],
        fromHex(c[1]),
        c[2],
        ...bound,
        c[4],
        c[5],
        fromHex(c[6]),
        c[7],
        c[8],
        reason,
        code,
        policy ? `${detail} (policy ${policy})` : detail,
        BigInt(Date.now()),
      ],
    );
  }

  async quarantined() {
    const rows = await this.sql.all(
      "SELECT id, tbl, pk, cid, val, reason, code, detail, at FROM tenantsync_quarantine ORDER BY id",
    );
    return rows.map(([id, table, pk, cid, val, reason, code, detail, at]) => ({
      id: int(id),
      table,
      pk: toHex(pk),
      cid,
      value: val,
      reason,
      code,
      detail,
      at: int(at),
    }));
  }

  async discardQuarantined(ids) {
    for (const id of ids) await this.sql.all("DELETE FROM tenantsync_quarantine WHERE id = ?", [BigInt(id)]);
  }
}
