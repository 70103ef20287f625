//! Bearer JWT verification (docs/PROTOCOL.md §3).
//!
//! The server is configured with one key source ([`JwtKey`]): HS256 with a
//! shared secret; RS256, ES256 or EdDSA with a PEM public key; or a JSON
//! Web Key Set from a file or URL (`jwks`: the token's `kid` picks the key,
//! which fixes the algorithm). [`Authenticator::verify`] accepts a token
//! only when
//!
//! - it is a well-formed compact JWS whose header names exactly the
//!   algorithm of its key (`alg: none`, another algorithm, a `kid` the set
//!   lacks, a malformed token or a bad signature: `unauthorized`);
//! - its `exp` is present and not past (`token_expired`), its `nbf`, if any,
//!   not in the future (`token_not_yet_valid`), both give or take the
//!   configured leeway;
//! - its `sub` is a non-empty string (`unauthorized`);
//! - its `role` is a non-empty string (`unauthorized`: policies match it);
//! - `aud` / `iss` match when an audience / issuer is configured.
//!
//! The claims of a verified token become a [`Principal`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value as Json};
use tenantsync_protocol::ErrorCode;

use crate::jwks::{Jwks, JwksError, JwksSource, SetKey};
use crate::service::{ApiError, Principal};

/// The one algorithm a static key verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JwtAlg {
    /// HMAC with SHA-256 and a shared secret.
    Hs256,
    /// RSA PKCS#1 v1.5 with SHA-256, verified with an RSA public key.
    Rs256,
    /// ECDSA on P-256 with SHA-256, verified with a P-256 public key.
    Es256,
    /// Ed25519, verified with an Ed25519 public key.
    Eddsa,
}

impl JwtAlg {
    /// The name used in configuration (`hs256`, `rs256`, `es256`, `eddsa`).
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlg::Hs256 => "hs256",
            JwtAlg::Rs256 => "rs256",
            JwtAlg::Es256 => "es256",
            JwtAlg::Eddsa => "eddsa",
        }
    }

    fn algorithm(self) -> Algorithm {
        match self {
            JwtAlg::Hs256 => Algorithm::HS256,
            JwtAlg::Rs256 => Algorithm::RS256,
            JwtAlg::Es256 => Algorithm::ES256,
            JwtAlg::Eddsa => Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for JwtAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JwtAlg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "hs256" => Ok(JwtAlg::Hs256),
            "rs256" => Ok(JwtAlg::Rs256),
            "es256" => Ok(JwtAlg::Es256),
            "eddsa" => Ok(JwtAlg::Eddsa),
            _ => Err(format!(
                "unknown JWT algorithm `{s}` (expected hs256, rs256, es256 or eddsa)"
            )),
        }
    }
}

/// The key tokens are verified with.
#[derive(Clone)]
pub enum JwtKey {
    /// HS256: the shared secret's bytes.
    Secret(Vec<u8>),
    /// RS256, ES256 or EdDSA: a PEM public key (`-----BEGIN PUBLIC
    /// KEY-----`, or `BEGIN RSA PUBLIC KEY` for RS256).
    PublicPem {
        /// `Rs256`, `Es256` or `Eddsa`.
        alg: JwtAlg,
        /// The PEM text.
        pem: Vec<u8>,
    },
    /// A JSON Web Key Set (RS256, ES256 and EdDSA keys), read from a file or
    /// URL at start, every `refresh`, and on an unknown `kid`.
    Jwks {
        /// The file or URL.
        source: JwksSource,
        /// How often it is read again.
        refresh: Duration,
    },
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Never print a secret.
            JwtKey::Secret(s) => write!(f, "Secret({} bytes)", s.len()),
            JwtKey::PublicPem { alg, pem } => write!(f, "PublicPem({alg}, {} bytes)", pem.len()),
            JwtKey::Jwks { source, refresh } => write!(f, "Jwks({source}, every {refresh:?})"),
        }
    }
}

/// How tokens are verified: the key (which fixes the algorithm) and the
/// optional checks.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// The key.
    pub key: JwtKey,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// If set, `aud` must be present and contain it.
    pub audience: Option<String>,
    /// If set, `iss` must be present and equal it.
    pub issuer: Option<String>,
    /// The claim naming the tenant (for [`Principal::from_claims`]).
    pub tenant_claim: String,
}

impl JwtSettings {
    /// What verifies tokens, in words for logs (`hs256`, `rs256`, ...,
    /// `jwks <source>`).
    pub fn describe(&self) -> String {
        match &self.key {
            JwtKey::Secret(_) => JwtAlg::Hs256.to_string(),
            JwtKey::PublicPem { alg, .. } => alg.to_string(),
            JwtKey::Jwks { source, .. } => format!("jwks {source}"),
        }
    }
}

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// An HS256 secret must not be empty.
    #[error("the HS256 secret is empty")]
    EmptySecret,
    /// A PEM public key was given for HS256, which takes a secret.
    #[error("{alg} is verified with a secret, not a PEM public key")]
    NotAPublicKeyAlg {
        /// The algorithm given with the PEM.
        alg: JwtAlg,
    },
    /// The PEM did not parse as a key for `alg`.
    #[error("not a valid {alg} PEM public key: {reason}")]
    BadPem {
        /// The algorithm.
        alg: JwtAlg,
        /// The parser's words.
        reason: String,
    },
}

/// Verifies bearer tokens. Built once at start; cheap to share behind an
/// `Arc`.
pub struct Authenticator {
    keys: Keys,
    /// The checks, the algorithms left to each key.
    validation: Validation,
    tenant_claim: String,
}

/// What signatures are verified with.
enum Keys {
    /// One key, one algorithm.
    Static { key: DecodingKey, alg: JwtAlg },
    /// A key set, the token's `kid` picking the key.
    Set(Arc<Jwks>),
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = match &self.keys {
            Keys::Static { alg, .. } => alg.to_string(),
            Keys::Set(j) => format!("jwks {}", j.source()),
        };
        f.debug_struct("Authenticator")
            .field("keys", &keys)
            .field("leeway", &self.validation.leeway)
            .field("tenant_claim", &self.tenant_claim)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Builds the verifier; fails when the key does not parse. A key set
    /// is not read yet: see [`Authenticator::start`].
    pub fn new(settings: &JwtSettings) -> Result<Authenticator, KeyError> {
        let keys = match &settings.key {
            JwtKey::Secret(secret) => {
                if secret.is_empty() {
                    return Err(KeyError::EmptySecret);
                }
                Keys::Static {
                    key: DecodingKey::from_secret(secret),
                    alg: JwtAlg::Hs256,
                }
            }
            JwtKey::PublicPem { alg, pem } => {
                let key = match alg {
                    JwtAlg::Hs256 => return Err(KeyError::NotAPublicKeyAlg { alg: *alg }),
                    JwtAlg::Rs256 => DecodingKey::from_rsa_pem(pem),
                    JwtAlg::Es256 => DecodingKey::from_ec_pem(pem),
                    JwtAlg::Eddsa => DecodingKey::from_ed_pem(pem),
                }
                .map_err(|e| KeyError::BadPem {
                    alg: *alg,
                    reason: e.to_string(),
                })?;
                Keys::Static { key, alg: *alg }
            }
            JwtKey::Jwks { source, refresh } => {
                Keys::Set(Arc::new(Jwks::new(source.clone(), *refresh)))
            }
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = settings.leeway_secs;
        // `exp` and `nbf` are read once, by `claim_time`, for HTTP and
        // WebSocket alike (the library reads fractions its own way).
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &settings.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            // No audience configured: `aud` is not checked (a token minted
            // for this server by an identity provider usually carries one).
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &settings.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(Authenticator {
            keys,
            validation,
            tenant_claim: settings.tenant_claim.clone(),
        })
    }

    /// Reads a key set for the first time and keeps it fresh (a task on
    /// the current runtime). A set in a file that cannot be read is an
    /// error; a URL that cannot be read yet is retried every second, the
    /// server not ready meanwhile ([`Authenticator::is_ready`]).
    pub async fn start(&self) -> Result<(), JwksError> {
        let Keys::Set(j) = &self.keys else {
            return Ok(());
        };
        match (j.read().await, j.source()) {
            (Ok(_), _) => {}
            (Err(e), JwksSource::File(_)) => return Err(e),
            (Err(e), JwksSource::Url(_)) => {
                tracing::warn!(error = %e, "the key set cannot be read yet; retrying every second, not ready meanwhile");
            }
        }
        j.spawn_refresh();
        Ok(())
    }

    /// Whether tokens can be verified (a key set, when used, was read).
    pub fn is_ready(&self) -> bool {
        match &self.keys {
            Keys::Static { .. } => true,
            Keys::Set(j) => j.is_loaded(),
        }
    }

    /// The clock skew tolerated on `exp` and `nbf`, in seconds.
    pub fn leeway_secs(&self) -> u64 {
        self.validation.leeway
    }

    /// Verifies `token` (without the `Bearer ` prefix) and returns who it
    /// names.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let data = match &self.keys {
            Keys::Static { key, alg } => {
                let mut v = self.validation.clone();
                v.algorithms = vec![alg.algorithm()];
                jsonwebtoken::decode::<Map<String, Json>>(token, key, &v)
                    .map_err(|e| self.refusal(&e, alg.as_str()))?
            }
            Keys::Set(j) => {
                let k = self.set_key(j, token)?;
                let mut v = self.validation.clone();
                v.algorithms = vec![k.alg];
                let name = format!("{:?} (its key's)", k.alg);
                jsonwebtoken::decode::<Map<String, Json>>(token, &k.key, &v)
                    .map_err(|e| self.refusal(&e, &name))?
            }
        };
        let claims = data.claims;
        let bad_time = |claim: &str, why: String| {
            ApiError::new(
                ErrorCode::Unauthorized,
                format!("the token's `{claim}` claim {why}"),
            )
        };
        let leeway = Duration::from_secs(self.validation.leeway);
        let now = SystemTime::now();
        let exp = claim_time(&claims, "exp", Round::Down)
            .map_err(|why| bad_time("exp", why))?
            .ok_or_else(|| bad_time("exp", "is missing".into()))?;
        if exp + leeway < now {
            return Err(ApiError::new(
                ErrorCode::TokenExpired,
                "the token has expired (`exp` passed)",
            ));
        }
        if let Some(nbf) =
            claim_time(&claims, "nbf", Round::Up).map_err(|why| bad_time("nbf", why))?
            && nbf > now + leeway
        {
            return Err(ApiError::new(
                ErrorCode::TokenNotYetValid,
                "the token is not valid yet (`nbf` is in the future)",
            ));
        }
        match claims.get("sub") {
            Some(Json::String(s)) if !s.is_empty() => {}
            _ => {
                return Err(ApiError::new(
                    ErrorCode::Unauthorized,
                    "the token's `sub` claim must be a non-empty string",
                ));
            }
        }
        // Policies match the role (`TO authenticated`): a token without one
        // would match none, and every sync would be silently empty.
        match claims.get("role") {
            Some(Json::String(s)) if !s.is_empty() => {}
            _ => {
                return Err(ApiError::new(
                    ErrorCode::Unauthorized,
                    "the token's `role` claim must be a non-empty string (policies match it: `TO authenticated`)",
                ));
            }
        }
        Ok(Principal::from_claims(claims, &self.tenant_claim))
    }

    /// [`Authenticator::verify`], after reading the key set again when the
    /// token names a `kid` the set lacks (rate limited, `jwks`): a key the
    /// provider just rotated in is found.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, ApiError> {
        if let Keys::Set(j) = &self.keys
            && let Ok(h) = jsonwebtoken::decode_header(token)
            && j.current()
                .is_none_or(|s| s.get(h.kid.as_deref()).is_none())
        {
            j.read_for_unknown_kid().await;
        }
        self.verify(token)
    }

    /// Authenticates an `Authorization` header value (`Bearer <token>`).
    pub async fn authenticate_header(&self, header: &str) -> Result<Principal, ApiError> {
        let token = bearer_token(header).ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "the Authorization header must be `Bearer <token>`",
            )
        })?;
        self.authenticate(token).await
    }

    /// The key of the set a token names.
    fn set_key(&self, j: &Jwks, token: &str) -> Result<SetKey, ApiError> {
        let h = jsonwebtoken::decode_header(token)
            .map_err(|e| self.refusal(&e, "RS256, ES256 or EdDSA"))?;
        let Some(set) = j.current() else {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "the server has not read its key set (JWKS) yet; try again shortly",
            ));
        };
        set.get(h.kid.as_deref()).cloned().ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                match &h.kid {
                    Some(kid) => format!(
                        "the token's key id (`kid` {kid:?}) is not in the server's key set"
                    ),
                    None => "the token has no key id (`kid`) and the server's key set holds several keys".to_owned(),
                },
            )
        })
    }

    fn refusal(&self, e: &jsonwebtoken::errors::Error, alg: &str) -> ApiError {
        let (code, message) = match e.kind() {
            ErrorKind::ExpiredSignature => (
                ErrorCode::TokenExpired,
                "the token has expired (`exp` passed)".to_owned(),
            ),
            ErrorKind::ImmatureSignature => (
                ErrorCode::TokenNotYetValid,
                "the token is not valid yet (`nbf` is in the future)".to_owned(),
            ),
            ErrorKind::InvalidSignature => (
                ErrorCode::Unauthorized,
                "the token's signature does not verify".to_owned(),
            ),
            ErrorKind::InvalidAlgorithm => (
                ErrorCode::Unauthorized,
                format!("the token is not signed with {alg}, the algorithm it must use"),
            ),
            ErrorKind::MissingRequiredClaim(claim) => (
                ErrorCode::Unauthorized,
                format!("the token has no valid `{claim}` claim"),
            ),
            ErrorKind::InvalidClaimFormat(claim) => (
                ErrorCode::Unauthorized,
                format!("the token's `{claim}` claim is not a number of seconds"),
            ),
            ErrorKind::InvalidAudience => (
                ErrorCode::Unauthorized,
                "the token's `aud` claim does not name this server's audience".to_owned(),
            ),
            ErrorKind::InvalidIssuer => (
                ErrorCode::Unauthorized,
                "the token's `iss` claim is not this server's issuer".to_owned(),
            ),
            // A header whose `alg` is not a JWS algorithm (`none` among
            // them) fails to parse: a malformed header.
            ErrorKind::Json(_)
            | ErrorKind::Base64(_)
            | ErrorKind::Utf8(_)
            | ErrorKind::InvalidToken => (
                ErrorCode::Unauthorized,
                format!(
                    "malformed token (a signed JWT `header.claims.signature` with alg {alg} is expected): {e}"
                ),
            ),
            _ => (ErrorCode::Unauthorized, format!("invalid token: {e}")),
        };
        ApiError::new(code, message)
    }
}

/// Which way [`claim_time`] rounds a fraction of a second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    /// Toward the past (`exp`: a token never lives longer than it says).
    Down,
    /// Toward the future (`nbf`: a token never starts earlier).
    Up,
}

/// The one reading of a time claim (`exp`, `nbf`), used for HTTP requests
/// and WebSocket sessions alike: a JSON number of seconds since the Unix
/// epoch, from 0 to 253402300799 (the end of year 9999); a fraction is
/// allowed and rounded toward the safe side (`round`). `Ok(None)` when the
/// claim is absent; an error (in words) for anything else: a string, a
/// negative or out-of-range number.
pub fn claim_time(
    claims: &Map<String, Json>,
    name: &str,
    round: Round,
) -> Result<Option<SystemTime>, String> {
    const MAX_SECS: f64 = 253_402_300_799.0;
    let Some(v) = claims.get(name) else {
        return Ok(None);
    };
    let secs = match v {
        Json::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(i), _) => i as f64,
            (None, Some(f)) if f.is_finite() => match round {
                Round::Down => f.floor(),
                Round::Up => f.ceil(),
            },
            _ => return Err("is not a number of seconds".into()),
        },
        _ => return Err("is not a number of seconds".into()),
    };
    if !(0.0..=MAX_SECS).contains(&secs) {
        return Err(format!("({secs}) is not a time between 1970 and 9999"));
    }
    Ok(Some(
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64),
    ))
}

/// An HS256 token with these claims: the one minter of the project (the
/// `token` command, the demo, the bench, the tests), so what is signed is
/// what [`Authenticator`] verifies. `secret` is the shared key.
pub fn mint_hs256(
    secret: &[u8],
    claims: &Map<String, Json>,
) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
}

/// The token of an `Authorization: Bearer <token>` header value (the scheme
/// is case-insensitive).
pub fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}
