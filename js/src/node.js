// Opening a crsqlite-wasm database under Node (tests, scripts, servers):
// the wasm build is loaded from the package's file, and the database lives
// in the wasm module's memory (crsqlite-wasm persists only in browsers,
// through IndexedDB: use `openDatabase` from the package root there).

import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";
import * as SQLite from "@vlcn.io/wa-sqlite";
import { DB } from "@vlcn.io/crsqlite-wasm";

let api = null;

async function wasmApi() {
  if (api) return api;
  const require = createRequire(import.meta.url);
  const dist = path.dirname(require.resolve("@vlcn.io/crsqlite-wasm/crsqlite.wasm"));
  // The emscripten factory is not in the package's exports: import it by path.
  const { default: factory } = await import(pathToFileURL(path.join(dist, "crsqlite.mjs")).href);
  const module = await factory({ wasmBinary: fs.readFileSync(path.join(dist, "crsqlite.wasm")) });
  api = SQLite.Factory(module);
  return api;
}

/** A new in-memory crsqlite-wasm database (a `DB`, as crsqlite-wasm's `open` gives). */
export async function openNodeDatabase() {
  const sqlite3 = await wasmApi();
  const handle = await sqlite3.open_v2(":memory:");
  const db = new DB(sqlite3, handle, ":memory:");
  const stmt = await db.prepare(
    "SELECT tbl_name FROM tables_used(?) AS u JOIN sqlite_master ON sqlite_master.name = u.name WHERE u.schema = 'main'",
  );
  stmt.raw(true);
  db._setTablesUsedStmt(stmt);
  const [[site]] = await db.execA("SELECT quote(crsql_site_id())");
  db._setSiteid(site.replace(/'|X/g, ""));
  return db;
}
