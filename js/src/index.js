// @tenantsync/client: a partial, offline-first replica on the real cr-sqlite
// 0.16 (@vlcn.io/crsqlite-wasm), synced with a tenantsync server.
//
//   client.js   TenantSyncClient: connection, pushes, deliveries, live queries, status
//   replica.js  the replica's own tables and PROTOCOL.md §12's recipes
//   sql.js      exact statements (every value bound by its storage class)
//   json.js     the protocol's exact JSON (BigInt integers, Real, blobs)
//   node.js     openNodeDatabase: crsqlite-wasm under Node (import "@tenantsync/client/node")

export { TenantSyncClient } from "./client.js";
export { Real, parse, stringify } from "./json.js";

/**
 * Opens (creating) a crsqlite-wasm database in the browser, persisted in
 * IndexedDB under `name`. `wasmUrl` locates crsqlite.wasm when the bundler
 * or server does not serve it beside crsqlite-wasm's module.
 */
export async function openDatabase(name, wasmUrl) {
  const { default: initWasm } = await import("@vlcn.io/crsqlite-wasm");
  const sqlite = await initWasm(wasmUrl ? () => wasmUrl : undefined);
  return sqlite.open(name);
}
