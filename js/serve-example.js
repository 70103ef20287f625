#!/usr/bin/env node
// Serves examples/web (the todo app) with the client package and its
// dependencies, so it runs in a browser with no bundler:
//
//   node js/serve-example.js --server http://127.0.0.1:8080 --secret <the server's --jwt-secret> [--port 5173]
//
// /client/ is js/src, /node_modules/ is js/node_modules (an extensionless
// relative import gets its `.js`), /schema.sql the examples' schema,
// /config the server's address, and /token?user=&tenant= mints a one-hour
// HS256 token: the stand-in for a SaaS's login, for trying the app only.

import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..");
const MOUNTS = [
  ["/client/", path.join(here, "src")],
  ["/node_modules/", path.join(here, "node_modules")],
  ["/", path.join(root, "examples/web")],
];
const TYPES = { ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".sql": "text/plain", ".css": "text/css" };

function mint(secret, user, tenant) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: user, role: "authenticated", tenant_id: tenant, exp: Math.floor(Date.now() / 1000) + 3600 })}`;
  return `${head}.${crypto.createHmac("sha256", secret).update(head).digest("base64url")}`;
}

function file(urlPath) {
  for (const [prefix, dir] of MOUNTS) {
    if (!urlPath.startsWith(prefix)) continue;
    let p = path.join(dir, decodeURIComponent(urlPath.slice(prefix.length)) || "index.html");
    if (p !== dir && !p.startsWith(dir + path.sep)) return null;
    if (fs.existsSync(p) && fs.statSync(p).isDirectory()) p = path.join(p, "index.html");
    if (!fs.existsSync(p) && fs.existsSync(`${p}.js`)) p = `${p}.js`;
    return fs.existsSync(p) ? p : null;
  }
  return null;
}

/** Starts the example's server; resolves to its base URL and a `close`. */
export function startExampleServer({ server, secret, port = 0, host = "127.0.0.1" }) {
  const schema = fs.readFileSync(path.join(root, "examples/schema.sql"));
  const srv = http.createServer((req, res) => {
    const url = new URL(req.url, "http://x");
    const send = (status, type, body) => {
      res.writeHead(status, { "content-type": type, "cache-control": "no-store" });
      res.end(body);
    };
    if (url.pathname === "/config") return send(200, "application/json", JSON.stringify({ server }));
    if (url.pathname === "/schema.sql") return send(200, "text/plain", schema);
    if (url.pathname === "/token") {
      const user = url.searchParams.get("user");
      const tenant = url.searchParams.get("tenant");
      if (!user || !tenant) return send(400, "text/plain", "user and tenant are required");
      return send(200, "text/plain", mint(secret, user, tenant));
    }
    const p = file(url.pathname);
    if (!p) return send(404, "text/plain", "not found");
    send(200, TYPES[path.extname(p)] ?? "application/octet-stream", fs.readFileSync(p));
  });
  return new Promise((resolve) => {
    srv.listen(port, host, () => {
      const { port: bound } = srv.address();
      resolve({ url: `http://${host}:${bound}`, close: () => new Promise((r) => srv.close(r)) });
    });
  });
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  const arg = (name, fallback) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? process.argv[i + 1] : fallback;
  };
  const server = arg("server", "http://127.0.0.1:8080");
  const secret = arg("secret");
  if (!secret) {
    console.error("--secret is required: the --jwt-secret the tenantsync server was started with");
    process.exit(2);
  }
  const { url } = await startExampleServer({ server, secret, port: Number(arg("port", "5173")) });
  console.log(`the todo app: ${url}/?user=alice&tenant=acme  (and ${url}/?user=bob&tenant=globex in another browser profile)`);
}
