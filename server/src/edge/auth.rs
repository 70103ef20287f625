//! Bearer JWT verification (docs/PROTOCOL.md §3).
//!
//! The server is configured with exactly one algorithm and one key
//! ([`JwtKey`]): HS256 with a shared secret, RS256 or EdDSA with a PEM public
//! key. [`Authenticator::verify`] accepts a token only when
//!
//! - it is a well-formed compact JWS whose header names exactly the
//!   configured algorithm (`alg: none`, another algorithm, a malformed token
//!   or a bad signature: `unauthorized`);
//! - its `exp` is present and not past (`token_expired`), its `nbf`, if any,
//!   not in the future (`token_not_yet_valid`), both give or take the
//!   configured leeway;
//! - its `sub` is a non-empty string (`unauthorized`);
//! - its `role` is a non-empty string (`unauthorized`: policies match it);
//! - `aud` / `iss` match when an audience / issuer is configured.
//!
//! The claims of a verified token become a [`Principal`].

use std::fmt;
use std::time::{Duration, SystemTime};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value as Json};
use tenantsync_protocol::ErrorCode;

use crate::service::{ApiError, Principal};

/// The one algorithm the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JwtAlg {
    /// HMAC with SHA-256 and a shared secret.
    Hs256,
    /// RSA PKCS#1 v1.5 with SHA-256, verified with an RSA public key.
    Rs256,
    /// Ed25519, verified with an Ed25519 public key.
    Eddsa,
}

impl JwtAlg {
    /// The name used in configuration (`hs256`, `rs256`, `eddsa`).
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlg::Hs256 => "hs256",
            JwtAlg::Rs256 => "rs256",
            JwtAlg::Eddsa => "eddsa",
        }
    }

    fn algorithm(self) -> Algorithm {
        match self {
            JwtAlg::Hs256 => Algorithm::HS256,
            JwtAlg::Rs256 => Algorithm::RS256,
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
            "eddsa" => Ok(JwtAlg::Eddsa),
            _ => Err(format!(
                "unknown JWT algorithm `{s}` (expected hs256, rs256 or eddsa)"
            )),
        }
    }
}

/// The key tokens are verified with.
#[derive(Clone)]
pub enum JwtKey {
    /// HS256: the shared secret's bytes.
    Secret(Vec<u8>),
    /// RS256 or EdDSA: a PEM public key (`-----BEGIN PUBLIC KEY-----`, or
    /// `BEGIN RSA PUBLIC KEY` for RS256).
    PublicPem {
        /// `Rs256` or `Eddsa`.
        alg: JwtAlg,
        /// The PEM text.
        pem: Vec<u8>,
    },
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Never print a secret.
            JwtKey::Secret(s) => write!(f, "Secret({} bytes)", s.len()),
            JwtKey::PublicPem { alg, pem } => write!(f, "PublicPem({alg}, {} bytes)", pem.len()),
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
    /// The algorithm the key is for.
    pub fn alg(&self) -> JwtAlg {
        match &self.key {
            JwtKey::Secret(_) => JwtAlg::Hs256,
            JwtKey::PublicPem { alg, .. } => *alg,
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
    key: DecodingKey,
    alg: JwtAlg,
    validation: Validation,
    tenant_claim: String,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("alg", &self.alg)
            .field("leeway", &self.validation.leeway)
            .field("tenant_claim", &self.tenant_claim)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Builds the verifier; fails when the key does not parse.
    pub fn new(settings: &JwtSettings) -> Result<Authenticator, KeyError> {
        let (alg, key) = match &settings.key {
            JwtKey::Secret(secret) => {
                if secret.is_empty() {
                    return Err(KeyError::EmptySecret);
                }
                (JwtAlg::Hs256, DecodingKey::from_secret(secret))
            }
            JwtKey::PublicPem { alg, pem } => {
                let key = match alg {
                    JwtAlg::Hs256 => return Err(KeyError::NotAPublicKeyAlg { alg: *alg }),
                    JwtAlg::Rs256 => DecodingKey::from_rsa_pem(pem),
                    JwtAlg::Eddsa => DecodingKey::from_ed_pem(pem),
                }
                .map_err(|e| KeyError::BadPem {
                    alg: *alg,
                    reason: e.to_string(),
                })?;
                (*alg, key)
            }
        };
        let mut validation = Validation::new(alg.algorithm());
        validation.algorithms = vec![alg.algorithm()];
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
            key,
            alg,
            validation,
            tenant_claim: settings.tenant_claim.clone(),
        })
    }

    /// The algorithm tokens must be signed with.
    pub fn alg(&self) -> JwtAlg {
        self.alg
    }

    /// The clock skew tolerated on `exp` and `nbf`, in seconds.
    pub fn leeway_secs(&self) -> u64 {
        self.validation.leeway
    }

    /// Verifies `token` (without the `Bearer ` prefix) and returns who it
    /// names.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let data = jsonwebtoken::decode::<Map<String, Json>>(token, &self.key, &self.validation)
            .map_err(|e| self.refusal(&e))?;
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

    /// Verifies an `Authorization` header value (`Bearer <token>`).
    pub fn verify_header(&self, header: &str) -> Result<Principal, ApiError> {
        let token = bearer_token(header).ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "the Authorization header must be `Bearer <token>`",
            )
        })?;
        self.verify(token)
    }

    fn refusal(&self, e: &jsonwebtoken::errors::Error) -> ApiError {
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
                format!(
                    "the token is not signed with {}, the one algorithm this server accepts",
                    self.alg
                ),
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
                    "malformed token (a signed JWT `header.claims.signature` with alg {} is expected): {e}",
                    self.alg
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
