//! [`SiteId`]: the 16-byte identity of a database.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The 16-byte site id of a database (`crsql_site_id()`): random bytes with
/// UUIDv4 version/variant bits, created when the database is first opened.
///
/// `Display`, `FromStr` and serde use 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SiteId(pub [u8; 16]);

impl SiteId {
    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// A site id from a slice of exactly 16 bytes.
    pub fn from_slice(b: &[u8]) -> Option<SiteId> {
        <[u8; 16]>::try_from(b).ok().map(SiteId)
    }

    /// Sets the UUIDv4 version and variant bits on 16 random bytes.
    pub fn from_random(mut b: [u8; 16]) -> SiteId {
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        SiteId(b)
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SiteId({self})")
    }
}

/// Why a text is not a site id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a site id is 32 hex digits (16 bytes), got {0:?}")]
pub struct SiteIdParseError(pub String);

impl FromStr for SiteId {
    type Err = SiteIdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        hex::decode(s)
            .ok()
            .and_then(|b| SiteId::from_slice(&b))
            .ok_or_else(|| SiteIdParseError(s.to_owned()))
    }
}

impl Serialize for SiteId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SiteId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::SiteId;

    #[test]
    fn hex_round_trip_and_uuid_bits() {
        let s = SiteId::from_random([0xff; 16]);
        assert_eq!(s.to_string(), "ffffffffffff4fffbfffffffffffffff");
        assert_eq!(s.to_string().parse::<SiteId>().unwrap(), s);
        assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        assert!("abc".parse::<SiteId>().is_err());
        assert!("00".repeat(17).parse::<SiteId>().is_err());
    }
}
