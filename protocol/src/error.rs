//! [`ErrorCode`]: every error the protocol answers.

use serde::{Deserialize, Serialize};

/// A stable, machine-readable error code (`snake_case` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, not an object, a missing or ill-typed field, a binary frame.
    BadMessage,
    /// An unknown message `type`.
    UnknownType,
    /// A message or body over `max_message_bytes`.
    TooLarge,
    /// A message other than `hello` before `hello`.
    HelloRequired,
    /// `hello.protocol` is not a version this server speaks.
    UnsupportedProtocol,
    /// Missing or invalid token: bad signature, malformed, algorithm not allowed.
    Unauthorized,
    /// The token's `exp` has passed.
    TokenExpired,
    /// The token's `nbf` is in the future.
    TokenNotYetValid,
    /// The endpoint needs the service role.
    Forbidden,
    /// The site id is bound to another token subject.
    SiteBoundToOtherSubject,
    /// A pushed change authored by another site.
    SiteMismatch,
    /// The subscription query was refused by the policy engine.
    QueryRefused,
    /// A subscription with this id is already active on the connection.
    SubscriptionExists,
    /// No active subscription with this id.
    UnknownSubscription,
    /// A connection, subscription or other configured limit is reached.
    LimitExceeded,
    /// The tenant's push rate is exceeded; see `retry_after_ms`.
    RateLimited,
    /// A push starts after the server's `pushed_version` for the peer.
    Gap,
    /// A malformed changeset: unknown table or column, bad pk, bad range.
    BadPush,
    /// Write policies refused rows of a push.
    PolicyRefused,
    /// Service SQL failed (nothing applied).
    SqlError,
    /// A policy reload with an invalid policy set (the old one stays).
    PolicyInvalid,
    /// A schema change that cannot be applied safely (nothing applied).
    SchemaRefused,
    /// The server is stopping.
    ShuttingDown,
    /// In a cluster: the shard's log cannot take the write now (JetStream
    /// unreachable, or this node just lost the shard); nothing was applied.
    /// Retry (after reconnecting, for a session).
    Unavailable,
    /// A bug or an IO error; nothing was half-applied.
    Internal,
}

impl ErrorCode {
    /// The HTTP status an HTTP endpoint answers with this code.
    pub fn http_status(self) -> u16 {
        use ErrorCode::*;
        match self {
            BadMessage | UnknownType | UnsupportedProtocol | SiteMismatch | QueryRefused
            | SubscriptionExists | UnknownSubscription | BadPush | SqlError | PolicyInvalid
            | SchemaRefused | HelloRequired => 400,
            Unauthorized | TokenExpired | TokenNotYetValid => 401,
            Forbidden | SiteBoundToOtherSubject | PolicyRefused => 403,
            Gap => 409,
            TooLarge => 413,
            LimitExceeded | RateLimited => 429,
            Internal => 500,
            ShuttingDown | Unavailable => 503,
        }
    }

    /// Whether a WebSocket is closed after this error.
    pub fn closes_connection(self) -> bool {
        use ErrorCode::*;
        matches!(
            self,
            Unauthorized
                | TokenExpired
                | TokenNotYetValid
                | UnsupportedProtocol
                | SiteBoundToOtherSubject
                | ShuttingDown
                | Unavailable
        )
    }

    /// The wire name, e.g. `"bad_message"`.
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            BadMessage => "bad_message",
            UnknownType => "unknown_type",
            TooLarge => "too_large",
            HelloRequired => "hello_required",
            UnsupportedProtocol => "unsupported_protocol",
            Unauthorized => "unauthorized",
            TokenExpired => "token_expired",
            TokenNotYetValid => "token_not_yet_valid",
            Forbidden => "forbidden",
            SiteBoundToOtherSubject => "site_bound_to_other_subject",
            SiteMismatch => "site_mismatch",
            QueryRefused => "query_refused",
            SubscriptionExists => "subscription_exists",
            UnknownSubscription => "unknown_subscription",
            LimitExceeded => "limit_exceeded",
            RateLimited => "rate_limited",
            Gap => "gap",
            BadPush => "bad_push",
            PolicyRefused => "policy_refused",
            SqlError => "sql_error",
            PolicyInvalid => "policy_invalid",
            ShuttingDown => "shutting_down",
            Unavailable => "unavailable",
            SchemaRefused => "schema_refused",
            Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn wire_names_match_serde() {
        use ErrorCode::*;
        for code in [
            BadMessage,
            UnknownType,
            TooLarge,
            HelloRequired,
            UnsupportedProtocol,
            Unauthorized,
            TokenExpired,
            TokenNotYetValid,
            Forbidden,
            SiteBoundToOtherSubject,
            SiteMismatch,
            QueryRefused,
            SubscriptionExists,
            UnknownSubscription,
            LimitExceeded,
            RateLimited,
            Gap,
            BadPush,
            PolicyRefused,
            SqlError,
            PolicyInvalid,
            ShuttingDown,
            Unavailable,
            Internal,
        ] {
            assert_eq!(
                serde_json::to_string(&code).unwrap(),
                format!("\"{}\"", code.as_str())
            );
            assert!((400..=503).contains(&code.http_status()));
        }
    }
}
