//! [`Placement`]: which shard holds a tenant (docs/arch/server.md,
//! "Shards"). A tenant lives in exactly one shard, chosen by a stable rule:
//! an override when the configuration names one for the tenant, else the
//! 64-bit FNV-1a hash of the tenant's UTF-8 bytes modulo the number of
//! shards. An identity without a tenant claim belongs to shard 0. The rule
//! never changes for a database: the number of shards is recorded when the
//! database is created, and an override that would move a tenant whose
//! peers another shard already holds is refused at start.

use std::collections::BTreeMap;

/// The tenant -> shard rule of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    shards: usize,
    overrides: BTreeMap<String, usize>,
}

impl Placement {
    /// `shards` shards (at least 1), with overrides (each below `shards`).
    pub fn new(shards: usize, overrides: BTreeMap<String, usize>) -> Placement {
        Placement {
            shards: shards.max(1),
            overrides,
        }
    }

    /// How many shards.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The overrides.
    pub fn overrides(&self) -> &BTreeMap<String, usize> {
        &self.overrides
    }

    /// The shard of a tenant (`None`: no tenant claim).
    pub fn shard_of(&self, tenant: Option<&str>) -> usize {
        let Some(t) = tenant else { return 0 };
        if let Some(&s) = self.overrides.get(t) {
            return s;
        }
        (fnv1a64(t.as_bytes()) % self.shards as u64) as usize
    }
}

/// 64-bit FNV-1a: small, stable across versions and platforms (also the
/// cluster's rendezvous weight, `cluster::node`).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_stable_and_spread() {
        let p = Placement::new(4, BTreeMap::from([("acme".to_owned(), 3)]));
        assert_eq!(p.shard_of(Some("acme")), 3);
        assert_eq!(p.shard_of(None), 0);
        // The rule is part of the on-disk layout: these must never change.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let counts = (0..1000).fold([0usize; 4], |mut c, i| {
            c[p.shard_of(Some(&format!("tenant{i}")))] += 1;
            c
        });
        assert!(counts.iter().all(|&n| n > 150), "{counts:?}");
        assert_eq!(Placement::new(1, BTreeMap::new()).shard_of(Some("x")), 0);
    }
}
