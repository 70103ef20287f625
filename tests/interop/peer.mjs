// A real cr-sqlite 0.16.0 peer (the @vlcn.io/crsqlite-wasm build, SQLite 3.44.0)
// served over JSON lines, for the Rust interop tests (tests/src/crsqlite.rs).
//
// One request per stdin line, one response per stdout line, in order:
//   -> {"id": 7, "op": "query", "db": "a", "sql": "SELECT ?", "params": [1.0]}
//   <- {"id": 7, "ok": {"columns": ["?"], "rows": [[1.0]]}}
//   <- {"id": 7, "err": "no such table: t", "code": 1}
//
// Values (SQL parameters, result cells, change rows) use the project's JSON
// encoding, exactly: INTEGER = JSON integer (exact over the whole i64 range:
// this file parses JSON itself and keeps integers as BigInt), REAL = JSON
// number with a '.' or an exponent (`2.0`, `-0.0`, `1e+300`; infinities as
// {"real":"inf"|"-inf"}), TEXT = string, NULL = null, BLOB = {"blob":"<hex>"}.
// Every value is bound with the sqlite3_bind_* function of its own storage
// class (wa-sqlite's generic `bind` would turn the REAL 2.0 into the INTEGER
// 2 and an empty BLOB into NULL) and read back by sqlite3_column_type.
//
// Operations (all take "db", the peer's name, except "version"):
//   open   {db, path?}          open a database (default ":memory:"; a path is a
//                               file in the wasm in-memory file system, so a
//                               closed db can be reopened within this process)
//   exec   {db, sql}            run every statement of sql (SQLite's tail pointer)
//   query  {db, sql, params?}   one statement; {columns, rows}
//   changes {db, where?, params?}  rows of `SELECT "table", pk, cid, val,
//                               col_version, db_version, site_id, cl, seq FROM
//                               crsql_changes <where>` as 9-value arrays
//   apply  {db, changes}        INSERT INTO crsql_changes each 9-value array, in
//                               one transaction (rolled back on any error);
//                               returns {rows_impacted}: the merges that changed
//                               something (crsql_rows_impacted() of the batch)
//   site_id {db} / db_version {db}
//   close  {db}                 crsql_finalize() then sqlite3_close
//   version                     {sqlite, crsqlite} versions of the build

import fs from "node:fs";
import readline from "node:readline";
// The emscripten factory is not in the package's "exports": import it by path.
import SQLiteAsyncESMFactory from "./node_modules/@vlcn.io/crsqlite-wasm/dist/crsqlite.mjs";
import * as SQLite from "@vlcn.io/wa-sqlite";

const wasmPath = new URL(
  "./node_modules/@vlcn.io/crsqlite-wasm/dist/crsqlite.wasm",
  import.meta.url,
);
const wasmBinary = fs.readFileSync(wasmPath);
const Module = await SQLiteAsyncESMFactory({ wasmBinary });
const sqlite3 = SQLite.Factory(Module);

// ---------------------------------------------------------------------------
// Exact JSON: integers as BigInt, other numbers as Real.

/** A REAL value (kept apart from integers even when integral). */
class Real {
  constructor(v) {
    this.v = v;
  }
}

function parseJson(text) {
  let i = 0;
  const fail = (what) => {
    throw new Error(`bad JSON request at offset ${i}: ${what}`);
  };
  const ws = () => {
    while (i < text.length && " \t\r\n".includes(text[i])) i++;
  };
  const value = () => {
    ws();
    const c = text[i];
    if (c === "{") {
      i++;
      const obj = {};
      ws();
      if (text[i] === "}") {
        i++;
        return obj;
      }
      for (;;) {
        ws();
        if (text[i] !== '"') fail("expected a key");
        const k = string();
        ws();
        if (text[i++] !== ":") fail("expected ':'");
        obj[k] = value();
        ws();
        const d = text[i++];
        if (d === "}") return obj;
        if (d !== ",") fail("expected ',' or '}'");
      }
    }
    if (c === "[") {
      i++;
      const arr = [];
      ws();
      if (text[i] === "]") {
        i++;
        return arr;
      }
      for (;;) {
        arr.push(value());
        ws();
        const d = text[i++];
        if (d === "]") return arr;
        if (d !== ",") fail("expected ',' or ']'");
      }
    }
    if (c === '"') return string();
    if (text.startsWith("null", i)) {
      i += 4;
      return null;
    }
    if (text.startsWith("true", i)) {
      i += 4;
      return true;
    }
    if (text.startsWith("false", i)) {
      i += 5;
      return false;
    }
    const m = /^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/.exec(text.slice(i, i + 400));
    if (!m) fail("unexpected character");
    i += m[0].length;
    if (m[2] === undefined && m[3] === undefined) return BigInt(m[0]);
    return new Real(Number(m[0]));
  };
  const string = () => {
    const start = i++;
    while (i < text.length && text[i] !== '"') i += text[i] === "\\" ? 2 : 1;
    if (i >= text.length) fail("unterminated string");
    i++;
    return JSON.parse(text.slice(start, i));
  };
  const v = value();
  ws();
  if (i !== text.length) fail("trailing characters");
  return v;
}

function formatReal(x) {
  if (Number.isNaN(x)) throw new Error("NaN is not an SQLite value");
  if (x === Infinity) return '{"real":"inf"}';
  if (x === -Infinity) return '{"real":"-inf"}';
  if (Object.is(x, -0)) return "-0.0";
  const s = String(x); // shortest text that reads back as exactly x
  return /[.eE]/.test(s) ? s : `${s}.0`;
}

function toJson(v) {
  if (v === null || v === undefined) return "null";
  if (typeof v === "bigint") return v.toString();
  if (v instanceof Real) return formatReal(v.v);
  if (typeof v === "number") return JSON.stringify(v); // protocol metadata only
  if (typeof v === "string" || typeof v === "boolean") return JSON.stringify(v);
  if (v instanceof Uint8Array) return `{"blob":"${Buffer.from(v).toString("hex")}"}`;
  if (Array.isArray(v)) return `[${v.map(toJson).join(",")}]`;
  return `{${Object.entries(v)
    .map(([k, x]) => `${JSON.stringify(k)}:${toJson(x)}`)
    .join(",")}}`;
}

/** A decoded JSON value as an SQLite value: BigInt | Real | string | Uint8Array | null. */
function sqlValue(v, where) {
  if (v === null || typeof v === "bigint" || typeof v === "string" || v instanceof Real) return v;
  if (typeof v === "object" && !Array.isArray(v)) {
    const keys = Object.keys(v);
    if (keys.length === 1 && keys[0] === "blob" && typeof v.blob === "string" && /^([0-9a-fA-F]{2})*$/.test(v.blob))
      return new Uint8Array(Buffer.from(v.blob, "hex"));
    if (keys.length === 1 && keys[0] === "real" && (v.real === "inf" || v.real === "-inf"))
      return new Real(v.real === "inf" ? Infinity : -Infinity);
  }
  throw new Error(`${where}: ${toJson(v)} is not an SQLite value`);
}

// ---------------------------------------------------------------------------
// Typed binding and reading.

const freeAddress = Module._getSqliteFree();
const rawBindBlob = Module.cwrap("sqlite3_bind_blob", "number", ["number", "number", "number", "number", "number"]);

function check(db, rc, what) {
  if (rc !== SQLite.SQLITE_OK) {
    const msg = Module.ccall("sqlite3_errmsg", "string", ["number"], [db]);
    throw Object.assign(new Error(`${what}: ${msg}`), { code: rc });
  }
}

function bindValue(db, stmt, i, v) {
  if (v === null) return sqlite3.bind_null(stmt, i);
  if (typeof v === "bigint") return sqlite3.bind_int64(stmt, i, v);
  if (v instanceof Real) return sqlite3.bind_double(stmt, i, v.v);
  if (typeof v === "string") return sqlite3.bind_text(stmt, i, v);
  // Own blob binding: wa-sqlite's passes a NULL pointer for an empty blob,
  // which SQLite binds as NULL. Allocate at least one byte.
  const ptr = Module._sqlite3_malloc(Math.max(1, v.byteLength));
  Module.HEAPU8.set(v, ptr);
  check(db, rawBindBlob(stmt, i, ptr, v.byteLength, freeAddress), "bind blob");
}

function bindAll(db, stmt, params, where) {
  const n = sqlite3.bind_parameter_count(stmt);
  if (params.length !== n)
    throw new Error(`${where}: the statement has ${n} parameters, ${params.length} values given`);
  params.forEach((p, k) => bindValue(db, stmt, k + 1, sqlValue(p, `${where} parameter ${k + 1}`)));
}

function readColumn(stmt, c) {
  switch (sqlite3.column_type(stmt, c)) {
    case SQLite.SQLITE_NULL:
      return null;
    case SQLite.SQLITE_INTEGER:
      return sqlite3.column_int64(stmt, c);
    case SQLite.SQLITE_FLOAT:
      return new Real(sqlite3.column_double(stmt, c));
    case SQLite.SQLITE_TEXT:
      return sqlite3.column_text(stmt, c);
    case SQLite.SQLITE_BLOB:
      return sqlite3.column_blob(stmt, c);
    default:
      throw new Error("unknown column type");
  }
}

async function stepAll(stmt) {
  const rows = [];
  const n = sqlite3.column_count(stmt);
  while ((await sqlite3.step(stmt)) === SQLite.SQLITE_ROW) {
    const row = [];
    for (let c = 0; c < n; c++) row.push(readColumn(stmt, c));
    rows.push(row);
  }
  return rows;
}

/** Prepares the one statement of `sql` (an error if it holds more). */
async function prepareOne(db, sql) {
  const str = sqlite3.str_new(db, sql);
  try {
    const prepared = await sqlite3.prepare_v2(db, sqlite3.str_value(str));
    if (!prepared) throw new Error(`no statement in ${JSON.stringify(sql)}`);
    const tail = Module.UTF8ToString(prepared.sql);
    if (tail.trim() !== "") {
      await sqlite3.finalize(prepared.stmt);
      throw new Error(`query takes one statement; found more after it: ${JSON.stringify(tail)}`);
    }
    return prepared.stmt;
  } finally {
    sqlite3.str_finish(str);
  }
}

async function query(db, sql, params = []) {
  const stmt = await prepareOne(db, sql);
  try {
    bindAll(db, stmt, params, "query");
    const columns = sqlite3.column_names(stmt);
    return { columns, rows: await stepAll(stmt) };
  } finally {
    await sqlite3.finalize(stmt);
  }
}

async function exec(db, sql) {
  for await (const stmt of sqlite3.statements(db, sql)) await stepAll(stmt);
}

// ---------------------------------------------------------------------------
// Requests.

const dbs = new Map();
const CHANGES = `SELECT "table", pk, cid, val, col_version, db_version, site_id, cl, seq FROM crsql_changes`;

function handleOf(req) {
  const h = dbs.get(req.db);
  if (h === undefined) throw new Error(`no open database named ${JSON.stringify(req.db)}`);
  return h;
}

async function apply(db, changes) {
  if (!Array.isArray(changes)) throw new Error("apply: changes must be an array of 9-value rows");
  await exec(db, "BEGIN");
  try {
    // cr-sqlite 0.16.0 resets crsql_rows_impacted() at COMMIT but not at
    // ROLLBACK: count from what is left over.
    const before = (await query(db, "SELECT crsql_rows_impacted()")).rows[0][0];
    const stmt = await prepareOne(db, "INSERT INTO crsql_changes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)");
    try {
      for (const [k, row] of changes.entries()) {
        if (!Array.isArray(row) || row.length !== 9)
          throw new Error(`apply: change ${k} is not a 9-value row: ${toJson(row)}`);
        try {
          bindAll(db, stmt, row, `change ${k}`);
          await sqlite3.step(stmt);
        } catch (e) {
          e.message = `change ${k} ${toJson(row)}: ${e.message}`;
          throw e;
        } finally {
          await sqlite3.reset(stmt).catch(() => {});
        }
      }
    } finally {
      await sqlite3.finalize(stmt);
    }
    const impacted = (await query(db, "SELECT crsql_rows_impacted()")).rows[0][0];
    await exec(db, "COMMIT");
    return { rows_impacted: impacted - before };
  } catch (e) {
    if (!sqlite3.get_autocommit(db)) await exec(db, "ROLLBACK");
    throw e;
  }
}

async function handle(req) {
  switch (req.op) {
    case "version":
      return (await withTempDb((db) => query(db, "SELECT sqlite_version(), (SELECT value FROM crsql_master WHERE key = 'crsqlite_version')"))).rows[0];
    case "open": {
      if (typeof req.db !== "string") throw new Error("open: db must be a name");
      if (dbs.has(req.db)) throw new Error(`a database named ${JSON.stringify(req.db)} is already open`);
      const db = await sqlite3.open_v2(req.path ?? ":memory:");
      dbs.set(req.db, db);
      return null;
    }
    case "exec":
      await exec(handleOf(req), req.sql);
      return null;
    case "query":
      return query(handleOf(req), req.sql, req.params ?? []);
    case "changes":
      return (await query(handleOf(req), `${CHANGES} ${req.where ?? ""}`, req.params ?? [])).rows;
    case "apply":
      return apply(handleOf(req), req.changes);
    case "site_id":
      return (await query(handleOf(req), "SELECT crsql_site_id()")).rows[0][0];
    case "db_version":
      return (await query(handleOf(req), "SELECT crsql_db_version()")).rows[0][0];
    case "close": {
      const db = handleOf(req);
      await exec(db, "SELECT crsql_finalize()");
      await sqlite3.close(db);
      dbs.delete(req.db);
      return null;
    }
    default:
      throw new Error(`unknown op ${JSON.stringify(req.op)}`);
  }
}

async function withTempDb(f) {
  const db = await sqlite3.open_v2(":memory:");
  try {
    return await f(db);
  } finally {
    await exec(db, "SELECT crsql_finalize()");
    await sqlite3.close(db);
  }
}

// Requests are served strictly one at a time, in order.
const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (line.trim() === "") continue;
  let id = null;
  let out;
  try {
    const req = parseJson(line);
    id = req.id ?? null;
    out = `{"id":${toJson(id)},"ok":${toJson(await handle(req))}}`;
  } catch (e) {
    const code = typeof e.code === "number" ? e.code : null;
    out = `{"id":${toJson(id)},"err":${JSON.stringify(String(e.message ?? e))},"code":${toJson(code)}}`;
  }
  process.stdout.write(`${out}\n`);
}
