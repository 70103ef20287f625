//! Stable subscription ids from query text.
//!
//! `tenantsync replica sync --subscribe '<SELECT ...>'` needs an id for each
//! query that is the same in every run, on every machine and with every
//! build: `q` followed by the 64-bit FNV-1a hash of the query, in 16 hex
//! digits, over the query with whitespace runs collapsed to one space and
//! the ends trimmed (so re-indenting a query keeps its id; any other edit,
//! even of letter case, makes it a new subscription).

/// The normalised text the id is computed from.
pub fn normalize(query: &str) -> String {
    query.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The id of a query: `q` + 16 lowercase hex digits.
pub fn derive(query: &str) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for b in normalize(query).bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    format!("q{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(query: &str, expected: &str) {
        assert_eq!(derive(query), expected, "{query:?}");
    }

    #[test]
    fn ids_are_fnv1a_of_the_normalised_query() {
        // FNV-1a 64 of the empty string is the offset basis; of "a" the
        // published test vector.
        check("", "qcbf29ce484222325");
        check("a", "qaf63dc4c8601ec8c");
        check("  a\n", "qaf63dc4c8601ec8c");
        let q = "SELECT * FROM todos WHERE list_id = 7";
        check("SELECT *\n  FROM todos\n  WHERE list_id = 7", &derive(q));
        assert_ne!(derive(q), derive("select * from todos where list_id = 7"));
        assert_ne!(derive(q), derive("SELECT * FROM todos WHERE list_id = 8"));
    }
}
