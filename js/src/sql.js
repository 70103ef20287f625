// Exact statements on a crsqlite-wasm database: every value bound with the
// sqlite3_bind_* of its own storage class and read back by its column type
// (crsqlite-wasm's `exec` binds through wa-sqlite's generic `bind`, which
// turns the REAL 2.0 into the INTEGER 2). A `Sql` is used only inside
// `exclusive`, which holds the database's mutex, so nothing of the
// application interleaves with the client's transactions.

import * as SQLite from "@vlcn.io/wa-sqlite";
import { Real } from "./json.js";

/**
 * Runs `fn(sql)` holding `db`'s mutex, inside one transaction: committed
 * when `fn` resolves, rolled back when it throws.
 * @template T
 * @param {import("@vlcn.io/crsqlite-wasm").DB} db
 * @param {(sql: Sql) => Promise<T>} fn
 * @returns {Promise<T>}
 */
export function exclusive(db, fn) {
  return db.__mutex.runExclusive(async () => {
    const sql = new Sql(db);
    await sql.exec("BEGIN");
    try {
      const out = await fn(sql);
      await sql.exec("COMMIT");
      return out;
    } catch (e) {
      if (!db.api.get_autocommit(db.db)) await sql.exec("ROLLBACK");
      throw e;
    }
  });
}

/** Exact statements on one database (see `exclusive`). */
export class Sql {
  constructor(db) {
    this.api = db.api;
    this.handle = db.db;
  }

  /** Runs every statement of `sql` (no parameters). */
  async exec(sql) {
    for await (const stmt of this.api.statements(this.handle, sql)) {
      while ((await this.api.step(stmt)) === SQLite.SQLITE_ROW) {
        /* rows of a script are not read */
      }
    }
  }

  /**
   * The rows of one statement with `params` bound exactly.
   * @returns {Promise<any[][]>}
   */
  async all(sql, params = []) {
    const rows = [];
    let seen = false;
    for await (const stmt of this.api.statements(this.handle, sql)) {
      if (seen) throw new Error(`one statement expected: ${sql}`);
      seen = true;
      params.forEach((v, k) => this.bind(stmt, k + 1, v));
      const n = this.api.column_count(stmt);
      while ((await this.api.step(stmt)) === SQLite.SQLITE_ROW) {
        const row = [];
        for (let c = 0; c < n; c++) row.push(this.read(stmt, c));
        rows.push(row);
      }
    }
    return rows;
  }

  /** The first column of the first row, or `undefined`. */
  async one(sql, params = []) {
    const rows = await this.all(sql, params);
    return rows.length ? rows[0][0] : undefined;
  }

  bind(stmt, i, v) {
    const api = this.api;
    if (v === null || v === undefined) return api.bind_null(stmt, i);
    if (typeof v === "bigint") return api.bind_int64(stmt, i, v);
    if (v instanceof Real) return api.bind_double(stmt, i, v.value);
    if (typeof v === "boolean") return api.bind_int64(stmt, i, v ? 1n : 0n);
    if (typeof v === "number") {
      return Number.isInteger(v) ? api.bind_int64(stmt, i, BigInt(v)) : api.bind_double(stmt, i, v);
    }
    if (typeof v === "string") return api.bind_text(stmt, i, v);
    if (v instanceof Uint8Array) {
      // wa-sqlite binds an empty blob as NULL: callers write X'' in SQL.
      if (v.byteLength === 0) throw new Error("an empty BLOB cannot be bound: use X''");
      return api.bind_blob(stmt, i, v);
    }
    throw new Error(`not an SQLite value: ${String(v)}`);
  }

  read(stmt, c) {
    const api = this.api;
    switch (api.column_type(stmt, c)) {
      case SQLite.SQLITE_NULL:
        return null;
      case SQLite.SQLITE_INTEGER:
        return api.column_int64(stmt, c);
      case SQLite.SQLITE_FLOAT:
        return new Real(api.column_double(stmt, c));
      case SQLite.SQLITE_TEXT:
        return api.column_text(stmt, c);
      case SQLite.SQLITE_BLOB:
        return new Uint8Array(api.column_blob(stmt, c));
      default:
        throw new Error("unknown column type");
    }
  }
}
