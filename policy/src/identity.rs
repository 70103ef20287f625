//! Who is asking: the claims of a verified token.

use serde_json::{Map, Value as Json};
use tenantsync_types::Value;

/// The claims of a verified JWT. `auth.uid()` is the `sub` claim,
/// `auth.role()` the `role` claim, `auth.claim('name')` any claim.
///
/// Claims become SQL values as JSON gives them: an integer is an INTEGER, any
/// other number a REAL, a string TEXT, `true`/`false` the INTEGERs 1/0, `null`
/// or a missing claim NULL, and an array or object the TEXT of its JSON.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Identity {
    claims: Map<String, Json>,
}

impl Identity {
    /// An identity with these claims.
    pub fn new(claims: Map<String, Json>) -> Self {
        Identity { claims }
    }

    /// Parses a JSON object of claims (`{"sub": "u1", "role": "authenticated"}`).
    pub fn from_json(json: &str) -> Result<Self, IdentityError> {
        match serde_json::from_str::<Json>(json) {
            Ok(Json::Object(claims)) => Ok(Identity { claims }),
            Ok(other) => Err(IdentityError::NotAnObject {
                found: json_kind(&other),
            }),
            Err(e) => Err(IdentityError::Json(e.to_string())),
        }
    }

    /// The raw claims.
    pub fn claims(&self) -> &Map<String, Json> {
        &self.claims
    }

    /// A claim as an SQL value (NULL when missing).
    pub fn claim(&self, name: &str) -> Value {
        match self.claims.get(name) {
            None | Some(Json::Null) => Value::Null,
            Some(Json::Bool(b)) => Value::Integer(i64::from(*b)),
            Some(Json::Number(n)) => match n.as_i64() {
                Some(i) => Value::Integer(i),
                None => n.as_f64().map_or(Value::Null, Value::Real),
            },
            Some(Json::String(s)) => Value::Text(s.clone()),
            Some(other) => Value::Text(other.to_string()),
        }
    }

    /// The `role` claim when it is a string; policies `TO <role>` match it.
    pub fn role(&self) -> Option<&str> {
        self.claims.get("role").and_then(Json::as_str)
    }
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Claims that could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IdentityError {
    /// Not JSON.
    #[error("claims are not valid JSON: {0}")]
    Json(String),
    /// JSON, but not an object.
    #[error("claims must be a JSON object, found {found}")]
    NotAnObject {
        /// What was found instead.
        found: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_typed_as_json_gives_them() {
        let id = Identity::from_json(
            r#"{"sub":"u1","n":7,"r":2.5,"t":true,"f":false,"z":null,"a":[1,"x"],"o":{"k":1}}"#,
        )
        .unwrap();
        assert_eq!(id.claim("sub"), Value::Text("u1".into()));
        assert_eq!(id.claim("n"), Value::Integer(7));
        assert_eq!(id.claim("r"), Value::Real(2.5));
        assert_eq!(id.claim("t"), Value::Integer(1));
        assert_eq!(id.claim("f"), Value::Integer(0));
        assert_eq!(id.claim("z"), Value::Null);
        assert_eq!(id.claim("missing"), Value::Null);
        assert_eq!(id.claim("a"), Value::Text(r#"[1,"x"]"#.into()));
        assert_eq!(id.claim("o"), Value::Text(r#"{"k":1}"#.into()));
        assert_eq!(id.role(), None);
    }

    #[test]
    fn claims_must_be_an_object() {
        assert_eq!(
            Identity::from_json("[1]").unwrap_err().to_string(),
            "claims must be a JSON object, found an array"
        );
        assert!(Identity::from_json("{").is_err());
    }
}
