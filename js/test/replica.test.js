// The replica's rules on the real cr-sqlite 0.16, without a server: what
// PROTOCOL.md §11 rule 6 and §12 ask when rows leave, when a push is in
// flight, and when the peer's own rows come back.

import assert from "node:assert/strict";
import { test } from "node:test";
import { Real } from "../src/json.js";
import { openNodeDatabase } from "../src/node.js";
import { Replica } from "../src/replica.js";
import { exclusive } from "../src/sql.js";
import { SCHEMA } from "./harness.js";

const SERVER = "aa".repeat(16);

async function replica() {
  const db = await openNodeDatabase();
  await exclusive(db, async (sql) => {
    await Replica.install(sql);
    await sql.exec(SCHEMA);
    await new Replica(sql).subscribe("todos", "SELECT * FROM todos");
  });
  const run = (fn) => exclusive(db, (sql) => fn(new Replica(sql), sql));
  return { db, run, site: String(db.siteid).toLowerCase() };
}

/** A whole todo row as the server sends it (pk 01 09 <id>, one byte). */
function row(id, title, site = SERVER, version = 1n) {
  const pk = `0109${id.toString(16).padStart(2, "0")}`;
  const cell = (cid, val) => ["todos", pk, cid, val, 1n, version, site, 1n, 0n];
  return [
    ["todos", pk, "-1", null, 1n, version, site, 1n, 0n],
    cell("tenant_id", "acme"),
    cell("owner", "u1"),
    cell("title", title),
    cell("done", 0n),
  ];
}
const key = (id) => ({ table: "todos", pk: `0109${id.toString(16).padStart(2, "0")}` });
const titles = (db) => db.execA("SELECT title FROM todos ORDER BY id").then((r) => r.map((x) => x[0]));

test("an evicted row with an unpushed change stays until the change is pushed and answered, then leaves without a delete", async () => {
  const { db, run } = await replica();
  await run((r) => r.applyParts(5, [{ sub: "todos", reset: true, changes: row(7, "held"), evict: [] }]));
  await db.exec("UPDATE todos SET title = 'mine, unpushed' WHERE id = 7");
  const removed = await run((r) => r.applyParts(6, [{ sub: "todos", reset: false, changes: [], evict: [key(7)] }]));
  assert.equal(removed, 0);
  assert.deepEqual(await titles(db), ["mine, unpushed"]);
  assert.equal((await run((r) => r.quarantined())).length, 0);
  // The write goes up, as any other.
  const batch = await run((r) => r.nextPush(1 << 20));
  assert.deepEqual(
    batch.changes.map((c) => [c[2], c[3]]),
    [["title", "mine, unpushed"]],
  );
  // Answered: no subscription holds the row, it leaves, and no delete of
  // it is left to push.
  await run(async (r) => {
    await r.pushOk(batch, batch.to, 7);
    await r.settle(7);
  });
  assert.deepEqual(await titles(db), []);
  assert.equal((await run((r) => r.quarantined())).length, 0);
  assert.equal(await run((r) => r.nextPush(1 << 20).then((b) => b?.changes.length ?? 0)), 0);
});

test("a row whose change is in a push awaiting its answer stays until the answer, then settles", async () => {
  const { db, run } = await replica();
  await run((r) => r.applyParts(5, [{ sub: "todos", reset: true, changes: row(8, "held"), evict: [] }]));
  await db.exec("UPDATE todos SET done = 1 WHERE id = 8");
  const batch = await run((r) => r.nextPush(1 << 20));
  assert.equal(batch.changes.length, 1);
  // The evict of the row the push moved out arrives before its push_ok.
  const removed = await run((r) => r.applyParts(9, [{ sub: "todos", reset: false, changes: [], evict: [key(8)] }]));
  assert.equal(removed, 0);
  assert.deepEqual(await titles(db), ["held"]);
  assert.equal((await run((r) => r.quarantined())).length, 0);
  // push_ok: the server holds it; no subscription holds the row: it leaves.
  await run(async (r) => {
    await r.pushOk(batch, batch.to, 9);
    await r.settle(9);
  });
  assert.deepEqual(await titles(db), []);
  assert.equal((await run((r) => r.quarantined())).length, 0);
});

test("the peer's own rows sent back whole are not pushed again, and the push still moves past them", async () => {
  const { db, run, site } = await replica();
  await db.exec("INSERT INTO todos (id, tenant_id, owner, title) VALUES (9, 'acme', 'u1', 'written here')");
  const first = await run((r) => r.nextPush(1 << 20));
  await run((r) => r.pushOk(first, first.to, 3));
  // The row leaves and comes back whole, with this site's own clocks.
  await run((r) => r.applyParts(4, [{ sub: "todos", reset: true, changes: [], evict: [] }]));
  await run((r) => r.settle(4));
  assert.deepEqual(await titles(db), []);
  await run((r) => r.applyParts(6, [{ sub: "todos", reset: false, changes: row(9, "written here", site, 3n), evict: [] }]));
  assert.deepEqual(await titles(db), ["written here"]);
  const next = await run((r) => r.nextPush(1 << 20));
  assert.deepEqual(next.changes, [], "merged copies of its own row are not pushed");
  assert.ok(next.to > first.to, "the push covers the merged versions");
});

test("a local write after forgetting the newest row gets a version above what was pushed", async () => {
  const { db, run } = await replica();
  await run((r) => r.applyParts(1, [{ sub: "todos", reset: true, changes: [], evict: [] }]));
  await db.exec("INSERT INTO todos (id, tenant_id, owner, title, priority) VALUES (10, 'acme', 'u1', 'a', 1.5)");
  const b = await run((r) => r.nextPush(1 << 20));
  assert.ok(b.changes.some((c) => c[3] instanceof Real && c[3].value === 1.5), "a REAL stays a REAL");
  await run((r) => r.pushOk(b, b.to, 2));
  await run((r) => r.settle(2)); // no subscription holds it: forgotten
  assert.deepEqual(await titles(db), []);
  const [[v]] = await db.execA("SELECT crsql_db_version()");
  assert.ok(Number(v) >= b.to, `crsql_db_version() went back to ${v} (pushed ${b.to})`);
  await db.exec("INSERT INTO todos (id, tenant_id, owner, title) VALUES (11, 'acme', 'u1', 'after')");
  const next = await run((r) => r.nextPush(1 << 20));
  assert.ok(next.changes.length > 0 && next.from === b.to, "the new write is pushed");
});
