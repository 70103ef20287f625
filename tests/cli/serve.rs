//! `tenantsync serve` as a real child process (docs/CLI.md, "tenantsync
//! serve"): it prints its address, answers on it, refuses an invalid policy
//! with every diagnostic, reloads its policy file on SIGHUP (keeping the old
//! set when the new one is bad), and exits cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SECRET: &str = "the serve tests' HS256 secret";

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// A running `tenantsync serve` with its stderr lines collected.
struct Server {
    child: Child,
    addr: String,
    stderr: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Server {
    fn start(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tenantsync"));
        cmd.arg("serve")
            .args(args)
            .env_remove("TENANTSYNC_CONFIG")
            .env("TENANTSYNC_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tenantsync serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).expect("read stdout");
        let addr = first
            .trim_end()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_owned();
        Server {
            child,
            addr,
            stderr: rx,
            seen: Vec::new(),
        }
    }

    /// Waits (up to 20 s) for a stderr line containing `text`; returns it.
    fn wait_for(&mut self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.contains(text)) {
                let l = l.clone();
                // Consume up to it, so the next wait looks at later lines.
                let at = self.seen.iter().position(|x| *x == l).unwrap();
                self.seen.drain(..=at);
                return l;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no stderr line with {text:?}; saw {:#?}", self.seen),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// SIGTERM, then the exit code (within 30 s).
    fn terminate(mut self) -> (Option<i32>, Vec<String>) {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut rest: Vec<String> = self.seen.drain(..).collect();
                rest.extend(self.stderr.iter());
                return (status.code(), rest);
            }
            assert!(
                Instant::now() < deadline,
                "still running 30 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET: the status and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    get_as(addr, path, None)
}

/// A GET with `Authorization: Bearer <token>` when a token is given.
fn get_as(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A service-role token minted by `tenantsync token`.
fn service_token() -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenantsync"))
        .args([
            "token", "--secret", SECRET, "--sub", "ops", "--role", "service", "--ttl", "1h",
        ])
        .output()
        .expect("tenantsync token runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn os(s: &str) -> &std::ffi::OsStr {
    s.as_ref()
}

#[test]
fn serve_listens_reloads_on_sighup_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.sql");
    std::fs::copy(examples().join("policy.sql"), &policy).unwrap();
    // The config file names the files; the flag gives the address; the
    // environment the secret.
    let config = dir.path().join("tenantsync.toml");
    std::fs::write(
        &config,
        format!(
            "db = \"server.db\"\nschema = {:?}\npolicy = \"policy.sql\"\nlisten = \"127.0.0.1:1\"\n",
            examples().join("schema.sql").display().to_string()
        ),
    )
    .unwrap();
    let mut server = Server::start(
        &[
            os("--config"),
            config.as_os_str(),
            os("--listen"),
            os("127.0.0.1:0"),
        ],
        &[("TENANTSYNC_JWT_SECRET", SECRET)],
    );
    assert!(server.addr.starts_with("127.0.0.1:"), "{}", server.addr);
    assert_ne!(server.addr, "127.0.0.1:0");
    assert!(dir.path().join("server.db").exists());

    let (status, body) = get(&server.addr, "/v1/health");
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    let (status, body) = get(&server.addr, "/v1/schema");
    assert_eq!(status, 401, "{body}");
    // The binary's Prometheus exporter renders the edge's counters, to the
    // service role only.
    assert_eq!(get(&server.addr, "/metrics").0, 401);
    let service = service_token();
    let (status, metrics) = get_as(&server.addr, "/metrics", Some(&service));
    assert_eq!(status, 200);
    assert!(
        metrics.contains("tenantsync_http_requests_total{endpoint=\"/v1/health\",status=\"200\"}"),
        "{metrics}"
    );

    // A bad policy file: refused, every diagnostic logged, the old set stays.
    std::fs::write(
        &policy,
        "CREATE POLICY a ON nosuch FOR SELECT USING (true);\nCREATE POLICY b ON todos FOR SELECT USING (nocol = 1);\n",
    )
    .unwrap();
    server.signal("HUP");
    server.wait_for("policy reload refused");
    server.wait_for("unknown table `nosuch`");
    server.wait_for("unknown column `nocol`");
    assert_eq!(get(&server.addr, "/v1/health").0, 200);
    // A good one: reloaded.
    std::fs::copy(examples().join("policy.sql"), &policy).unwrap();
    server.signal("HUP");
    server.wait_for("policies reloaded");
    // An unreadable one: the old set stays.
    std::fs::remove_file(&policy).unwrap();
    server.signal("HUP");
    server.wait_for("cannot read the file");
    assert_eq!(get(&server.addr, "/v1/health").0, 200);

    let (code, rest) = server.terminate();
    assert_eq!(code, Some(0), "{rest:#?}");
    assert!(rest.iter().any(|l| l.contains("SIGTERM")), "{rest:#?}");
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:#?}");
}

#[test]
fn serve_stops_on_sigint_too() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("server.db");
    let server = Server::start(
        &[
            os("--db"),
            db.as_os_str(),
            os("--schema"),
            examples().join("schema.sql").as_os_str(),
            os("--policy"),
            examples().join("policy.sql").as_os_str(),
            os("--listen"),
            os("127.0.0.1:0"),
            os("--jwt-secret"),
            os(SECRET),
            os("--synchronous"),
            os("normal"),
            os("--readers"),
            os("1"),
        ],
        &[],
    );
    let addr = server.addr.clone();
    assert_eq!(get(&addr, "/v1/health").0, 200);
    server.signal("INT");
    let mut server = server;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "still running after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    assert!(TcpStream::connect(&addr).is_err());
}

/// Runs `serve` expecting it not to start: the exit code and stderr.
fn refused(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tenantsync"));
    cmd.arg("serve").args(args).env_remove("TENANTSYNC_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn serve_refuses_an_invalid_policy_with_every_diagnostic() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("bad.sql");
    std::fs::write(
        &policy,
        "CREATE POLICY a ON nosuch FOR SELECT USING (true);\n\nCREATE POLICY b ON todos FOR SELECT USING (nocol = 1);\n",
    )
    .unwrap();
    let db = dir.path().join("server.db");
    let (code, stdout, stderr) = refused(
        &[
            os("--db"),
            db.as_os_str(),
            os("--schema"),
            examples().join("schema.sql").as_os_str(),
            os("--policy"),
            policy.as_os_str(),
            os("--listen"),
            os("127.0.0.1:0"),
        ],
        &[("TENANTSYNC_JWT_SECRET", SECRET)],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stdout, "");
    let name = policy.display().to_string();
    assert!(stderr.contains("the policy file is invalid"), "{stderr}");
    assert!(
        stderr.contains(&format!("{name}:1:20: unknown table `nosuch`")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{name}:3:44: unknown column `nocol`")),
        "{stderr}"
    );
}

#[test]
fn serve_refuses_a_bad_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let schema = examples().join("schema.sql");
    let policy = examples().join("policy.sql");
    let db = dir.path().join("server.db");
    let base = |extra: &[&'static str]| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec![
            "--db".into(),
            db.clone().into(),
            "--schema".into(),
            schema.clone().into(),
            "--policy".into(),
            policy.clone().into(),
        ];
        v.extend(extra.iter().map(|s| s.into()));
        v
    };
    let run = |args: Vec<std::ffi::OsString>, env: &[(&str, &str)]| {
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        refused(&refs, env)
    };

    let (code, stdout, stderr) = run(base(&[]), &[]);
    assert_eq!((code, stdout.as_str()), (Some(1), ""), "{stderr}");
    assert!(
        stderr.contains("the token key is not configured"),
        "{stderr}"
    );
    assert!(stderr.contains("TENANTSYNC_JWT_SECRET"), "{stderr}");

    let (code, _, stderr) = run(vec!["--jwt-secret".into(), SECRET.into()], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("give --db, TENANTSYNC_DB or `db`"),
        "{stderr}"
    );

    let (code, _, stderr) = run(
        base(&["--listen", "nowhere"]),
        &[("TENANTSYNC_JWT_SECRET", SECRET)],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("`listen`"), "{stderr}");

    let (code, _, stderr) = run(
        base(&[]),
        &[
            ("TENANTSYNC_JWT_SECRET", SECRET),
            ("TENANTSYNC_READERS", "many"),
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("TENANTSYNC_READERS=\"many\""), "{stderr}");

    let (code, _, stderr) = run(base(&["--jwt-alg", "hs512"]), &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("unknown JWT algorithm `hs512`"), "{stderr}");

    // An address already taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut args = base(&["--listen"]);
    args.push(addr.clone().into());
    let (code, stdout, stderr) = run(args, &[("TENANTSYNC_JWT_SECRET", SECRET)]);
    assert_eq!((code, stdout.as_str()), (Some(1), ""), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}

/// `--log-format json` writes JSON lines; the default text has no colour
/// codes when stderr is not a terminal. Starts with a key set (`--jwks`,
/// `--jwt-issuer`, `--jwt-audience`): the log names it.
#[test]
fn serve_logs_json_lines_or_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k1", "x": "ERERERERERERERERERERERERERERERERERERERERERE"}]}"#,
    )
    .unwrap();
    let base = |db: &std::path::Path| -> Vec<std::ffi::OsString> {
        [
            os("--db"),
            db.as_os_str(),
            os("--schema"),
            examples().join("schema.sql").as_os_str(),
            os("--policy"),
            examples().join("policy.sql").as_os_str(),
            os("--listen"),
            os("127.0.0.1:0"),
            os("--synchronous"),
            os("normal"),
            os("--readers"),
            os("1"),
        ]
        .iter()
        .map(|s| s.to_os_string())
        .collect()
    };
    let mut args = base(&dir.path().join("a.db"));
    for a in [
        os("--log-format"),
        os("json"),
        os("--jwks"),
        jwks.as_os_str(),
        os("--jwt-issuer"),
        os("https://idp.example.test/"),
        os("--jwt-audience"),
        os("tenantsync"),
    ] {
        args.push(a.to_os_string());
    }
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let mut server = Server::start(&refs, &[]);
    let line = server.wait_for("serving");
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
    assert_eq!(v["level"], "INFO", "{line}");
    assert_eq!(v["fields"]["message"], "serving", "{line}");
    assert!(
        v["fields"]["keys"]
            .as_str()
            .unwrap_or("")
            .starts_with("jwks "),
        "{line}"
    );
    assert_eq!(get(&server.addr, "/v1/health/ready").0, 200);
    let (code, _) = server.terminate();
    assert_eq!(code, Some(0));

    let mut args = base(&dir.path().join("b.db"));
    args.push("--jwt-secret".into());
    args.push(SECRET.into());
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let mut server = Server::start(&refs, &[]);
    let line = server.wait_for("serving");
    assert!(!line.contains('\u{1b}'), "colour codes in a pipe: {line:?}");
    let (code, _) = server.terminate();
    assert_eq!(code, Some(0));
}

/// SIGHUP re-reads the schema file first: appended statements are a schema
/// change (a new version), an unsafe one is refused and logged, and the
/// server goes on (docs/CLI.md, "serve").
#[test]
fn sighup_applies_what_the_schema_file_adds() {
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("schema.sql");
    std::fs::copy(examples().join("schema.sql"), &schema).unwrap();
    let db = dir.path().join("server.db");
    let mut server = Server::start(
        &[
            os("--db"),
            db.as_os_str(),
            os("--schema"),
            schema.as_os_str(),
            os("--policy"),
            examples().join("policy.sql").as_os_str(),
            os("--listen"),
            os("127.0.0.1:0"),
            os("--jwt-secret"),
            os(SECRET),
        ],
        &[],
    );
    let service = service_token();
    let version = |addr: &str| -> serde_json::Value {
        let (status, body) = get_as(addr, "/v1/schema", Some(&service));
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["schema_version"].clone()
    };
    assert_eq!(version(&server.addr), 1);
    let mut text = std::fs::read_to_string(&schema).unwrap();
    text.push_str("\nALTER TABLE todos ADD COLUMN due TEXT;\n");
    std::fs::write(&schema, &text).unwrap();
    server.signal("HUP");
    server.wait_for("schema changed");
    server.wait_for("policies reloaded");
    assert_eq!(version(&server.addr), 2);
    // The same file again changes nothing.
    server.signal("HUP");
    server.wait_for("policies reloaded");
    assert_eq!(version(&server.addr), 2);
    // A destructive statement: refused whole, logged, the schema stays.
    text.push_str("ALTER TABLE todos DROP COLUMN title;\n");
    std::fs::write(&schema, &text).unwrap();
    server.signal("HUP");
    server.wait_for("schema reload refused");
    assert_eq!(version(&server.addr), 2);
    assert_eq!(get(&server.addr, "/v1/health/ready").0, 200);
    let (code, rest) = server.terminate();
    assert_eq!(code, Some(0), "{rest:#?}");
}
