// A JavaScript client (real cr-sqlite 0.16), a Rust replica (the
// `tenantsync replica sync` command over HTTP) and the server converge on
// the same rows, concurrent writes to one row included.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import path from "node:path";
import { after, before, test } from "node:test";
import { TenantSyncClient } from "../src/index.js";
import { openNodeDatabase } from "../src/node.js";
import { SCHEMA, binary, eventually, serviceSql, startServer, token, within } from "./harness.js";

let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server.stop();
});

const cli = (...args) => execFileSync(binary(), args, { encoding: "utf8" });
const ROWS = "SELECT id, title, done FROM todos WHERE id >= 700 ORDER BY id";

test("a JS client, a Rust replica and the server converge", async () => {
  const js = await TenantSyncClient.open({
    url: server.url,
    token: () => token("kim", "acme"),
    db: await openNodeDatabase(),
    schema: SCHEMA,
    subscriptions: { todos: "SELECT * FROM todos" },
  });
  try {
    await within(js.until((s) => s.state === "live"), "the JS client");
    const replica = path.join(server.dir, "kim-rust.db");
    const sync = () =>
      cli("replica", "sync", "--server", server.url, "--token", token("kim", "acme"), "--db", replica, "--subscribe", "SELECT * FROM todos", "--id", "todos");
    const rust = () => cli("sql", replica, ROWS).trim().split("\n").filter(Boolean).map((l) => JSON.parse(l));

    await js.db.exec("INSERT INTO todos (id, tenant_id, owner, title) VALUES (700, 'acme', 'kim', 'from js')");
    await eventually(async () => (await serviceSql(server, [ROWS]))[0].length === 1, "the JS push");
    sync();
    cli("sql", replica, "INSERT INTO todos (id, tenant_id, owner, title) VALUES (701, 'acme', 'kim', 'from rust')");
    sync();
    await eventually(async () => (await js.db.execA(ROWS)).length === 2, "the Rust row at the JS client");

    // One row written on both sides: different columns both win.
    await js.db.exec("UPDATE todos SET title = 'js title' WHERE id = 700");
    cli("sql", replica, "UPDATE todos SET done = 1 WHERE id = 700");
    sync();
    await eventually(async () => (await serviceSql(server, ["SELECT title FROM todos WHERE id = 700"]))[0][0][0] === "js title", "the JS update");
    sync();
    const expected = [
      [700, "js title", 1],
      [701, "from rust", 0],
    ];
    await eventually(async () => JSON.stringify(await js.db.execA(ROWS)) === JSON.stringify(expected), "the JS client to converge");
    assert.deepEqual((await serviceSql(server, [ROWS]))[0], expected);
    assert.deepEqual(rust(), expected);
  } finally {
    js.close();
  }
});
