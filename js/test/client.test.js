// The client against a real `tenantsync serve`: what PROTOCOL.md §11 asks of
// a client, on the real cr-sqlite 0.16 (crsqlite-wasm under Node).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { TenantSyncClient, stringify } from "../src/index.js";
import { openNodeDatabase } from "../src/node.js";
import { exclusive } from "../src/sql.js";
import { SCHEMA, eventually, serviceSql, startServer, token, within } from "./harness.js";

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server.stop();
});

const clients = [];
async function client(sub, tenant, subscriptions, opts = {}) {
  const c = await TenantSyncClient.open({
    url: server.url,
    token: opts.token ?? (() => token(sub, tenant)),
    db: opts.db ?? (await openNodeDatabase()),
    schema: SCHEMA,
    subscriptions,
    backoff: { minMs: 50, maxMs: 500 },
  });
  clients.push(c);
  return c;
}
after(() => clients.forEach((c) => c.close()));

const live = (c) => within(c.until((s) => s.state === "live"), "a live client");
const titles = (c) => c.db.execA("SELECT title FROM todos ORDER BY id").then((r) => r.map((x) => x[0]));

test("writes reach the users the policies allow and no one else", async () => {
  const alice = await client("alice", "acme", { lists: "SELECT * FROM lists", todos: "SELECT * FROM todos" });
  const carol = await client("carol", "acme", { todos: "SELECT * FROM todos" });
  const bob = await client("bob", "globex", { todos: "SELECT * FROM todos" });
  await Promise.all([live(alice), live(carol), live(bob)]);
  const seen = [];
  carol.liveQuery("SELECT title FROM todos ORDER BY id", [], (rows) => seen.push(rows.map((r) => r.title)));

  await alice.db.exec("INSERT INTO lists (id, tenant_id, owner, name) VALUES (100, 'acme', 'alice', 'shared')");
  await alice.db.exec("INSERT INTO members (list_id, user_id, tenant_id) VALUES (100, 'carol', 'acme')");
  await alice.db.exec(
    "INSERT INTO todos (id, tenant_id, list_id, owner, title) VALUES (101, 'acme', 100, 'alice', 'for carol'), (102, 'acme', NULL, 'alice', 'private')",
  );
  await eventually(async () => (await titles(carol)).includes("for carol"), "carol's delivery");
  assert.deepEqual(await titles(carol), ["for carol"]);
  await eventually(() => seen.some((t) => t.includes("for carol")), "carol's live query");
  // Bob of another tenant gets nothing, ever: the server holds the rows.
  const [[n]] = await serviceSql(server, ["SELECT count(*) FROM todos WHERE id IN (101, 102)"]);
  assert.equal(n[0], 2);
  assert.deepEqual(await titles(bob), []);
});

test("a write the policies refuse is quarantined with its reason and the replica restored", async () => {
  const dave = await client("dave", "acme", { todos: "SELECT * FROM todos" });
  await live(dave);
  await dave.db.exec("INSERT INTO todos (id, tenant_id, owner, title) VALUES (200, 'globex', 'dave', 'smuggled')");
  const s = await within(dave.until((st) => st.quarantined > 0), "the quarantine");
  assert.equal(s.refused, 1);
  const q = await dave.quarantine();
  assert.ok(q.every((c) => c.reason === "push_refused" && c.code === "policy_refused"), stringify(q));
  assert.ok(q.some((c) => c.cid === "title" && c.value === "smuggled"));
  // The row is gone from the replica (the server does not have it) ...
  await eventually(async () => (await titles(dave)).length === 0, "the refused row to leave");
  // ... and the next write goes through (the push start moved past it).
  await dave.db.exec("INSERT INTO todos (id, tenant_id, owner, title) VALUES (201, 'acme', 'dave', 'fine')");
  await eventually(async () => (await serviceSql(server, ["SELECT title FROM todos WHERE id = 201"]))[0].length === 1, "the next push");
  assert.deepEqual(await titles(dave), ["fine"]);
});

test("offline writes sync after reconnecting, and a restart resumes from the stored cursors", async () => {
  const db = await openNodeDatabase();
  let erin = await client("erin", "acme", { todos: "SELECT * FROM todos" }, { db });
  await live(erin);
  erin.disconnect();
  await erin.db.exec("INSERT INTO todos (id, tenant_id, owner, title) VALUES (300, 'acme', 'erin', 'offline 1')");
  await erin.db.exec("UPDATE todos SET title = 'offline 2' WHERE id = 300");
  await serviceSql(server, ["INSERT INTO todos (id, tenant_id, owner, title) VALUES (301, 'acme', 'erin', 'from the backend')"]);
  erin.connect();
  await eventually(
    async () => (await serviceSql(server, ["SELECT title FROM todos WHERE id = 300"]))[0][0]?.[0] === "offline 2",
    "the offline write on the server",
  );
  await eventually(async () => (await titles(erin)).includes("from the backend"), "the backend's row");
  assert.equal(erin.modes.get("todos"), "resume");

  // A new client on the same database (a page reload): it resumes.
  erin.close();
  erin = await client("erin", "acme", {}, { db });
  await live(erin);
  assert.equal(erin.modes.get("todos"), "resume");
  assert.deepEqual(await titles(erin), ["offline 2", "from the backend"]);
});

test("a row that leaves every subscription is evicted without a delete; one that comes back is whole", async () => {
  const fay = await client("fay", "acme", { mine: "SELECT * FROM todos WHERE done = 0" });
  await live(fay);
  await fay.db.exec("INSERT INTO todos (id, tenant_id, owner, title) VALUES (400, 'acme', 'fay', 'open')");
  await eventually(async () => (await serviceSql(server, ["SELECT 1 FROM todos WHERE id = 400"]))[0].length, "the push");
  await serviceSql(server, ["UPDATE todos SET done = 1 WHERE id = 400"]);
  await eventually(async () => (await titles(fay)).length === 0, "the eviction");
  // No delete was recorded: the server still has the row.
  assert.equal((await serviceSql(server, ["SELECT title FROM todos WHERE id = 400"]))[0][0][0], "open");
  // Local writes after forgetting the newest row get versions above what was pushed.
  await fay.db.exec("INSERT INTO todos (id, tenant_id, owner, title) VALUES (401, 'acme', 'fay', 'after')");
  await eventually(async () => (await serviceSql(server, ["SELECT 1 FROM todos WHERE id = 401"]))[0].length, "the write after the eviction");
  await serviceSql(server, ["UPDATE todos SET done = 0, title = 'reopened' WHERE id = 400"]);
  await eventually(async () => (await titles(fay)).includes("reopened"), "the row's return");
  assert.equal((await fay.quarantine()).length, 0);
});

test("values keep their SQLite storage class both ways", async () => {
  const gus = await client("gus", "acme", { todos: "SELECT * FROM todos" });
  const hal = await client("gus", "acme", { todos: "SELECT * FROM todos" });
  await Promise.all([live(gus), live(hal)]);
  await gus.db.exec(
    "INSERT INTO todos (id, tenant_id, owner, title, priority) VALUES (500, 'acme', 'gus', X'00ff10', 2.5), (501, 'acme', 'gus', 'big', 9007199254740993), (502, 'acme', 'gus', 'real', 2e300)",
  );
  const server_ = await eventually(async () => {
    const [rows] = await serviceSql(server, [
      "SELECT id, typeof(title), hex(title), typeof(priority), CAST(priority AS TEXT) FROM todos WHERE id BETWEEN 500 AND 502 ORDER BY id",
    ]);
    return rows.length === 3 && rows;
  }, "gus's rows on the server");
  assert.deepEqual(server_, [
    [500, "blob", "00FF10", "real", "2.5"],
    [501, "text", "626967", "integer", "9007199254740993"],
    [502, "text", "7265616C", "real", "2.0e+300"],
  ]);
  const exact = () =>
    exclusive(hal.db, (sql) =>
      sql.all("SELECT typeof(title), hex(title), typeof(priority), CAST(priority AS TEXT) FROM todos WHERE id BETWEEN 500 AND 502 ORDER BY id"),
    );
  const got = await eventually(async () => {
    const rows = await exact();
    return rows.length === 3 && rows;
  }, "the rows at another device");
  assert.deepEqual(got, server_.map((r) => r.slice(1)));
});

test("the token provider is asked again when the token expires", async () => {
  let calls = 0;
  const ivy = await client("ivy", "acme", { todos: "SELECT * FROM todos" }, {
    token: () => {
      calls++;
      return token("ivy", "acme", { ttl: calls === 1 ? 2 : 3600 });
    },
  });
  await live(ivy);
  await eventually(() => calls >= 2, "a second token", 15000);
  await live(ivy);
  await ivy.db.exec("INSERT INTO todos (id, tenant_id, owner, title) VALUES (600, 'acme', 'ivy', 'still syncing')");
  await eventually(async () => (await serviceSql(server, ["SELECT 1 FROM todos WHERE id = 600"]))[0].length, "a push after the new token");
});

test("a token without a role is refused, and the status says why", async () => {
  const c = await client("jo", "acme", { todos: "SELECT * FROM todos" }, { token: () => token("jo", "acme", { role: undefined }) });
  const s = await within(c.until((st) => st.error && st.error.includes("role")), "the refusal");
  assert.notEqual(s.state, "live");
});

test("unsubscribing removes the rows no other subscription holds, and nothing more arrives", async () => {
  const kai = await client("kai", "acme", { lists: "SELECT * FROM lists", mine: "SELECT * FROM todos" });
  await live(kai);
  await serviceSql(server, ["INSERT INTO lists (id, tenant_id, owner, name) VALUES (800, 'acme', 'kai', 'kai''s')"]);
  const lists = () => kai.db.execA("SELECT name FROM lists WHERE id >= 800").then((r) => r.map((x) => x[0]));
  await eventually(async () => (await lists()).length === 1, "the list");
  await kai.unsubscribe("lists");
  assert.deepEqual(await lists(), []);
  assert.deepEqual((await kai.subscriptions()).map((s) => s.id), ["mine"]);
  // Forgotten, not deleted: the server keeps the list ...
  assert.equal((await serviceSql(server, ["SELECT count(*) FROM lists WHERE id = 800"]))[0][0][0], 1);
  // ... and a new list no longer arrives, while todos still do.
  await serviceSql(server, [
    "INSERT INTO lists (id, tenant_id, owner, name) VALUES (801, 'acme', 'kai', 'later')",
    "INSERT INTO todos (id, tenant_id, owner, title) VALUES (802, 'acme', 'kai', 'still here')",
  ]);
  await eventually(async () => (await titles(kai)).includes("still here"), "the todo");
  assert.deepEqual(await lists(), []);
});

test("a subscription the server refuses leaves the replica, the reason in the status, and the others go on", async () => {
  const lou = await client("lou", "acme", { todos: "SELECT * FROM todos" });
  await live(lou);
  await lou.subscribe("bad", "SELECT * FROM no_such_table");
  const s = await within(lou.until((st) => st.error?.startsWith("query_refused")), "the refusal");
  assert.equal(s.state, "live");
  assert.deepEqual((await lou.subscriptions()).map((x) => x.id), ["todos"]);
  // Pushed rows no subscription holds still settle (nothing waits for "bad").
  await lou.db.exec("INSERT INTO lists (id, tenant_id, owner, name) VALUES (900, 'acme', 'lou', 'unheld')");
  await eventually(async () => (await serviceSql(server, ["SELECT 1 FROM lists WHERE id = 900"]))[0].length, "the push");
  await eventually(async () => (await lou.db.execA("SELECT 1 FROM lists WHERE id = 900")).length === 0, "the pushed row to settle");
});
