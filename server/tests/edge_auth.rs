//! Bearer JWT verification (docs/PROTOCOL.md §3): which tokens the server
//! accepts, and what it answers for the others.

mod edge_common;

use edge_common::tokens::{self, claims, keys};
use serde_json::json;
use tenantsync_protocol::ErrorCode;
use tenantsync_server::auth::{Authenticator, JwtAlg, JwtKey, JwtSettings, KeyError, bearer_token};

const SECRET: &str = "a test secret that is long enough";

fn settings(key: JwtKey) -> JwtSettings {
    JwtSettings {
        key,
        leeway_secs: 0,
        audience: None,
        issuer: None,
        tenant_claim: "tenant_id".into(),
    }
}

fn hs256_server() -> Authenticator {
    Authenticator::new(&settings(JwtKey::Secret(SECRET.as_bytes().to_vec()))).unwrap()
}

fn rs256_server() -> Authenticator {
    Authenticator::new(&settings(JwtKey::PublicPem {
        alg: JwtAlg::Rs256,
        pem: keys().rsa_public_pem.clone().into_bytes(),
    }))
    .unwrap()
}

fn es256_server() -> Authenticator {
    Authenticator::new(&settings(JwtKey::PublicPem {
        alg: JwtAlg::Es256,
        pem: keys().ec_public_pem.clone().into_bytes(),
    }))
    .unwrap()
}

fn eddsa_server() -> Authenticator {
    Authenticator::new(&settings(JwtKey::PublicPem {
        alg: JwtAlg::Eddsa,
        pem: keys().ed_public_pem.clone().into_bytes(),
    }))
    .unwrap()
}

/// What verifying a token gives: the subject and tenant, or the error code
/// and a part of its message.
#[derive(Debug, PartialEq)]
enum Expect {
    Ok {
        sub: &'static str,
        tenant: &'static str,
    },
    Err(ErrorCode, &'static str),
}

#[track_caller]
fn check(server: &Authenticator, token: &str, expected: Expect) {
    let got = server.verify(token);
    match (&got, &expected) {
        (Ok(p), Expect::Ok { sub, tenant }) => {
            assert_eq!(p.subject, *sub);
            assert_eq!(p.tenant.as_deref(), Some(*tenant));
        }
        (Err(e), Expect::Err(code, message)) => {
            assert_eq!(e.code, *code, "{e}");
            assert!(
                e.message.contains(message),
                "message {:?} should contain {message:?}",
                e.message
            );
        }
        _ => panic!("token {token:?}: expected {expected:?}, got {got:?}"),
    }
}

fn ok() -> Expect {
    Expect::Ok {
        sub: "u1",
        tenant: "acme",
    }
}

#[test]
fn valid_tokens_of_each_algorithm() {
    let c = claims("u1", "acme", 300);
    check(&hs256_server(), &tokens::hs256(SECRET, &c), ok());
    check(&rs256_server(), &tokens::rs256(&c), ok());
    check(&es256_server(), &tokens::es256(&c), ok());
    check(&eddsa_server(), &tokens::eddsa(&c), ok());
}

#[test]
fn the_principal_carries_the_claims() {
    let mut c = claims("u1", "acme", 300);
    c.insert("team".into(), json!(42));
    let p = hs256_server().verify(&tokens::hs256(SECRET, &c)).unwrap();
    assert!(!p.service);
    assert!(p.expires_at.is_some());
    let p = hs256_server()
        .verify(&tokens::hs256(SECRET, &tokens::service_claims(300)))
        .unwrap();
    assert!(p.service);
}

#[test]
fn expiry_and_not_before() {
    let server = hs256_server();
    check(
        &server,
        &tokens::hs256(SECRET, &claims("u1", "acme", -10)),
        Expect::Err(ErrorCode::TokenExpired, "expired"),
    );
    let mut c = claims("u1", "acme", 300);
    c.insert("nbf".into(), json!(tokens::now() + 120));
    check(
        &server,
        &tokens::hs256(SECRET, &c),
        Expect::Err(ErrorCode::TokenNotYetValid, "`nbf`"),
    );
    c.insert("nbf".into(), json!(tokens::now() - 5));
    check(&server, &tokens::hs256(SECRET, &c), ok());
}

#[test]
fn leeway_tolerates_clock_skew() {
    let mut s = settings(JwtKey::Secret(SECRET.as_bytes().to_vec()));
    s.leeway_secs = 30;
    let server = Authenticator::new(&s).unwrap();
    check(
        &server,
        &tokens::hs256(SECRET, &claims("u1", "acme", -10)),
        ok(),
    );
    check(
        &server,
        &tokens::hs256(SECRET, &claims("u1", "acme", -60)),
        Expect::Err(ErrorCode::TokenExpired, "expired"),
    );
}

#[test]
fn required_claims() {
    let server = hs256_server();
    let mut c = claims("u1", "acme", 300);
    c.remove("exp");
    check(
        &server,
        &tokens::hs256(SECRET, &c),
        Expect::Err(ErrorCode::Unauthorized, "`exp`"),
    );
    let mut c = claims("u1", "acme", 300);
    c.insert("exp".into(), json!("tomorrow"));
    check(
        &server,
        &tokens::hs256(SECRET, &c),
        Expect::Err(ErrorCode::Unauthorized, "`exp`"),
    );
    let mut c = claims("u1", "acme", 300);
    c.remove("sub");
    check(
        &server,
        &tokens::hs256(SECRET, &c),
        Expect::Err(ErrorCode::Unauthorized, "`sub`"),
    );
    for bad_sub in [json!(""), json!(7), json!(null)] {
        let mut c = claims("u1", "acme", 300);
        c.insert("sub".into(), bad_sub);
        check(
            &server,
            &tokens::hs256(SECRET, &c),
            Expect::Err(ErrorCode::Unauthorized, "`sub`"),
        );
    }
    // Without a role no `TO authenticated` policy would match: every sync
    // would be silently empty, so the token is refused and the message
    // names the claim.
    for bad_role in [None, Some(json!("")), Some(json!(1)), Some(json!(null))] {
        let mut c = claims("u1", "acme", 300);
        match bad_role {
            None => c.remove("role"),
            Some(v) => c.insert("role".into(), v),
        };
        check(
            &server,
            &tokens::hs256(SECRET, &c),
            Expect::Err(ErrorCode::Unauthorized, "`role`"),
        );
    }
}

#[test]
fn unsigned_and_foreign_algorithms_are_refused() {
    let c = claims("u1", "acme", 300);
    for server in [
        hs256_server(),
        rs256_server(),
        es256_server(),
        eddsa_server(),
    ] {
        for alg in ["none", "None", "NONE"] {
            check(
                &server,
                &tokens::unsigned(json!({"alg": alg, "typ": "JWT"}), &c),
                Expect::Err(ErrorCode::Unauthorized, "malformed token"),
            );
        }
    }
    // Each server accepts its own algorithm only.
    check(
        &hs256_server(),
        &tokens::rs256(&c),
        Expect::Err(ErrorCode::Unauthorized, "not signed with hs256"),
    );
    check(
        &rs256_server(),
        &tokens::eddsa(&c),
        Expect::Err(ErrorCode::Unauthorized, "not signed with rs256"),
    );
    check(
        &eddsa_server(),
        &tokens::rs256(&c),
        Expect::Err(ErrorCode::Unauthorized, "not signed with eddsa"),
    );
    check(
        &es256_server(),
        &tokens::eddsa(&c),
        Expect::Err(ErrorCode::Unauthorized, "not signed with es256"),
    );
    check(
        &rs256_server(),
        &tokens::es256(&c),
        Expect::Err(ErrorCode::Unauthorized, "not signed with rs256"),
    );
}

#[test]
fn an_hs256_token_keyed_with_the_public_key_is_refused() {
    // The classic confusion attack: sign HS256 with the server's RSA public
    // key as the secret.
    let c = claims("u1", "acme", 300);
    let forged = tokens::hs256(&keys().rsa_public_pem, &c);
    check(
        &rs256_server(),
        &forged,
        Expect::Err(ErrorCode::Unauthorized, "not signed with rs256"),
    );
    let forged = tokens::hs256(&keys().ed_public_pem, &c);
    check(
        &eddsa_server(),
        &forged,
        Expect::Err(ErrorCode::Unauthorized, "not signed with eddsa"),
    );
}

#[test]
fn bad_signatures_are_refused() {
    let c = claims("u1", "acme", 300);
    check(
        &hs256_server(),
        &tokens::hs256("another secret", &c),
        Expect::Err(ErrorCode::Unauthorized, "signature"),
    );
    // A signed token whose claims were changed afterwards.
    let forged_claims = claims("admin", "other", 300);
    for (server, token) in [
        (hs256_server(), tokens::hs256(SECRET, &c)),
        (rs256_server(), tokens::rs256(&c)),
        (eddsa_server(), tokens::eddsa(&c)),
    ] {
        check(
            &server,
            &tokens::with_claims(&token, &forged_claims),
            Expect::Err(ErrorCode::Unauthorized, "signature"),
        );
    }
}

#[test]
fn garbage_is_refused() {
    let server = hs256_server();
    for (garbage, expected) in [
        ("", "malformed token"),
        ("garbage", "malformed token"),
        ("a.b", "malformed token"),
        ("a.b.c", "malformed token"),
        ("a.b.c.d", "malformed token"),
        ("....", "malformed token"),
        ("éé.éé.éé", "malformed token"),
        // A well-formed header: the signature is checked before the claims.
        ("eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln", "signature"),
    ] {
        check(
            &server,
            garbage,
            Expect::Err(ErrorCode::Unauthorized, expected),
        );
    }
}

#[test]
fn audience_and_issuer_when_configured() {
    let mut s = settings(JwtKey::Secret(SECRET.as_bytes().to_vec()));
    s.audience = Some("tenantsync".into());
    s.issuer = Some("https://idp.example".into());
    let server = Authenticator::new(&s).unwrap();
    let mut c = claims("u1", "acme", 300);
    c.insert("iss".into(), json!("https://idp.example"));
    check(
        &server,
        &tokens::hs256(SECRET, &c),
        Expect::Err(ErrorCode::Unauthorized, "`aud`"),
    );
    c.insert("aud".into(), json!("tenantsync"));
    c.remove("iss");
    check(
        &server,
        &tokens::hs256(SECRET, &c),
        Expect::Err(ErrorCode::Unauthorized, "`iss`"),
    );
    c.insert("iss".into(), json!("https://other.example"));
    check(
        &server,
        &tokens::hs256(SECRET, &c),
        Expect::Err(ErrorCode::Unauthorized, "`iss`"),
    );
    c.insert("iss".into(), json!("https://idp.example"));
    check(&server, &tokens::hs256(SECRET, &c), ok());
    c.insert("aud".into(), json!(["other"]));
    check(
        &server,
        &tokens::hs256(SECRET, &c),
        Expect::Err(ErrorCode::Unauthorized, "`aud`"),
    );
    // Without a configured audience a token's `aud` is not checked.
    check(&hs256_server(), &tokens::hs256(SECRET, &c), ok());
}

#[tokio::test]
async fn authorization_headers() {
    assert_eq!(bearer_token("Bearer abc"), Some("abc"));
    assert_eq!(bearer_token("bearer  abc "), Some("abc"));
    assert_eq!(bearer_token("Basic abc"), None);
    assert_eq!(bearer_token("Bearer"), None);
    assert_eq!(bearer_token("Bearer "), None);
    let server = hs256_server();
    let token = tokens::hs256(SECRET, &claims("u1", "acme", 300));
    assert_eq!(
        server
            .authenticate_header(&format!("Bearer {token}"))
            .await
            .unwrap()
            .subject,
        "u1"
    );
    let e = server.authenticate_header(&token).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Unauthorized);
    assert!(e.message.contains("Bearer <token>"), "{e}");
}

#[test]
fn keys_that_do_not_load() {
    let check_key = |key: JwtKey, expected: &str| {
        let e = Authenticator::new(&settings(key)).unwrap_err();
        assert!(e.to_string().contains(expected), "{e}");
    };
    check_key(JwtKey::Secret(vec![]), "empty");
    check_key(
        JwtKey::PublicPem {
            alg: JwtAlg::Rs256,
            pem: b"not a pem".to_vec(),
        },
        "not a valid rs256 PEM public key",
    );
    check_key(
        JwtKey::PublicPem {
            alg: JwtAlg::Eddsa,
            pem: keys().rsa_public_pem.clone().into_bytes(),
        },
        "not a valid eddsa PEM public key",
    );
    check_key(
        JwtKey::PublicPem {
            alg: JwtAlg::Hs256,
            pem: keys().rsa_public_pem.clone().into_bytes(),
        },
        "not a PEM public key",
    );
    assert!(matches!(
        Authenticator::new(&settings(JwtKey::Secret(vec![]))),
        Err(KeyError::EmptySecret)
    ));
}
