//! `tenantsync token`: mints an HS256 JWT for trying a server from a shell
//! and for tests (contract: docs/CLI.md, "tenantsync token"). Not an
//! identity provider: real deployments get tokens from theirs.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// Arguments of `tenantsync token`.
#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    /// The HS256 secret the server was started with (`--jwt-secret`).
    #[arg(
        long,
        value_name = "SECRET",
        env = "TENANTSYNC_JWT_SECRET",
        hide_env_values = true
    )]
    pub secret: String,
    /// The subject (`sub`, `auth.uid()` in policies).
    #[arg(long, value_name = "USER")]
    pub sub: String,
    /// The role (`role`, matched by `TO <role>` in policies; `service`
    /// bypasses row-level security).
    #[arg(long, value_name = "ROLE", default_value = "authenticated")]
    pub role: String,
    /// Another claim: `name=text` (a string) or `name:=json` (any JSON
    /// value, e.g. `level:=3`). Repeatable.
    #[arg(long = "claim", value_name = "NAME=VALUE")]
    pub claims: Vec<String>,
    /// Lifetime: seconds, or a number with s, m, h or d (`90s`, `15m`, `1h`,
    /// `7d`).
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    pub ttl: String,
}

/// Runs the command; returns the exit code.
pub fn run(args: &TokenArgs, out: &mut impl Write, err: &mut impl Write) -> u8 {
    match mint(args, SystemTime::now()) {
        Ok(token) => {
            let _ = writeln!(out, "{token}");
            0
        }
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            2
        }
    }
}

/// The token for `args` issued at `now`.
pub fn mint(args: &TokenArgs, now: SystemTime) -> Result<String, String> {
    if args.sub.is_empty() {
        return Err("--sub must not be empty".into());
    }
    let ttl = parse_ttl(&args.ttl)?;
    let iat = now
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let mut claims = Map::new();
    claims.insert("sub".into(), Value::String(args.sub.clone()));
    claims.insert("role".into(), Value::String(args.role.clone()));
    claims.insert("iat".into(), Value::from(iat));
    claims.insert("exp".into(), Value::from(iat + ttl.as_secs()));
    for c in &args.claims {
        let (name, value) = if let Some((n, json)) = c.split_once(":=") {
            let v: Value = serde_json::from_str(json)
                .map_err(|e| format!("--claim {c}: the value after := is not JSON: {e}"))?;
            (n, v)
        } else if let Some((n, text)) = c.split_once('=') {
            (n, Value::String(text.to_owned()))
        } else {
            return Err(format!("--claim {c}: expected NAME=VALUE or NAME:=JSON"));
        };
        if name.is_empty() {
            return Err(format!("--claim {c}: the claim name is empty"));
        }
        if matches!(name, "sub" | "role" | "exp" | "iat") {
            return Err(format!(
                "--claim {c}: set {name} with its own option (--sub, --role, --ttl)"
            ));
        }
        claims.insert(name.to_owned(), value);
    }
    tenantsync_server::auth::mint_hs256(args.secret.as_bytes(), &claims)
        .map_err(|e| format!("cannot sign the token: {e}"))
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("--ttl {s:?}: expected a number of seconds, or 90s, 15m, 1h, 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("--ttl {s:?}: the unit is s, m, h or d")),
    };
    if secs == 0 {
        return Err("--ttl must be more than 0 seconds".into());
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(claims: &[&str], ttl: &str) -> TokenArgs {
        TokenArgs {
            secret: "s3cret".into(),
            sub: "u1".into(),
            role: "authenticated".into(),
            claims: claims.iter().map(|s| s.to_string()).collect(),
            ttl: ttl.into(),
        }
    }

    fn decode(token: &str) -> Map<String, Value> {
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.validate_exp = false;
        v.required_spec_claims.clear();
        jsonwebtoken::decode::<Map<String, Value>>(
            token,
            &jsonwebtoken::DecodingKey::from_secret(b"s3cret"),
            &v,
        )
        .unwrap()
        .claims
    }

    #[test]
    fn a_token_carries_the_claims_and_expires_after_the_ttl() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t = mint(
            &args(&["tenant_id=acme", "level:=3", "note=a=b"], "1h"),
            now,
        )
        .unwrap();
        let c = decode(&t);
        assert_eq!(c["sub"], "u1");
        assert_eq!(c["role"], "authenticated");
        assert_eq!(c["tenant_id"], "acme");
        assert_eq!(c["level"], 3);
        assert_eq!(c["note"], "a=b");
        assert_eq!(c["iat"], 1_000_000);
        assert_eq!(c["exp"], 1_003_600);
        let header = jsonwebtoken::decode_header(&t).unwrap();
        assert_eq!(header.alg, jsonwebtoken::Algorithm::HS256);
    }

    #[track_caller]
    fn check_err(claims: &[&str], ttl: &str, expected: &str) {
        let e = mint(&args(claims, ttl), SystemTime::now()).unwrap_err();
        assert!(e.contains(expected), "{e}");
    }

    #[test]
    fn bad_options_say_what_is_wrong() {
        check_err(&["tenant_id"], "1h", "expected NAME=VALUE");
        check_err(&["x:=nope"], "1h", "not JSON");
        check_err(&["exp=1"], "1h", "its own option");
        check_err(&[], "1w", "the unit is s, m, h or d");
        check_err(&[], "soon", "expected a number");
        check_err(&[], "0", "more than 0");
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(604_800));
    }
}
