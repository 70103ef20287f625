//! Keys from a JSON Web Key Set (RFC 7517), as identity providers publish
//! them (Auth0, Clerk, Supabase Auth, Keycloak, Cognito): a file or an
//! HTTP(S) URL.
//!
//! - A token's key is the set's key with the token header's `kid` (a token
//!   without `kid` only when the set holds one key); the key fixes the
//!   algorithm: RSA keys RS256, P-256 keys ES256, Ed25519 keys EdDSA. Keys
//!   of other types, curves or algorithms, and encryption keys (`use:
//!   enc`), are skipped with a warning.
//! - The set is read at start, again on a schedule, and again when a token
//!   names a `kid` the set lacks (at most once per [`MIN_REFETCH`]: a
//!   stream of made-up `kid`s costs the provider nothing).
//! - A read that fails (provider down, bad JSON, no usable key) keeps the
//!   last good set; until a first set is read the server is not ready and
//!   refuses tokens, naming why.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// How often an unknown `kid` may make the server read the set again.
pub const MIN_REFETCH: Duration = Duration::from_secs(10);

/// How long one read of a URL may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the set is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// A JSON file.
    File(PathBuf),
    /// An `http://` or `https://` URL.
    Url(String),
}

impl JwksSource {
    /// A URL when `s` starts with `http://` or `https://`, else a path.
    pub fn parse(s: &str) -> JwksSource {
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            JwksSource::Url(s.to_owned())
        } else {
            JwksSource::File(PathBuf::from(s))
        }
    }
}

impl std::fmt::Display for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwksSource::File(p) => write!(f, "{}", p.display()),
            JwksSource::Url(u) => f.write_str(u),
        }
    }
}

/// Why a set could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The file or URL could not be read.
    #[error("cannot read the key set {source_name}: {reason}")]
    Read {
        /// The file or URL.
        source_name: String,
        /// What failed.
        reason: String,
    },
    /// It was read but is not a key set with a usable key.
    #[error("the key set {source_name} is not usable: {reason}")]
    Invalid {
        /// The file or URL.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
}

/// One usable key.
#[derive(Clone)]
pub struct SetKey {
    pub key: DecodingKey,
    pub alg: Algorithm,
}

/// A parsed set: usable keys by `kid` (a key without `kid` under "").
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, SetKey>,
}

impl KeySet {
    /// Parses a JWKS document, keeping the keys this server can verify
    /// with; `skipped` gets why each other key was left out.
    pub fn parse(json: &str, skipped: &mut Vec<String>) -> Result<KeySet, String> {
        let doc: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
        let Some(list) = doc.get("keys").and_then(|k| k.as_array()) else {
            return Err("no `keys` array".into());
        };
        let mut keys = HashMap::new();
        for (i, raw) in list.iter().enumerate() {
            let kid = raw
                .get("kid")
                .and_then(|k| k.as_str())
                .unwrap_or_default()
                .to_owned();
            let name = if kid.is_empty() {
                format!("key {i}")
            } else {
                format!("key {kid:?}")
            };
            match usable(raw) {
                Ok(k) => {
                    keys.insert(kid, k);
                }
                Err(why) => skipped.push(format!("{name}: {why}")),
            }
        }
        if keys.is_empty() {
            return Err("it holds no RS256, ES256 or EdDSA signing key".into());
        }
        Ok(KeySet { keys })
    }

    /// The key of a token whose header names `kid`.
    pub fn get(&self, kid: Option<&str>) -> Option<&SetKey> {
        match kid {
            Some(k) => self.keys.get(k),
            None if self.keys.len() == 1 => self.keys.values().next(),
            None => None,
        }
    }

    /// The number of usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether it holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A key of the set as this server uses it, or why not.
fn usable(raw: &serde_json::Value) -> Result<SetKey, String> {
    let jwk: Jwk = serde_json::from_value(raw.clone()).map_err(|e| format!("malformed: {e}"))?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("an encryption key (`use: enc`)".into());
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKey(_) => {
            return Err("a symmetric key (a key set publishes public keys)".into());
        }
        _ => return Err("a key type or curve other than RSA, P-256 or Ed25519".into()),
    };
    if let Some(declared) = jwk.common.key_algorithm {
        let same = matches!(
            (declared, alg),
            (KeyAlgorithm::RS256, Algorithm::RS256)
                | (KeyAlgorithm::ES256, Algorithm::ES256)
                | (KeyAlgorithm::EdDSA, Algorithm::EdDSA)
        );
        if !same {
            return Err(format!(
                "its `alg` {declared:?} is not one this server verifies (RS256, ES256, EdDSA)"
            ));
        }
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("not a valid key: {e}"))?;
    Ok(SetKey { key, alg })
}

/// The live set of a server: the last good one, read again on a schedule
/// and on an unknown `kid`.
pub struct Jwks {
    source: JwksSource,
    refresh: Duration,
    current: RwLock<Option<Arc<KeySet>>>,
    refetch: DefaultDirectRateLimiter,
    /// One read at a time.
    reading: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("source", &self.source)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// A set read from `source` every `refresh` (nothing read yet).
    pub fn new(source: JwksSource, refresh: Duration) -> Jwks {
        let per = NonZeroU32::new(1).expect("one");
        Jwks {
            source,
            refresh,
            current: RwLock::new(None),
            refetch: RateLimiter::direct(
                Quota::with_period(MIN_REFETCH)
                    .expect("a period")
                    .allow_burst(per),
            ),
            reading: tokio::sync::Mutex::new(()),
        }
    }

    /// Where it is read from.
    pub fn source(&self) -> &JwksSource {
        &self.source
    }

    /// The set in use (`None` before a first good read).
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether a set was read.
    pub fn is_loaded(&self) -> bool {
        self.current().is_some()
    }

    /// Reads the set now; on success it replaces the one in use, on
    /// failure the one in use stays.
    pub async fn read(&self) -> Result<Arc<KeySet>, JwksError> {
        let _one = self.reading.lock().await;
        let name = self.source.to_string();
        let text = match &self.source {
            JwksSource::File(p) => tokio::fs::read_to_string(p)
                .await
                .map_err(|e| e.to_string()),
            JwksSource::Url(u) => self.fetch(u).await,
        }
        .map_err(|reason| JwksError::Read {
            source_name: name.clone(),
            reason,
        })?;
        let mut skipped = Vec::new();
        let set = KeySet::parse(&text, &mut skipped).map_err(|reason| JwksError::Invalid {
            source_name: name.clone(),
            reason,
        })?;
        for s in skipped {
            tracing::warn!(jwks = %name, "key set: {s} (skipped)");
        }
        let set = Arc::new(set);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(set.clone());
        tracing::info!(jwks = %name, keys = set.len(), "key set read");
        Ok(set)
    }

    async fn fetch(&self, url: &str) -> Result<String, String> {
        let body = crate::outbound::call(url, None, FETCH_TIMEOUT).await?;
        String::from_utf8(body).map_err(|_| "the answer is not UTF-8".to_owned())
    }

    /// After a token named an unknown `kid`: reads the set again unless
    /// that was done less than [`MIN_REFETCH`] ago. Returns whether the
    /// set was read.
    pub async fn read_for_unknown_kid(&self) -> bool {
        if self.refetch.check().is_err() {
            return false;
        }
        match self.read().await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "reading the key set for an unknown kid failed; the last good set stays");
                false
            }
        }
    }

    /// Reads the set on its schedule, for as long as the runtime runs:
    /// every `refresh`, and every second until a first read succeeds.
    pub fn spawn_refresh(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        let refresh = self.refresh;
        tokio::spawn(async move {
            loop {
                let loaded = match me.upgrade() {
                    Some(j) => j.is_loaded(),
                    None => return,
                };
                let wait = if loaded {
                    refresh
                } else {
                    Duration::from_secs(1)
                };
                tokio::time::sleep(wait).await;
                let Some(j) = me.upgrade() else { return };
                if let Err(e) = j.read().await {
                    tracing::warn!(error = %e, "reading the key set failed; the last good set stays");
                }
            }
        })
    }
}
