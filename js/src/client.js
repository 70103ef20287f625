// The tenantsync client: keeps a crsqlite-wasm database in sync with a
// tenantsync server over the WebSocket protocol (docs/PROTOCOL.md), offline
// first: the application reads and writes the local database with plain
// SQL at any time; the client pushes its writes, applies deliveries,
// restores refusals into a quarantine, reconnects with backoff and resumes
// from cursors kept in the database, in the transaction of the data.

import { int, parse, stringify } from "./json.js";
import { OWN_TABLES, Replica } from "./replica.js";
import { exclusive } from "./sql.js";

const PROTOCOL = 1;

/**
 * @typedef {"connecting" | "syncing" | "live" | "offline" | "closed"} State
 * @typedef {{ state: State, quarantined: number, error: string | null, refused: number }} Status
 *   `quarantined`: rows with quarantined changes; `refused`: pushes refused
 *   in this session; `error`: the last error the server or the client named.
 */

export class TenantSyncClient {
  /**
   * Opens a client on `db` (a crsqlite-wasm `DB`): installs its tables, runs
   * `schema` on a new replica (the server's schema version `schemaVersion`,
   * 1 by default; without `schema`, the server's current one comes with the
   * first `welcome`), and connects. A replica behind the server's
   * schema version migrates in place (docs/PROTOCOL.md §5.4).
   * @param {{
   *   url: string,
   *   token: string | (() => string | Promise<string>),
   *   db: any,
   *   schema?: string,
   *   schemaVersion?: number,
   *   subscriptions?: Record<string, string>,
   *   WebSocket?: any,
   *   backoff?: { minMs?: number, maxMs?: number },
   *   connect?: boolean,
   * }} options
   */
  static async open(options) {
    const client = new TenantSyncClient(options);
    await client.#install(options.schema, options.schemaVersion ?? 1);
    for (const [id, query] of Object.entries(options.subscriptions ?? {})) await client.subscribe(id, query);
    if (options.connect !== false) client.connect();
    return client;
  }

  #url;
  #token;
  #WebSocket;
  #backoff;
  #ws = null;
  #welcomed = false;
  #attempt = 0;
  #timer = null;
  #closed = true;
  #busy = false;
  #staged = new Map();
  #more = [];
  #inflight = null;
  #pushSeq = 0;
  #pushTimer = null;
  #maxBytes = 1 << 20;
  #status = { state: "offline", quarantined: 0, error: null, refused: 0, schemaVersion: 0 };
  #listeners = new Set();

  /** Per subscription, the mode of its last initial sync (snapshot, resume, refetch). */
  modes = new Map();

  constructor(options) {
    this.db = options.db;
    this.#url = options.url.replace(/\/$/, "");
    this.#token = typeof options.token === "function" ? options.token : () => options.token;
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.#backoff = { minMs: 250, maxMs: 15000, ...(options.backoff ?? {}) };
    this.siteId = String(this.db.siteid).toLowerCase();
    this.db.onUpdate((_type, _db, table) => {
      if (!this.#busy && !OWN_TABLES.has(table)) this.#schedulePush();
    });
  }

  // ---- the application's side -----------------------------------------------

  /** The current status. */
  get status() {
    return { ...this.#status };
  }

  /** Calls `cb(status)` on every change; returns the unsubscribe function. */
  onStatus(cb) {
    this.#listeners.add(cb);
    return () => this.#listeners.delete(cb);
  }

  /** Resolves once `pred(status)` holds (checked now and on every change). */
  until(pred) {
    return new Promise((resolve) => {
      if (pred(this.status)) return resolve(this.status);
      const off = this.onStatus((s) => {
        if (pred(s)) {
          off();
          resolve(s);
        }
      });
    });
  }

  /** Adds (or replaces the query of) a subscription. */
  async subscribe(id, query) {
    const changed = await this.#tx((r) => r.subscribe(id, query));
    if (changed && this.#welcomed) this.#sendSubscribe({ id, query, cursor: null });
    if (changed) this.#setStatus({ state: this.#welcomed ? "syncing" : this.#status.state });
  }

  /**
   * Ends a subscription: the server forgets it, and rows no other
   * subscription holds leave the replica (without a delete; one with
   * unpushed changes once they are pushed and answered).
   */
  async unsubscribe(id) {
    await this.#drop(id);
    if (this.#welcomed) this.#send({ type: "unsubscribe", id });
  }

  /** Drops a subscription from the replica (its rows as `unsubscribe` says). */
  async #drop(id) {
    await this.#tx((r) => r.unsubscribe(id));
    this.#staged.delete(id);
    this.modes.delete(id);
    await this.#refreshQuarantine();
    this.#maybeLive();
  }

  /** The subscriptions with their cursors. */
  subscriptions() {
    return this.#tx((r) => r.subscriptions());
  }

  /** The quarantined local changes (refused by the server). */
  quarantine() {
    return this.#tx((r) => r.quarantined());
  }

  /** Forgets quarantined changes by id. */
  async discardQuarantined(ids) {
    await this.#tx((r) => r.discardQuarantined(ids));
    await this.#refreshQuarantine();
  }

  /** The peer's pushed version as the server last said. */
  pushedVersion() {
    return this.#tx((r) => r.pushedVersion());
  }

  /**
   * A live query: `cb(rows)` now and whenever a table the query reads
   * changes (by a local write or by sync). Returns the unsubscribe function.
   */
  liveQuery(sql, params, cb) {
    let stopped = false;
    let queued = false;
    let tables = null;
    const run = async () => {
      queued = false;
      if (stopped) return;
      cb(await this.db.execO(sql, params));
    };
    const off = this.db.onUpdate((_type, _db, table) => {
      if (stopped || queued || (tables && !tables.has(table))) return;
      queued = true;
      setTimeout(run, 0);
    });
    this.db
      .execA(
        "SELECT tbl_name FROM tables_used(?) AS u JOIN sqlite_master ON sqlite_master.name = u.name WHERE u.schema = 'main'",
        [sql],
      )
      .then((rows) => {
        tables = new Set(rows.map((r) => r[0]));
      })
      .then(run);
    return () => {
      stopped = true;
      off();
    };
  }

  /** Connects (again) and keeps reconnecting until `close`. */
  connect() {
    this.#closed = false;
    if (!this.#ws && !this.#timer) this.#open();
  }

  /** Goes offline: closes the socket and stops reconnecting. */
  disconnect() {
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#timer = null;
    this.#ws?.close(1000, "client going offline");
    this.#dropSession();
    this.#setStatus({ state: "offline" });
  }

  /** Disconnects for good. */
  close() {
    this.disconnect();
    this.#setStatus({ state: "closed" });
  }

  // ---- the connection -------------------------------------------------------

  async #open() {
    this.#setStatus({ state: "connecting" });
    let token;
    try {
      token = await this.#token();
    } catch (e) {
      this.#setStatus({ error: `the token provider failed: ${e.message}` });
      return this.#retry();
    }
    // The version the replica has: the welcome brings the migrations above it.
    const schemaVersion = await this.#tx((r) => r.schemaVersion());
    if (this.#closed) return;
    const WS = this.#WebSocket ?? (await import("ws")).WebSocket;
    const ws = new WS(`${this.#url.replace(/^http/, "ws")}/v1/sync`);
    this.#ws = ws;
    ws.onopen = () => {
      this.#send({ type: "hello", protocol: PROTOCOL, site_id: this.siteId, client: "tenantsync-js", token, schema_version: schemaVersion });
    };
    ws.onmessage = (ev) => {
      const text = typeof ev.data === "string" ? ev.data : new TextDecoder().decode(ev.data);
      this.#queue = this.#queue.then(() => this.#handle(parse(text))).catch((e) => this.#fail(e));
    };
    ws.onclose = (ev) => {
      if (this.#ws !== ws) return;
      this.#ws = null;
      this.#dropSession();
      if (ev.reason) this.#setStatus({ error: ev.reason });
      this.#setStatus({ state: this.#closed ? this.#status.state : "offline" });
      this.#retry();
    };
    ws.onerror = () => {};
  }

  #queue = Promise.resolve();

  #retry() {
    if (this.#closed || this.#timer) return;
    const { minMs, maxMs } = this.#backoff;
    const delay = Math.min(maxMs, minMs * 2 ** Math.min(this.#attempt++, 10)) * (0.5 + Math.random() / 2);
    this.#timer = setTimeout(() => {
      this.#timer = null;
      if (!this.#closed) this.#open();
    }, delay);
  }

  #dropSession() {
    this.#welcomed = false;
    this.#staged.clear();
    this.#more = [];
    this.#inflight = null;
  }

  #fail(e) {
    this.#setStatus({ error: String(e?.message ?? e) });
    this.#ws?.close(1011, "client error");
  }

  #send(msg) {
    if (this.#ws && this.#ws.readyState === 1) this.#ws.send(stringify(msg));
  }

  #sendSubscribe(s) {
    this.#staged.set(s.id, null);
    this.#send({ type: "subscribe", id: s.id, query: s.query, cursor: s.cursor ?? undefined });
  }

  /** Runs `fn(replica)` in one exclusive transaction of the database. */
  async #tx(fn) {
    return exclusive(this.db, async (sql) => {
      this.#busy = true;
      try {
        return await fn(new Replica(sql));
      } finally {
        this.#busy = false;
      }
    });
  }

  async #install(schema, version) {
    const now = await this.#tx(async (r) => {
      await Replica.install(r.sql);
      if (schema && !(await r.meta("schema_applied"))) {
        await r.sql.exec(schema);
        await r.setMeta("schema_applied", 1n);
        await r.setMeta("schema_version", BigInt(version));
      }
      return r.schemaVersion();
    });
    this.#setStatus({ schemaVersion: now });
    await this.#refreshQuarantine();
  }

  /**
   * Runs the server's migrations above the replica's schema version, up to
   * version `to`, in one transaction (at `welcome` and at a `schema`
   * message, before anything later is applied; docs/PROTOCOL.md §5.4).
   * Rows, clocks, cursors and unpushed writes stay. Migrations that do not
   * follow the replica's version throw: the session ends, and the next
   * `welcome` brings every one the replica lacks.
   */
  async #migrate(to, migrations) {
    const now = await this.#tx(async (r) => {
      const from = await r.schemaVersion();
      if (from >= to) return from;
      let next = from + 1;
      for (const m of migrations ?? []) {
        const v = int(m.version);
        if (v <= from) continue;
        if (v !== next) throw new Error(`the server's migrations skip from version ${next - 1} to ${v}`);
        await r.sql.exec(m.sql);
        next += 1;
      }
      if (next <= to) throw new Error(`the server is at schema version ${to} but sent migrations up to ${next - 1}`);
      await r.setMeta("schema_applied", 1n);
      await r.setMeta("schema_version", BigInt(to));
      return to;
    });
    this.#setStatus({ schemaVersion: now });
  }

  async #refreshQuarantine() {
    const n = new Set((await this.quarantine()).map((c) => `${c.table}\u0000${c.pk}`)).size;
    if (n !== this.#status.quarantined) this.#setStatus({ quarantined: n });
  }

  #setStatus(patch) {
    const next = { ...this.#status, ...patch };
    if (JSON.stringify(next) === JSON.stringify(this.#status)) return;
    this.#status = next;
    for (const cb of this.#listeners) cb(this.status);
  }

  // ---- messages ---------------------------------------------------------------

  async #handle(m) {
    switch (m.type) {
      case "welcome":
        return this.#welcome(m);
      case "subscribed":
        this.#staged.set(m.id, { chunks: [] });
        this.modes.set(m.id, m.mode);
        return;
      case "snapshot":
        return this.#snapshot(m);
      case "changes":
        return this.#changes(m);
      case "push_ok":
        return this.#pushOk(m);
      case "push_refused":
        return this.#pushRefused(m);
      case "error":
        return this.#error(m);
      case "schema":
        return this.#migrate(int(m.schema_version), m.migrations);
      default:
        return; // pong, unsubscribed, later additions
    }
  }

  async #welcome(m) {
    this.#attempt = 0;
    this.#maxBytes = int(m.limits?.max_message_bytes ?? 1048576n);
    await this.#migrate(int(m.schema_version ?? 1n), m.migrations);
    const subs = await this.#tx(async (r) => {
      await r.setPushedVersion(int(m.peer.pushed_version));
      return r.subscriptions();
    });
    this.#welcomed = true;
    this.#setStatus({ state: subs.length ? "syncing" : "live", error: null });
    for (const s of subs) this.#sendSubscribe(s);
    this.#schedulePush();
  }

  async #snapshot(m) {
    const st = this.#staged.get(m.sub);
    if (!st) return;
    st.chunks.push(m);
    if (!m.last) return;
    const version = int(m.version);
    const chunks = st.chunks.filter((c) => int(c.version) === version);
    const part = {
      sub: m.sub,
      reset: m.reset === true,
      changes: chunks.flatMap((c) => c.changes ?? []),
      evict: chunks.flatMap((c) => c.evict ?? []),
    };
    await this.#apply(version, [part]);
    this.#staged.delete(m.sub);
    this.#send({ type: "ack", cursors: { [m.sub]: version } });
    this.#maybeLive();
  }

  async #changes(m) {
    if (m.more) {
      this.#more.push(m);
      return;
    }
    const all = [...this.#more, m];
    this.#more = [];
    const version = int(m.version);
    const bySub = new Map();
    for (const msg of all) {
      for (const [sub, p] of Object.entries(msg.subs ?? {})) {
        const part = bySub.get(sub) ?? { sub, from: int(p.from), reset: false, changes: [], evict: [] };
        part.changes.push(...(p.changes ?? []));
        part.evict.push(...(p.evict ?? []));
        bySub.set(sub, part);
      }
    }
    const subs = new Map((await this.subscriptions()).map((s) => [s.id, s]));
    const parts = [];
    for (const part of bySub.values()) {
      const s = subs.get(part.sub);
      if (!s || s.cursor === null || this.#staged.has(part.sub)) continue;
      if (part.from > s.cursor) {
        // A gap: ask for everything after the cursor again (§5.2).
        this.#staged.set(part.sub, null);
        this.#send({ type: "resync", sub: part.sub, cursor: s.cursor });
        continue;
      }
      parts.push(part);
    }
    if (!parts.length) return;
    await this.#apply(version, parts);
    this.#send({ type: "ack", cursors: Object.fromEntries(parts.map((p) => [p.sub, version])) });
  }

  async #apply(version, parts) {
    await this.#tx(async (r) => {
      await r.applyParts(version, parts);
      await r.settle(version);
    });
    await this.#refreshQuarantine();
  }

  #maybeLive() {
    if ([...this.#staged.values()].length === 0) this.#setStatus({ state: "live" });
  }

  // ---- pushes ---------------------------------------------------------------

  #schedulePush() {
    if (this.#pushTimer) return;
    this.#pushTimer = setTimeout(() => {
      this.#pushTimer = null;
      this.#queue = this.#queue.then(() => this.#push()).catch((e) => this.#fail(e));
    }, 0);
  }

  async #push() {
    if (!this.#welcomed || this.#inflight) return;
    const batch = await this.#tx((r) => r.nextPush(this.#maxBytes));
    if (!batch || !this.#welcomed) return;
    const id = `p${++this.#pushSeq}`;
    this.#inflight = { id, batch };
    this.#send({ type: "push", id, from: batch.from, to: batch.to, changes: batch.changes });
  }

  async #pushOk(m) {
    const f = this.#inflight;
    if (!f || f.id !== m.id) return;
    await this.#tx(async (r) => {
      await r.pushOk(f.batch, int(m.pushed_version), int(m.server_version));
      await r.settle(int(m.server_version));
    });
    this.#inflight = null;
    this.#schedulePush();
  }

  async #pushRefused(m) {
    const f = this.#inflight;
    if (!f || f.id !== m.id) return;
    await this.#tx((r) => r.pushRefused(f.batch, m));
    this.#inflight = null;
    this.#setStatus({ refused: this.#status.refused + 1, error: m.message });
    await this.#refreshQuarantine();
    this.#schedulePush();
  }

  async #error(m) {
    const f = this.#inflight;
    if (f && m.ref === f.id) {
      this.#inflight = null;
      if (m.code === "gap") {
        await this.#tx((r) => r.setPushedVersion(int(m.pushed_version)));
        this.#schedulePush();
      } else if (m.code === "rate_limited") {
        setTimeout(() => this.#schedulePush(), int(m.retry_after_ms ?? 1000n));
      } else {
        this.#setStatus({ error: `${m.code}: ${m.message}` });
      }
      return;
    }
    if (m.ref !== undefined && this.#staged.has(m.ref)) {
      // The server refused the subscription (query_refused, limit_exceeded):
      // it leaves the replica, or its missing cursor would hold back
      // settling pushed rows for good. The status keeps the reason.
      await this.#drop(m.ref);
    }
    this.#setStatus({ error: `${m.code}: ${m.message}` });
  }
}
