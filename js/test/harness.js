// A real `tenantsync serve` for the package's tests: a child process on a
// free loopback port, on the examples' schema and policies, with an HS256
// secret the tests mint tokens with.

import { spawn } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
/** The server's environment: ours, less the harness's own TENANTSYNC_BIN
 * (the server would warn that it is not a configuration variable). */
function serverEnv() {
  const { TENANTSYNC_BIN: _bin, ...env } = process.env;
  return { ...env, RUST_LOG: "warn" };
}

export const SECRET = "js-client-test-secret";
export const SCHEMA = fs.readFileSync(path.join(root, "examples/schema.sql"), "utf8");

/** The tenantsync binary: $TENANTSYNC_BIN, else the workspace's debug build. */
export function binary() {
  const bin = process.env.TENANTSYNC_BIN ?? path.join(root, "target/debug/tenantsync");
  if (!fs.existsSync(bin)) {
    throw new Error(`no tenantsync binary at ${bin}: run \`cargo build --bin tenantsync\` or set TENANTSYNC_BIN`);
  }
  return bin;
}

/** Starts a server; `await server.stop()` ends it. `dir` keeps its database. */
export async function startServer({ dir = fs.mkdtempSync(path.join(os.tmpdir(), "tsjs-")), listen = "127.0.0.1:0" } = {}) {
  const child = spawn(
    binary(),
    [
      "serve",
      "--db", path.join(dir, "server.db"),
      "--schema", path.join(root, "examples/schema.sql"),
      "--policy", path.join(root, "examples/policy.sql"),
      "--listen", listen,
      "--jwt-secret", SECRET,
      "--synchronous", "normal",
    ],
    { env: serverEnv(), stdio: ["ignore", "pipe", "inherit"] },
  );
  const lines = readline.createInterface({ input: child.stdout });
  const first = await new Promise((resolve, reject) => {
    lines.once("line", resolve);
    child.once("exit", (code) => reject(new Error(`tenantsync serve exited with ${code}`)));
  });
  const url = first.trim().replace(/^listening on /, "");
  return {
    dir,
    url,
    async stop() {
      child.kill("SIGTERM");
      await new Promise((resolve) => (child.exitCode !== null ? resolve() : child.once("exit", resolve)));
    },
  };
}

const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");

/** An HS256 token for a user of a tenant (or the service role). */
export function token(sub, tenant, opts = {}) {
  const { ttl = 3600, claims = {} } = opts;
  const role = "role" in opts ? opts.role : "authenticated";
  const body = { sub, role, tenant_id: tenant, exp: Math.floor(Date.now() / 1000) + ttl, ...claims };
  if (role === undefined) delete body.role;
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(body)}`;
  const sig = crypto.createHmac("sha256", SECRET).update(head).digest("base64url");
  return `${head}.${sig}`;
}

/** Service SQL on the server: the rows of each statement. */
export async function serviceSql(server, statements, tenant) {
  const res = await fetch(`${server.url}/v1/sql`, {
    method: "POST",
    headers: { authorization: `Bearer ${token("backend", tenant ?? "acme", { role: "service" })}`, "content-type": "application/json" },
    body: JSON.stringify({ statements: statements.map((s) => (typeof s === "string" ? { sql: s } : s)) }),
  });
  const body = await res.json();
  if (!res.ok) throw new Error(`service SQL failed: ${JSON.stringify(body)}`);
  return body.results.map((r) => r.rows);
}

/** `POST /v1/admin/schema`: the status and the body. */
export async function changeSchema(server, schemaSql) {
  const res = await fetch(`${server.url}/v1/admin/schema`, {
    method: "POST",
    headers: { authorization: `Bearer ${token("backend", "acme", { role: "service" })}`, "content-type": "application/json" },
    body: JSON.stringify({ schema_sql: schemaSql }),
  });
  return { status: res.status, body: await res.json() };
}

/** Polls `fn` until it returns a truthy value (or fails after `ms`). */
export async function eventually(fn, what, ms = 10000) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** `promise`, or a failure naming `what` after `ms`. */
export function within(promise, what, ms = 10000) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
