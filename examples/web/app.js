// A todo app for two tenants on @tenantsync/client: todos of the user and
// of the lists shared with them, live; writes offline or online; refused
// writes shown from the quarantine. The page is opened as
//   /?user=alice&tenant=acme
// and gets its token from /token (js/serve-example.js stands in for the
// SaaS's login) and the server's address from /config.

import { TenantSyncClient, openDatabase } from "@tenantsync/client";

const params = new URLSearchParams(location.search);
const user = params.get("user") ?? "alice";
const tenant = params.get("tenant") ?? "acme";
const $ = (id) => document.getElementById(id);

const config = await (await fetch("/config")).json();
const schema = await (await fetch("/schema.sql")).text();
const token = async () => (await fetch(`/token?user=${encodeURIComponent(user)}&tenant=${encodeURIComponent(tenant)}`)).text();

$("who").textContent = `${user} @ ${tenant}`;
document.forms.add.tenant.value = tenant;

const db = await openDatabase(`tenantsync-${tenant}-${user}`);
const client = await TenantSyncClient.open({
  url: config.server,
  token,
  db,
  schema,
  subscriptions: {
    lists: "SELECT * FROM lists",
    todos: "SELECT * FROM todos",
  },
});
window.tenantsync = client; // for the browser tests and the curious

const showStatus = (s) => {
  const el = $("status");
  el.dataset.state = s.state;
  el.dataset.modes = JSON.stringify(Object.fromEntries(client.modes));
  el.textContent = s.state + (s.quarantined ? ` · ${s.quarantined} refused` : "");
};
client.onStatus(async (s) => {
  showStatus(s);
  renderQuarantine(await client.quarantine());
});
showStatus(client.status);

client.liveQuery("SELECT id, title, done, tenant_id FROM todos ORDER BY id", [], (rows) => {
  $("todos").replaceChildren(
    ...rows.map((r) => {
      const li = document.createElement("li");
      li.textContent = `${r.title}${r.done ? " ✓" : ""}`;
      li.dataset.id = String(r.id);
      return li;
    }),
  );
});

function renderQuarantine(q) {
  $("quarantine").replaceChildren(
    ...q
      .filter((c) => c.cid === "title")
      .map((c) => {
        const li = document.createElement("li");
        li.className = "quarantined";
        li.textContent = `${c.value} — ${c.detail}`;
        return li;
      }),
  );
}

document.forms.add.addEventListener("submit", async (e) => {
  e.preventDefault();
  const f = e.target;
  const [[list]] = (await db.execA("SELECT min(id) FROM lists")) ?? [[null]];
  await db.exec(
    "INSERT INTO todos (id, tenant_id, list_id, owner, title) VALUES ((SELECT coalesce(max(id), 0) + 1 + abs(random() % 1000000) FROM todos), ?, ?, ?, ?)",
    [f.tenant.value, list, user, f.title.value],
  );
  f.title.value = "";
});

// The browser says when the network goes and comes back.
addEventListener("offline", () => client.disconnect());
addEventListener("online", () => client.connect());
