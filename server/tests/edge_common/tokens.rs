//! Test keys and tokens: an RSA and an Ed25519 key pair made at test time
//! (never used outside tests), and helpers that mint JWTs with them.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value as Json, json};

/// PEM key pairs, generated once per test binary.
pub struct Keys {
    pub rsa_private_pem: String,
    pub rsa_public_pem: String,
    pub ed_private_pem: String,
    pub ed_public_pem: String,
    pub ec_private_pem: String,
    pub ec_public_pem: String,
}

pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
        use rsa::pkcs8::LineEnding;

        let rsa = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
        let rsa_private_pem = rsa.to_pkcs8_pem(LineEnding::LF).expect("pem").to_string();
        let rsa_public_pem = rsa
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem");
        // A fixed seed: the key is deterministic, and only ever signs test tokens.
        let ed = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let ed_private_pem = ed
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .expect("pem")
            .to_string();
        let ed_public_pem = ed
            .verifying_key()
            .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .expect("pem");
        // P-256, also from a fixed seed.
        let ec = p256::ecdsa::SigningKey::from_slice(&[5; 32]).expect("p256 key");
        let ec_private_pem = {
            use p256::pkcs8::EncodePrivateKey;
            ec.to_pkcs8_pem(LineEnding::LF).expect("pem").to_string()
        };
        let ec_public_pem = {
            use p256::pkcs8::EncodePublicKey;
            ec.verifying_key()
                .to_public_key_pem(LineEnding::LF)
                .expect("pem")
        };
        Keys {
            rsa_private_pem,
            rsa_public_pem,
            ed_private_pem,
            ed_public_pem,
            ec_private_pem,
            ec_public_pem,
        }
    })
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// Claims of a user of `tenant`, expiring `exp_in` seconds from now.
pub fn claims(sub: &str, tenant: &str, exp_in: i64) -> Map<String, Json> {
    let Json::Object(m) = json!({
        "sub": sub,
        "role": "authenticated",
        "tenant_id": tenant,
        "exp": now() + exp_in,
    }) else {
        unreachable!()
    };
    m
}

/// Claims of the service role.
pub fn service_claims(exp_in: i64) -> Map<String, Json> {
    let mut c = claims("backend", "ops", exp_in);
    c.insert("role".into(), json!("service"));
    c
}

pub fn hs256(secret: &str, claims: &Map<String, Json>) -> String {
    tenantsync_server::auth::mint_hs256(secret.as_bytes(), claims).expect("encode")
}

pub fn rs256(claims: &Map<String, Json>) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        claims,
        &EncodingKey::from_rsa_pem(keys().rsa_private_pem.as_bytes()).expect("rsa key"),
    )
    .expect("encode")
}

pub fn es256(claims: &Map<String, Json>) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        claims,
        &EncodingKey::from_ec_pem(keys().ec_private_pem.as_bytes()).expect("ec key"),
    )
    .expect("encode")
}

pub fn eddsa(claims: &Map<String, Json>) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        claims,
        &EncodingKey::from_ed_pem(keys().ed_private_pem.as_bytes()).expect("ed key"),
    )
    .expect("encode")
}

/// A token with header `header` and no signature (`alg: none` style).
pub fn unsigned(header: Json, claims: &Map<String, Json>) -> String {
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(Json::Object(claims.clone()).to_string())
    )
}

/// `token` with its claims replaced by `claims` (the signature kept): a
/// forged token.
pub fn with_claims(token: &str, claims: &Map<String, Json>) -> String {
    let mut parts = token.split('.');
    let header = parts.next().expect("header");
    let _ = parts.next();
    let signature = parts.next().expect("signature");
    format!(
        "{header}.{}.{signature}",
        URL_SAFE_NO_PAD.encode(Json::Object(claims.clone()).to_string())
    )
}
