// The example app in a real headless Chromium (Debian's, driven by
// playwright-core: no browser is downloaded), against a real server: three
// users of two tenants in three browser contexts.

import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startExampleServer } from "../serve-example.js";
import { SECRET, changeSchema, serviceSql, startServer } from "./harness.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const ARTIFACTS = path.join(path.dirname(fileURLToPath(import.meta.url)), "../test-artifacts");

let server;
let web;
let browser;
before(async () => {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`no Chromium at ${CHROMIUM}: apt-get install chromium (or set CHROMIUM)`);
  }
  server = await startServer();
  // Alice's list, shared with Carol; Bob is of another tenant.
  await serviceSql(server, [
    "INSERT INTO lists (id, tenant_id, owner, name) VALUES (1, 'acme', 'alice', 'groceries')",
    "INSERT INTO members (list_id, user_id, tenant_id) VALUES (1, 'carol', 'acme')",
    "INSERT INTO lists (id, tenant_id, owner, name) VALUES (2, 'globex', 'bob', 'bob''s')",
  ]);
  web = await startExampleServer({ server: server.url, secret: SECRET });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
});
after(async () => {
  await browser?.close();
  await web?.close();
  await server?.stop();
});

async function open(user, tenant) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[${user}] ${e.message}`));
  await page.goto(`${web.url}/?user=${user}&tenant=${tenant}`);
  await page.waitForSelector('#status[data-state="live"]', { timeout: 20000 });
  return { context, page };
}

async function add(page, title, tenant) {
  if (tenant) await page.fill('input[name="tenant"]', tenant);
  await page.fill('input[name="title"]', title);
  await page.click("button");
}

const todos = (page) => page.$$eval("#todos li", (lis) => lis.map((li) => li.textContent));
const shows = (page, text) => page.waitForSelector(`#todos li:text-is("${text}")`, { timeout: 15000 });

test("two tenants in two browsers: live sync within what the policies allow, offline, reload, refusal, a schema change", async () => {
  const alice = await open("alice", "acme");
  const carol = await open("carol", "acme");
  const bob = await open("bob", "globex");

  // Alice's todo in the shared list reaches Carol's live query.
  await add(alice.page, "milk");
  await shows(alice.page, "milk");
  await shows(carol.page, "milk");
  // Bob's reaches no one of acme; Alice's never reaches Bob.
  await add(bob.page, "bob's secret");
  await shows(bob.page, "bob's secret");
  await add(alice.page, "eggs");
  await shows(carol.page, "eggs");
  assert.deepEqual(await todos(bob.page), ["bob's secret"]);
  assert.ok(!(await todos(carol.page)).includes("bob's secret"));
  assert.ok(!(await todos(alice.page)).includes("bob's secret"));

  // Offline: Alice writes with the network gone; it syncs when it is back.
  await alice.context.setOffline(true);
  await alice.page.waitForSelector('#status[data-state="offline"]');
  await add(alice.page, "written offline");
  await shows(alice.page, "written offline");
  assert.ok(!(await todos(carol.page)).includes("written offline"));
  await alice.context.setOffline(false);
  await shows(carol.page, "written offline");

  // A reload keeps the data (IndexedDB) and resumes from the cursors.
  await carol.page.reload();
  await carol.page.waitForSelector('#status[data-state="live"]', { timeout: 20000 });
  const modes = JSON.parse(await carol.page.getAttribute("#status", "data-modes"));
  assert.equal(modes.todos, "resume");
  assert.deepEqual((await todos(carol.page)).sort(), ["eggs", "milk", "written offline"]);

  // A write into another tenant is refused, shown, and not kept.
  await add(alice.page, "into globex", "globex");
  await alice.page.waitForSelector('#quarantine li:has-text("into globex")', { timeout: 15000 });
  await alice.page.waitForFunction(() => ![...document.querySelectorAll("#todos li")].some((li) => li.textContent === "into globex"));
  const [[n]] = await serviceSql(server, ["SELECT count(*) FROM todos WHERE title = 'into globex'"]);
  assert.equal(n[0], 0);
  assert.deepEqual(await todos(bob.page), ["bob's secret"]);

  // A schema change reaches the open pages, served from another origin
  // than the server's: the migration comes on the WebSocket (no CORS).
  const { status, body } = await changeSchema(server, "ALTER TABLE todos ADD COLUMN due TEXT");
  assert.equal(status, 200, JSON.stringify(body));
  for (const p of [alice.page, carol.page, bob.page]) {
    await p.waitForFunction(() => window.tenantsync.status.schemaVersion === 2, null, { timeout: 15000 });
    assert.equal(await p.getAttribute("#status", "data-state"), "live");
  }
  await serviceSql(server, ["UPDATE todos SET due = 'friday' WHERE title = 'milk'"]);
  await carol.page.waitForFunction(
    async () => JSON.stringify(await window.tenantsync.db.execA("SELECT due FROM todos WHERE title = 'milk'")) === '[["friday"]]',
    null,
    { timeout: 15000, polling: 100 },
  );

  fs.mkdirSync(ARTIFACTS, { recursive: true });
  await alice.page.screenshot({ path: path.join(ARTIFACTS, "todo-app.png"), fullPage: true });
});
