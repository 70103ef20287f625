# Append latency and CPU per write, one node vs a cluster of 3 (docs/BENCH.md,
# "Cluster"): N sequential service-SQL inserts of one tenant over keep-alive
# HTTP, first to `tenantsync serve` (6 shards), then to the owner of the
# tenant's shard in `tenantsync cluster up --nodes 3` (3 NATS servers, logs
# replicated 3 times), then through another node. Run from the repository
# root after `cargo build --release`: `python3 loadtest/scripts/cluster_latency.py`.
import http.client, json, os, subprocess, sys, time, urllib.parse

BIN = os.environ.get("TENANTSYNC_BIN", "target/release/tenantsync")
S = "measure-secret-at-least-16-bytes"
N = int(os.environ.get("N", "1000"))

def token():
    return subprocess.check_output([BIN, "token", "--secret", S, "--sub", "m", "--role", "service"]).decode().strip()

TOK = token()

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().split(")")[-1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

def writes(url, tenant, n, base):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port)
    lat = []
    h = {"Authorization": "Bearer " + TOK, "Content-Type": "application/json"}
    for i in range(n):
        body = json.dumps({"tenant": tenant, "statements": [{"sql": f"INSERT INTO todos (id, tenant_id, owner, title) VALUES ({base + i}, '{tenant}', 'u', 'x')", "params": []}]})
        t = time.perf_counter()
        c.request("POST", "/v1/sql", body, h)
        r = c.getresponse(); r.read()
        lat.append(time.perf_counter() - t)
        assert r.status == 200, r.status
    lat.sort()
    return lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000

def get(url, path):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port)
    c.request("GET", path, headers={"Authorization": "Bearer " + TOK})
    return json.loads(c.getresponse().read())

def single(d):
    p = subprocess.Popen([BIN, "serve", "--db", f"{d}/server.db", "--schema", "examples/schema.sql", "--policy", "examples/policy.sql", "--listen", "127.0.0.1:0", "--jwt-secret", S, "--shards", "6"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    url = p.stdout.readline().decode().split()[-1]
    writes(url, "acme", 100, 10_000_000)  # warm up
    c0 = cpu(p.pid)
    p50, p99 = writes(url, "acme", N, 0)
    c1 = cpu(p.pid)
    p.terminate(); p.wait()
    return p50, p99, (c1 - c0) / N * 1e6

def cluster(d):
    p = subprocess.Popen([BIN, "cluster", "up", "--nodes", "3", "--dir", f"{d}/c", "--schema", "examples/schema.sql", "--policy", "examples/policy.sql", "--jwt-secret", S, "--shards", "6"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    nodes = {}
    while True:
        l = p.stdout.readline().decode().strip()
        if l == "cluster ready": break
        f = l.split(); nodes[f[1]] = (f[2], int(f[4]))
    v = get(list(nodes.values())[0][0], "/v1/admin/cluster?tenant=acme")
    owner = v["tenant"]["owner"]
    other = [n for n in nodes if n != owner][0]
    writes(nodes[owner][0], "acme", 100, 10_000_000)
    c0 = {n: cpu(pid) for n, (_, pid) in nodes.items()}
    p50, p99 = writes(nodes[owner][0], "acme", N, 0)
    c1 = {n: cpu(pid) for n, (_, pid) in nodes.items()}
    f50, f99 = writes(nodes[other][0], "acme", N, 20_000_000)
    p.terminate(); p.wait()
    per = {n: (c1[n] - c0[n]) / N * 1e6 for n in nodes}
    return p50, p99, per, owner, f50, f99

import tempfile
with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
    s50, s99, scpu = single(d1)
    c50, c99, per, owner, f50, f99 = cluster(d2)
print(f"writes: {N} sequential service-SQL inserts of one tenant")
print(f"single node (6 shards):        p50 {s50:.2f} ms  p99 {s99:.2f} ms  server CPU {scpu:.0f} us/write")
print(f"cluster of 3, on the owner:    p50 {c50:.2f} ms  p99 {c99:.2f} ms  (append adds p50 {c50 - s50:.2f} ms, p99 {c99 - s99:.2f} ms)")
print(f"cluster of 3, through another: p50 {f50:.2f} ms  p99 {f99:.2f} ms")
for n, c in sorted(per.items()):
    print(f"  CPU on {n} ({'owner' if n == owner else 'standby'}): {c:.0f} us/write")
