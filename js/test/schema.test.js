// Schema evolution with the real cr-sqlite 0.16 (crsqlite-wasm under Node)
// against a real `tenantsync serve` (docs/PROTOCOL.md §5.4): a connected
// client migrates its replica in place when the server's schema changes,
// keeping its rows and its unpushed writes; one that comes back later
// migrates at welcome and still pushes what it wrote on the old schema; a
// client given no schema takes the server's current one.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { TenantSyncClient } from "../src/index.js";
import { openNodeDatabase } from "../src/node.js";
import { SCHEMA, changeSchema, eventually, serviceSql, startServer, token, within } from "./harness.js";

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server.stop();
});

const clients = [];
async function client(sub, tenant, opts = {}) {
  const c = await TenantSyncClient.open({
    url: server.url,
    token: () => token(sub, tenant),
    db: await openNodeDatabase(),
    ...(opts.noSchema ? {} : { schema: SCHEMA }),
    subscriptions: { todos: "SELECT * FROM todos" },
    backoff: { minMs: 50, maxMs: 500 },
  });
  clients.push(c);
  return c;
}
after(() => clients.forEach((c) => c.close()));

const live = (c) => within(c.until((s) => s.state === "live"), "a live client");
const rows = (c, sql) => c.db.execA(sql);

test("a schema change reaches live and returning clients, which keep their data", async () => {
  const laptop = await client("alice", "acme");
  const phone = await client("alice", "acme");
  await Promise.all([live(laptop), live(phone)]);
  await laptop.db.exec("INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'milk')");
  await eventually(async () => (await rows(phone, "SELECT title FROM todos")).length === 1, "the first row");

  // The phone goes offline and writes on the old schema.
  phone.disconnect();
  await phone.db.exec("INSERT INTO todos (id, tenant_id, owner, title) VALUES (2, 'acme', 'alice', 'eggs')");

  const { status, body } = await changeSchema(server, "ALTER TABLE todos ADD COLUMN due TEXT");
  assert.equal(status, 200, JSON.stringify(body));
  assert.equal(body.schema_version, 2);

  // The live laptop migrates in place, without a new session.
  await within(laptop.until((s) => s.schemaVersion === 2), "the laptop's migration");
  assert.equal(laptop.status.state, "live");
  await serviceSql(server, ["UPDATE todos SET due = 'friday' WHERE id = 1"]);
  await eventually(
    async () => JSON.stringify(await rows(laptop, "SELECT title, due FROM todos")) === '[["milk","friday"]]',
    "the new column's value on the laptop",
  );
  await laptop.db.exec("UPDATE todos SET due = 'monday' WHERE id = 1");
  await eventually(
    async () => (await serviceSql(server, ["SELECT due FROM todos WHERE id = 1"]))[0][0]?.[0] === "monday",
    "the laptop's write of the new column",
  );

  // The phone returns: migrates at welcome, pushes its old write.
  phone.connect();
  await within(phone.until((s) => s.schemaVersion === 2 && s.state === "live"), "the phone's migration");
  await eventually(
    async () =>
      JSON.stringify(await rows(phone, "SELECT id, title, due FROM todos ORDER BY id")) ===
      '[[1,"milk","monday"],[2,"eggs",null]]',
    "the phone's rows",
  );
  await eventually(
    async () => (await serviceSql(server, ["SELECT title FROM todos WHERE id = 2"]))[0].length === 1,
    "the phone's old write on the server",
  );
  assert.equal(phone.status.refused, 0);
  assert.equal(phone.status.quarantined, 0);
});

test("a client given no schema takes the server's current one", async () => {
  const fresh = await client("bob", "globex", { noSchema: true });
  await live(fresh);
  assert.equal(fresh.status.schemaVersion, 2);
  const cols = (await rows(fresh, "SELECT name FROM pragma_table_info('todos')")).map((r) => r[0]);
  assert.ok(cols.includes("due"), cols.join(","));
  await fresh.db.exec("INSERT INTO todos (id, tenant_id, owner, title, due) VALUES (10, 'globex', 'bob', 'bolts', 'today')");
  await eventually(
    async () => (await serviceSql(server, ["SELECT due FROM todos WHERE id = 10"], "globex"))[0][0]?.[0] === "today",
    "bob's write",
  );
});
