//! Tokens from an identity provider's JSON Web Key Set (docs/SAAS.md,
//! "Identity providers"): keys picked by `kid`, RS256, ES256 and EdDSA,
//! a key rotated in mid-session, a provider that is down, a `kid` nobody
//! published, issuer and audience; and the readiness that waits for the
//! first set. The provider is a real HTTP server on loopback.

mod edge_common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use edge_common::server::{TestServer, edge, site};
use edge_common::tokens::{claims, keys, service_claims};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value as Json, json};
use tenantsync_server::auth::{Authenticator, JwtKey, JwtSettings};
use tenantsync_server::jwks::{JwksSource, MIN_REFETCH};

/// A signing key with its public JWK.
struct Signer {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Json,
}

impl Signer {
    fn rsa(kid: &str) -> Signer {
        use rsa::pkcs8::DecodePrivateKey;
        use rsa::traits::PublicKeyParts;
        let pem = &keys().rsa_private_pem;
        let private = rsa::RsaPrivateKey::from_pkcs8_pem(pem).expect("rsa");
        let public = private.to_public_key();
        Signer {
            kid: kid.into(),
            alg: Algorithm::RS256,
            key: EncodingKey::from_rsa_pem(pem.as_bytes()).expect("rsa pem"),
            jwk: json!({
                "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            }),
        }
    }

    fn p256(kid: &str, seed: u8) -> Signer {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        let sk = p256::ecdsa::SigningKey::from_slice(&[seed; 32]).expect("p256 key");
        let point = sk.verifying_key().to_encoded_point(false);
        let pem = sk.to_pkcs8_pem(LineEnding::LF).expect("pem");
        Signer {
            kid: kid.into(),
            alg: Algorithm::ES256,
            key: EncodingKey::from_ec_pem(pem.as_bytes()).expect("ec pem"),
            jwk: json!({
                "kty": "EC", "crv": "P-256", "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(point.x().expect("x")),
                "y": URL_SAFE_NO_PAD.encode(point.y().expect("y")),
            }),
        }
    }

    fn ed25519(kid: &str, seed: u8) -> Signer {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
        let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let pem = sk.to_pkcs8_pem(LineEnding::LF).expect("pem");
        Signer {
            kid: kid.into(),
            alg: Algorithm::EdDSA,
            key: EncodingKey::from_ed_pem(pem.as_bytes()).expect("ed pem"),
            jwk: json!({
                "kty": "OKP", "crv": "Ed25519", "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(sk.verifying_key().as_bytes()),
            }),
        }
    }

    fn sign(&self, claims: &Map<String, Json>) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.key).expect("encode")
    }

    /// A token for `sub` of `tenant`, with issuer and audience.
    fn token(&self, sub: &str, tenant: &str) -> String {
        self.sign(&idp_claims(sub, tenant))
    }
}

const ISSUER: &str = "https://idp.example.test/";
const AUDIENCE: &str = "tenantsync";

fn idp_claims(sub: &str, tenant: &str) -> Map<String, Json> {
    let mut c = claims(sub, tenant, 600);
    c.insert("iss".into(), json!(ISSUER));
    c.insert("aud".into(), json!([AUDIENCE, "another-api"]));
    c
}

fn set_of(signers: &[&Signer]) -> String {
    json!({ "keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

/// The identity provider: serves its key set at `/jwks.json`, or 503
/// while it is down; counts the reads.
#[derive(Default)]
struct Provider {
    set: Mutex<String>,
    down: AtomicBool,
    reads: AtomicUsize,
}

async fn jwks(State(p): State<Arc<Provider>>) -> axum::response::Response {
    p.reads.fetch_add(1, Ordering::SeqCst);
    if p.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down for maintenance").into_response();
    }
    let body = p.set.lock().unwrap().clone();
    ([("content-type", "application/json")], body).into_response()
}

async fn provider(set: String) -> (Arc<Provider>, String) {
    let p = Arc::new(Provider::default());
    *p.set.lock().unwrap() = set;
    let app = axum::Router::new()
        .route("/jwks.json", axum::routing::get(jwks))
        .with_state(p.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (p, url)
}

fn jwt(source: JwksSource) -> JwtSettings {
    JwtSettings {
        key: JwtKey::Jwks {
            source,
            refresh: Duration::from_secs(300),
        },
        leeway_secs: 0,
        audience: Some(AUDIENCE.into()),
        issuer: Some(ISSUER.into()),
        tenant_claim: "tenant_id".into(),
    }
}

async fn status_of(s: &TestServer, path: &str, token: Option<&str>) -> (u16, Json) {
    let mut r = reqwest::Client::new().get(s.url(path));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Json::Null))
}

/// Waits (up to 10 s) for `f` to hold.
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within 10 s");
}

#[tokio::test]
async fn keys_are_picked_by_kid_and_fix_their_algorithm() {
    let (rsa, ec, ed) = (
        Signer::rsa("rsa-1"),
        Signer::p256("ec-1", 3),
        Signer::ed25519("ed-1", 9),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    // Keys this server cannot use are skipped, not fatal.
    let mut doc: Json = serde_json::from_str(&set_of(&[&rsa, &ec, &ed])).unwrap();
    doc["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}));
    doc["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"}));
    std::fs::write(&file, doc.to_string()).unwrap();
    let auth = Authenticator::new(&jwt(JwksSource::File(file))).unwrap();
    auth.start().await.unwrap();
    assert!(auth.is_ready());

    for s in [&rsa, &ec, &ed] {
        let p = auth.authenticate(&s.token("alice", "acme")).await;
        assert_eq!(p.unwrap().subject, "alice", "{}", s.kid);
    }
    let refused = |token: String, words: &'static str| {
        let auth = &auth;
        async move {
            let e = auth.authenticate(&token).await.unwrap_err();
            assert_eq!(e.code, tenantsync_protocol::ErrorCode::Unauthorized);
            assert!(e.message.contains(words), "{:?} lacks {words:?}", e.message);
        }
    };
    // Signed by the EC key but naming the RSA key's kid: RS256 expected.
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("rsa-1".into());
    refused(
        jsonwebtoken::encode(&h, &idp_claims("mallory", "acme"), &ec.key).unwrap(),
        "RS256",
    )
    .await;
    refused(
        Signer::ed25519("nobody", 1).token("mallory", "acme"),
        "\"nobody\"",
    )
    .await;
    let mut no_kid = Header::new(Algorithm::EdDSA);
    no_kid.kid = None;
    refused(
        jsonwebtoken::encode(&no_kid, &idp_claims("mallory", "acme"), &ed.key).unwrap(),
        "no key id",
    )
    .await;
    // The skipped keys are not keys.
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("hmac".into());
    refused(
        jsonwebtoken::encode(
            &hs,
            &idp_claims("mallory", "acme"),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap(),
        "\"hmac\"",
    )
    .await;
    // Another issuer, another audience.
    let mut c = idp_claims("mallory", "acme");
    c.insert("iss".into(), json!("https://evil.example.test/"));
    refused(rsa.sign(&c), "`iss`").await;
    let mut c = idp_claims("mallory", "acme");
    c.insert("aud".into(), json!("another-api"));
    refused(rsa.sign(&c), "`aud`").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_works_at_once_and_open_sessions_keep_running() {
    let (old, new) = (Signer::rsa("2026-11"), Signer::ed25519("2026-12", 5));
    let (idp, url) = provider(set_of(&[&old])).await;
    let s = TestServer::start_with_jwt(edge(), jwt(JwksSource::Url(url)), |_| {}).await;
    let reads_at_start = idp.reads.load(Ordering::SeqCst);

    let mut before = s.ws(Some(&old.token("alice", "acme"))).await;
    before.open(site(1), None).await;
    before
        .send(json!({"type": "subscribe", "id": "all", "query": "SELECT * FROM todos"}))
        .await;
    before.expect("subscribed").await;

    // The provider rotates: the new key in, the old one out.
    *idp.set.lock().unwrap() = set_of(&[&new]);
    let mut after = s.ws(Some(&new.token("alice", "acme"))).await;
    after.open(site(2), None).await;
    assert_eq!(
        idp.reads.load(Ordering::SeqCst),
        reads_at_start + 1,
        "the unknown kid read the set once"
    );
    // The session opened with the old key keeps running until its token
    // expires: it still gets what is written.
    let mut backend = service_claims(600);
    backend.insert("iss".into(), json!(ISSUER));
    backend.insert("aud".into(), json!(AUDIENCE));
    let r = reqwest::Client::new()
        .post(s.url("/v1/sql"))
        .bearer_auth(new.sign(&backend))
        .json(&json!({"statements": [{"sql": "INSERT INTO todos (id, tenant_id, owner, title) VALUES (1, 'acme', 'alice', 'after the rotation')", "params": []}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    loop {
        let m = before.msg().await;
        if m["type"] == "changes" {
            assert!(m.to_string().contains("after the rotation"), "{m}");
            break;
        }
    }
    // A new request with the old key is refused: it left the set.
    let (code, body) = status_of(&s, "/v1/schema", Some(&old.token("alice", "acme"))).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.to_string().contains("2026-11"), "{body}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_is_down_leaves_the_last_good_set_and_is_not_hammered() {
    let key = Signer::p256("k1", 11);
    let (idp, url) = provider(set_of(&[&key])).await;
    let s = TestServer::start_with_jwt(edge(), jwt(JwksSource::Url(url)), |_| {}).await;
    idp.down.store(true, Ordering::SeqCst);
    let reads = idp.reads.load(Ordering::SeqCst);

    // Known keys keep working; unknown kids are refused, and at most one of
    // them reaches the provider within MIN_REFETCH.
    let (code, body) = status_of(&s, "/v1/schema", Some(&key.token("alice", "acme"))).await;
    assert_eq!(code, 200, "{body}");
    for i in 0..5 {
        let stranger = Signer::ed25519(&format!("made-up-{i}"), 20 + i);
        let (code, body) =
            status_of(&s, "/v1/schema", Some(&stranger.token("mallory", "acme"))).await;
        assert_eq!(code, 401, "{body}");
        assert!(body.to_string().contains("made-up"), "{body}");
    }
    let extra = idp.reads.load(Ordering::SeqCst) - reads;
    assert!(
        extra <= 1,
        "{extra} reads of a down provider within {MIN_REFETCH:?}"
    );
    let (code, body) = status_of(&s, "/v1/health/ready", None).await;
    assert_eq!((code, &body["status"]), (200, &json!("ready")), "{body}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_provider_is_down_at_start_is_alive_but_not_ready() {
    let key = Signer::rsa("first");
    let (idp, url) = provider(set_of(&[&key])).await;
    idp.down.store(true, Ordering::SeqCst);
    let s = TestServer::start_with_jwt(edge(), jwt(JwksSource::Url(url)), |_| {}).await;

    let (code, body) = status_of(&s, "/v1/health/live", None).await;
    assert_eq!((code, &body["status"]), (200, &json!("alive")), "{body}");
    let (code, body) = status_of(&s, "/v1/health/ready", None).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "not_ready");
    assert!(body["reasons"].to_string().contains("JWKS"), "{body}");
    let (code, body) = status_of(&s, "/v1/schema", Some(&key.token("alice", "acme"))).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.to_string().contains("not read its key set"), "{body}");

    // The provider comes back: the set is read on the retry, the server
    // becomes ready and the token works.
    idp.down.store(false, Ordering::SeqCst);
    eventually("ready", async || {
        status_of(&s, "/v1/health/ready", None).await.0 == 200
    })
    .await;
    let (code, body) = status_of(&s, "/v1/schema", Some(&key.token("alice", "acme"))).await;
    assert_eq!(code, 200, "{body}");
    s.stop().await;
}

#[tokio::test]
async fn a_running_server_is_alive_and_ready() {
    let s = TestServer::start().await;
    let (code, body) = status_of(&s, "/v1/health/ready", None).await;
    assert_eq!((code, &body["status"]), (200, &json!("ready")), "{body}");
    let (code, body) = status_of(&s, "/v1/health/live", None).await;
    assert_eq!((code, &body["status"]), (200, &json!("alive")), "{body}");
    s.stop().await;
}
