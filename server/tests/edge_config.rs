//! The server configuration: layers (flags > environment > file >
//! defaults), the example file, and validation into settings.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tenantsync_server::Synchronous;
use tenantsync_server::auth::{JwtAlg, JwtKey};
use tenantsync_server::config::{self, Config, ConfigError};
use tenantsync_server::jwks::JwksSource;

/// A directory with a schema, a policy and (optionally) a config file.
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("schema.sql"),
            "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL);",
        )
        .unwrap();
        std::fs::write(dir.path().join("policy.sql"), "-- none\n").unwrap();
        Dir { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn file(&self, toml: &str) -> Config {
        let p = self.path("tenantsync.toml");
        std::fs::write(&p, toml).unwrap();
        Config::from_file(&p).unwrap()
    }

    /// A layer with everything required, paths absolute.
    fn complete(&self) -> Config {
        Config {
            db: Some(self.path("server.db")),
            schema: Some(self.path("schema.sql")),
            policy: Some(self.path("policy.sql")),
            jwt: config::JwtConfig {
                secret: Some("0123456789abcdef".into()),
                ..Default::default()
            },
            ..Config::default()
        }
    }
}

fn env(vars: &[(&str, &str)]) -> Config {
    let (config, unknown) = Config::from_env(vars.iter().copied()).unwrap();
    assert_eq!(unknown, Vec::<String>::new());
    config
}

fn flags(f: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config::default();
    f(&mut c);
    c
}

#[test]
fn flags_win_over_env_over_file_over_defaults() {
    let d = Dir::new();
    let file = d.file(
        r#"
listen = "127.0.0.1:1001"
readers = 3
[limits]
max_message_bytes = 2048
[websocket]
idle_timeout_secs = 90
"#,
    );
    let env = env(&[
        ("TENANTSYNC_LISTEN", "127.0.0.1:1002"),
        ("TENANTSYNC_LIMITS_MAX_MESSAGE_BYTES", "4096"),
        ("PATH", "/usr/bin"),
    ]);
    let flag = flags(|c| c.listen = Some("127.0.0.1:1003".into()));

    let check = |layers: Vec<Config>, listen: &str, readers: usize, max: usize| {
        let merged = layers
            .into_iter()
            .fold(Config::default(), Config::overlay)
            .overlay(d.complete());
        let s = merged.resolve().unwrap();
        assert_eq!(s.listen.to_string(), listen);
        assert_eq!(s.service.readers, readers);
        assert_eq!(s.service.limits.max_message_bytes, max);
        assert_eq!(s.edge.max_message_bytes, max);
    };
    check(
        vec![file.clone(), env.clone(), flag],
        "127.0.0.1:1003",
        3,
        4096,
    );
    check(vec![file.clone(), env], "127.0.0.1:1002", 3, 4096);
    check(vec![file.clone()], "127.0.0.1:1001", 3, 2048);
    check(vec![], config::DEFAULT_LISTEN, 2, 4 * 1024 * 1024);

    // Keys of a section merge one by one.
    let s = file
        .overlay(env_layer(&[(
            "TENANTSYNC_WEBSOCKET_PING_INTERVAL_SECS",
            "30",
        )]))
        .overlay(d.complete())
        .resolve()
        .unwrap();
    assert_eq!(s.edge.idle_timeout, Duration::from_secs(90));
    assert_eq!(s.edge.ping_interval, Duration::from_secs(30));
}

fn env_layer(vars: &[(&str, &str)]) -> Config {
    env(vars)
}

#[test]
fn the_token_key_comes_whole_from_one_layer() {
    let d = Dir::new();
    let pem = d.path("key.pem");
    std::fs::write(&pem, ED25519_PUBLIC_PEM).unwrap();
    let file = d.file("[jwt]\nsecret = \"a secret from the file\"\n");
    let flag = flags(|c| {
        c.jwt.public_key = Some(pem.clone());
        c.jwt.alg = Some(JwtAlg::Eddsa);
    });
    let mut base = d.complete();
    base.jwt = Default::default();
    let s = base
        .clone()
        .overlay(file.clone())
        .overlay(flag)
        .resolve()
        .unwrap();
    match s.jwt.key {
        JwtKey::PublicPem { alg, pem } => {
            assert_eq!(alg, JwtAlg::Eddsa);
            assert_eq!(pem, ED25519_PUBLIC_PEM.as_bytes());
        }
        other => panic!("{other:?}"),
    }
    let s = base
        .overlay(file)
        .overlay(env(&[("TENANTSYNC_JWT_LEEWAY_SECS", "5")]))
        .resolve()
        .unwrap();
    assert!(matches!(s.jwt.key, JwtKey::Secret(ref k) if k == b"a secret from the file"));
    assert_eq!(s.jwt.leeway_secs, 5);
}

#[test]
fn a_key_set_replaces_a_secret_and_a_relative_one_is_the_files() {
    let d = Dir::new();
    let file = d.file(
        "[jwt]\njwks = \"keys/jwks.json\"\njwks_refresh_secs = 60\nissuer = \"https://idp.example.test/\"\n",
    );
    let mut base = d.complete();
    base.jwt = Default::default();
    let s = base
        .clone()
        .overlay(d.file("[jwt]\nsecret = \"a secret from another layer\"\n"))
        .overlay(file)
        .resolve()
        .unwrap();
    match &s.jwt.key {
        JwtKey::Jwks { source, refresh } => {
            assert_eq!(source, &JwksSource::File(d.path("keys/jwks.json")));
            assert_eq!(*refresh, Duration::from_secs(60));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.jwt.issuer.as_deref(), Some("https://idp.example.test/"));
    // A URL is a URL, whatever layer it comes from.
    let s = base
        .overlay(env(&[(
            "TENANTSYNC_JWT_JWKS",
            "https://idp.example.test/.well-known/jwks.json",
        )]))
        .resolve()
        .unwrap();
    assert!(matches!(
        &s.jwt.key,
        JwtKey::Jwks { source: JwksSource::Url(u), .. } if u == "https://idp.example.test/.well-known/jwks.json"
    ));
}

#[test]
fn relative_paths_in_the_file_are_relative_to_it() {
    let d = Dir::new();
    let c =
        d.file("db = \"data/server.db\"\nschema = \"schema.sql\"\npolicy = \"/abs/policy.sql\"\n");
    assert_eq!(c.db, Some(d.path("data/server.db")));
    assert_eq!(c.schema, Some(d.path("schema.sql")));
    assert_eq!(c.policy, Some(PathBuf::from("/abs/policy.sql")));
    // In the environment and on the command line, paths stay as given.
    assert_eq!(
        env(&[("TENANTSYNC_DB", "rel.db")]).db,
        Some(PathBuf::from("rel.db"))
    );
}

#[track_caller]
fn check_file_error(toml: &str, expected: &[&str]) {
    let d = Dir::new();
    let p = d.path("bad.toml");
    std::fs::write(&p, toml).unwrap();
    let e = Config::from_file(&p).unwrap_err().to_string();
    assert!(e.contains("bad.toml"), "{e}");
    for x in expected {
        assert!(e.contains(x), "{e:?} should contain {x:?}");
    }
}

#[test]
fn bad_files_say_where_and_what() {
    check_file_error("lisen = \"x\"\n", &["unknown field `lisen`", "line 1"]);
    check_file_error(
        "[limits]\nmax_mesage_bytes = 1\n",
        &["unknown field `max_mesage_bytes`", "line 2"],
    );
    check_file_error("readers = \"two\"\n", &["invalid type", "readers"]);
    check_file_error("synchronous = \"off\"\n", &["unknown variant `off`"]);
    check_file_error("[jwt]\nalg = \"hs512\"\n", &["unknown variant `hs512`"]);
    check_file_error("db = \n", &["line 1"]);
    let e = Config::from_file(Path::new("/nonexistent/x.toml")).unwrap_err();
    assert!(
        e.to_string()
            .contains("cannot read the config file /nonexistent/x.toml"),
        "{e}"
    );
}

#[test]
fn environment_variables() {
    let (c, unknown) = Config::from_env([
        ("TENANTSYNC_READERS", "4"),
        ("TENANTSYNC_SYNCHRONOUS", "normal"),
        ("TENANTSYNC_JWT_ALG", "rs256"),
        ("TENANTSYNC_LIMITS_PUSH_RATE_PER_TENANT", "12.5"),
        ("TENANTSYNC_JWT_SECRET", "12345678901234567890"),
        ("TENANTSYNC_JWT_SECERT", "typo"),
        ("TENANTSYNC_CONFIG", "/etc/tenantsync.toml"),
        ("TENANTSYNC_LOG", "debug"),
        ("HOME", "/root"),
    ])
    .unwrap();
    assert_eq!(unknown, vec!["TENANTSYNC_JWT_SECERT".to_owned()]);
    assert_eq!(c.readers, Some(4));
    assert_eq!(c.synchronous, Some(Synchronous::Normal));
    assert_eq!(c.jwt.alg, Some(JwtAlg::Rs256));
    assert_eq!(c.limits.push_rate_per_tenant, Some(12.5));
    // A numeric-looking secret stays text.
    assert_eq!(c.jwt.secret.as_deref(), Some("12345678901234567890"));

    let e = Config::from_env([("TENANTSYNC_READERS", "two")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("TENANTSYNC_READERS=\"two\": expected a whole number"),
        "{e}"
    );
    let e = Config::from_env([("TENANTSYNC_JWT_ALG", "hs512")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown variant `hs512`"), "{e}");
}

#[test]
fn key_names_map_to_variables() {
    assert_eq!(config::env_var("jwt.secret"), "TENANTSYNC_JWT_SECRET");
    assert_eq!(
        config::env_var("limits.max_message_bytes"),
        "TENANTSYNC_LIMITS_MAX_MESSAGE_BYTES"
    );
    assert_eq!(config::env_var("db"), "TENANTSYNC_DB");
}

fn flatten(prefix: &str, t: &toml::Table, out: &mut BTreeSet<String>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(sub) => flatten(&key, sub, out),
            _ => {
                out.insert(key);
            }
        }
    }
}

fn keys_of(c: &Config) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    match toml::Value::try_from(c).unwrap() {
        toml::Value::Table(t) => flatten("", &t, &mut out),
        _ => unreachable!(),
    }
    out
}

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.example.toml")
}

#[test]
fn the_example_file_documents_every_key() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    // As shipped it parses.
    Config::from_toml(&text).unwrap();
    // With its commented-out keys enabled it sets every key there is.
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let all = Config::from_toml(&uncommented).unwrap();
    // `[shard_overrides]` is keyed by tenant names: documented as a table
    // with an example entry, set in the file only (no variable).
    let (overrides, documented): (BTreeSet<String>, BTreeSet<String>) = keys_of(&all)
        .into_iter()
        .partition(|k| k.starts_with("shard_overrides."));
    assert!(!overrides.is_empty(), "[shard_overrides] has an example");
    let known: BTreeSet<String> = config::keys().map(str::to_owned).collect();
    assert_eq!(documented, known);
}

#[test]
fn every_key_has_an_environment_variable() {
    let vars: Vec<(String, String)> = config::keys()
        .map(|k| {
            let v = match k {
                "jwt.alg" => "eddsa",
                "synchronous" => "normal",
                "log_format" => "json",
                _ => "7",
            };
            (config::env_var(k), v.to_owned())
        })
        .collect();
    let (c, unknown) = Config::from_env(vars).unwrap();
    assert!(unknown.is_empty(), "{unknown:?}");
    assert_eq!(keys_of(&c), config::keys().map(str::to_owned).collect());
}

#[test]
fn the_defaults() {
    let d = Dir::new();
    let s = d.complete().resolve().unwrap();
    assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(s.service.tenant_claim, "tenant_id");
    assert_eq!(s.jwt.tenant_claim, "tenant_id");
    assert_eq!(s.service.readers, 2);
    assert_eq!(s.service.synchronous, Synchronous::Full);
    assert_eq!(s.service.limits, tenantsync_server::Limits::default());
    assert_eq!(s.edge.idle_timeout, Duration::from_secs(60));
    assert_eq!(s.edge.hello_timeout, Duration::from_secs(10));
    assert_eq!(s.edge.ping_interval, Duration::from_secs(20));
    assert_eq!(s.edge.shutdown_timeout, Duration::from_secs(10));
    assert_eq!(s.jwt.leeway_secs, 0);
    assert_eq!(
        s.service.schema_sql,
        "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL);"
    );
    assert_eq!(s.service.policy_sql, "-- none\n");
    assert_eq!(s.policy_path, d.path("policy.sql"));
    assert_eq!(
        s.service.policy_name,
        d.path("policy.sql").display().to_string()
    );
}

#[test]
fn the_example_file_resolves() {
    // Its paths are relative to the repository root, where it lives.
    let c = Config::from_file(&example_path()).unwrap();
    let s = c.resolve().unwrap();
    assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(s.service.limits, tenantsync_server::Limits::default());
    assert!(s.service.schema_sql.contains("CREATE TABLE"));
}

#[track_caller]
fn check_invalid(f: impl FnOnce(&mut Config, &Dir), expected: &[&str]) {
    let d = Dir::new();
    let mut c = d.complete();
    f(&mut c, &d);
    let e = match c.resolve() {
        Ok(_) => panic!("expected an error with {expected:?}"),
        Err(e) => e.to_string(),
    };
    for x in expected {
        assert!(e.contains(x), "{e:?} should contain {x:?}");
    }
}

#[test]
fn invalid_configurations_name_the_key() {
    check_invalid(
        |c, _| c.db = None,
        &[
            "the server database is not configured",
            "--db",
            "TENANTSYNC_DB",
            "`db`",
        ],
    );
    check_invalid(|c, _| c.schema = None, &["--schema", "TENANTSYNC_SCHEMA"]);
    check_invalid(|c, _| c.policy = None, &["--policy", "TENANTSYNC_POLICY"]);
    check_invalid(
        |c, _| c.jwt = Default::default(),
        &[
            "the token key is not configured",
            "--jwt-secret",
            "TENANTSYNC_JWT_SECRET",
        ],
    );
    check_invalid(
        |c, _| c.listen = Some("localhost".into()),
        &["`listen`", "not an `ip:port`"],
    );
    check_invalid(|c, _| c.readers = Some(0), &["`readers`"]);
    check_invalid(
        |c, _| c.tenant_claim = Some(String::new()),
        &["`tenant_claim`"],
    );
    check_invalid(
        |c, _| c.jwt.secret = Some("short".into()),
        &["`jwt.secret`", "at least 16 bytes"],
    );
    check_invalid(
        |c, _| c.jwt.alg = Some(JwtAlg::Rs256),
        &["`jwt.alg`", "rs256 verifies with jwt.public_key"],
    );
    check_invalid(
        |c, d| c.jwt.public_key = Some(d.path("key.pem")),
        &["give one of jwt.secret (hs256), jwt.public_key"],
    );
    check_invalid(
        |c, d| {
            c.jwt.secret = None;
            c.jwt.public_key = Some(d.path("key.pem"));
        },
        &["`jwt.alg`", "give rs256, es256 or eddsa"],
    );
    check_invalid(
        |c, _| c.jwt.jwks = Some("https://idp.example.test/jwks.json".into()),
        &["give one of jwt.secret (hs256), jwt.public_key", "jwt.jwks"],
    );
    check_invalid(
        |c, _| {
            c.jwt.secret = None;
            c.jwt.alg = Some(JwtAlg::Rs256);
            c.jwt.jwks = Some("https://idp.example.test/jwks.json".into());
        },
        &["`jwt.alg`", "a key set's keys fix their algorithms"],
    );
    check_invalid(
        |c, _| {
            c.jwt.secret = None;
            c.jwt.jwks = Some("jwks.json".into());
            c.jwt.jwks_refresh_secs = Some(0);
        },
        &["`jwt.jwks_refresh_secs`", "at least 1"],
    );
    check_invalid(
        |c, d| {
            c.jwt.secret = None;
            c.jwt.alg = Some(JwtAlg::Rs256);
            c.jwt.public_key = Some(d.path("missing.pem"));
        },
        &["cannot read the JWT public key", "missing.pem"],
    );
    check_invalid(
        |c, d| {
            std::fs::write(d.path("key.pem"), ED25519_PUBLIC_PEM).unwrap();
            c.jwt.secret = None;
            c.jwt.alg = Some(JwtAlg::Rs256);
            c.jwt.public_key = Some(d.path("key.pem"));
        },
        &[
            "`jwt.public_key`",
            "key.pem",
            "not a valid rs256 PEM public key",
        ],
    );
    check_invalid(
        |c, d| c.schema = Some(d.path("nope.sql")),
        &["cannot read the schema script", "nope.sql"],
    );
    check_invalid(
        |c, _| c.limits.max_message_bytes = Some(10),
        &["`limits.max_message_bytes`"],
    );
    check_invalid(
        |c, _| c.limits.max_pull_bytes = Some(2048),
        &[
            "`limits.max_pull_bytes`",
            "at least limits.max_message_bytes",
        ],
    );
    check_invalid(
        |c, _| c.limits.outbox_items = Some(0),
        &["`limits.outbox_items`"],
    );
    check_invalid(
        |c, _| c.limits.push_rate_per_tenant = Some(f64::NAN),
        &["`limits.push_rate_per_tenant`"],
    );
    check_invalid(
        |c, _| c.limits.max_wait_ms = Some(1_000_000),
        &["`limits.max_wait_ms`"],
    );
    check_invalid(
        |c, _| c.websocket.ping_interval_secs = Some(60),
        &[
            "`websocket.ping_interval_secs`",
            "shorter than websocket.idle_timeout_secs",
        ],
    );
    check_invalid(
        |c, _| c.websocket.hello_timeout_secs = Some(0),
        &["`websocket.hello_timeout_secs`"],
    );
    assert!(matches!(
        Dir::new()
            .complete()
            .overlay(flags(|c| c.readers = Some(0)))
            .resolve(),
        Err(ConfigError::Invalid { key: "readers", .. })
    ));
}

/// The public half of a test-only Ed25519 key.
const ED25519_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAUNIMa53S6/qy4Rrh9S5vdh7BMBuS2+oeI1f4xP51s5E=
-----END PUBLIC KEY-----
";
