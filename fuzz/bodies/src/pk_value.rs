//! Target `pk_value`: cr-sqlite's packed primary keys and `Value`'s
//! encodings. The first byte picks the mode:
//!
//! - `0`: the rest is a packed key as a peer may send it. `unpack` never
//!   panics; when it succeeds `canonical` succeeds, equals `pack(unpack)`,
//!   unpacks to the same values and is idempotent; when it fails
//!   `canonical` fails too. Hex and serde forms round-trip.
//! - `1`: the rest describes a list of values (any storage class, any
//!   REAL bit pattern). `pack` fails only for more than 255 values; its
//!   output is canonical and unpacks to exactly the values.
//! - `2`: the rest is JSON for one `Value`. Decoding never panics; what
//!   decodes encodes to text that decodes to the bit-identical value and
//!   re-encodes to the same text; its SQL literal (`Display`) read back by
//!   SQLite is the same value.

use std::cell::RefCell;

use rusqlite::Connection;
use tenantsync_core::PackedPk;
use tenantsync_types::Value;

use crate::input::Input;
use crate::sql::{same_value, same_values};

/// The target's body.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => raw_key(rest),
        1 => values(rest),
        _ => value_json(rest),
    }
}

fn raw_key(bytes: &[u8]) {
    let pk = PackedPk(bytes.to_vec());
    assert_eq!(PackedPk::from_hex(&pk.to_hex()).as_ref(), Ok(&pk));
    let json = serde_json::to_string(&pk).expect("a key serialises");
    assert_eq!(
        serde_json::from_str::<PackedPk>(&json).ok().as_ref(),
        Some(&pk)
    );
    match pk.unpack() {
        Ok(vals) => {
            let canon = pk
                .canonical()
                .unwrap_or_else(|e| panic!("{pk:?} unpacks but has no canonical form: {e}"));
            let packed = PackedPk::pack(&vals)
                .unwrap_or_else(|e| panic!("{pk:?} unpacks to {vals:?}, which does not pack: {e}"));
            assert_eq!(canon, packed, "canonical != pack(unpack) for {pk:?}");
            let back = canon.unpack().expect("a canonical key unpacks");
            assert!(
                same_values(&back, &vals),
                "{pk:?} -> {vals:?}, canonical {canon:?} -> {back:?}"
            );
            assert_eq!(
                canon.canonical().as_ref(),
                Ok(&canon),
                "canonical is not idempotent"
            );
            assert!(
                canon.0.len() <= pk.0.len(),
                "canonical {canon:?} is longer than {pk:?}"
            );
        }
        Err(e) => {
            let _ = e.to_string();
            assert!(
                pk.canonical().is_err(),
                "{pk:?} does not unpack ({e}) but has a canonical form"
            );
        }
    }
}

fn values(bytes: &[u8]) {
    let mut input = Input::new(bytes);
    // Mostly short lists; sometimes more than a key can hold.
    let count = match input.byte() {
        255 => 250 + input.below(10),
        n => usize::from(n % 6),
    };
    let vals: Vec<Value> = (0..count).map(|_| input.value()).collect();
    match PackedPk::pack(&vals) {
        Ok(pk) => {
            assert!(count <= 255, "{count} values packed");
            let back = pk
                .unpack()
                .unwrap_or_else(|e| panic!("pack({vals:?}) = {pk:?} does not unpack: {e}"));
            assert!(
                same_values(&back, &vals),
                "pack/unpack changed {vals:?} into {back:?} ({pk:?})"
            );
            assert_eq!(pk.canonical().as_ref(), Ok(&pk), "pack is not canonical");
        }
        Err(e) => assert!(count > 255, "pack({vals:?}) failed: {e}"),
    }
}

thread_local! {
    static SQLITE: RefCell<Connection> =
        RefCell::new(Connection::open_in_memory().expect("open SQLite"));
}

fn value_json(bytes: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    let text = serde_json::to_string(&v)
        .unwrap_or_else(|e| panic!("{v:?} decoded but does not encode: {e}"));
    let back: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{v:?} encodes as {text}, which does not decode: {e}"));
    assert!(same_value(&back, &v), "{v:?} -> {text} -> {back:?}");
    assert_eq!(serde_json::to_string(&back).expect("encodes"), text);
    let literal = v.to_string();
    let read: Value = SQLITE.with(|c| {
        c.borrow()
            .query_row(&format!("SELECT {literal}"), [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("SQLite refuses the literal {literal} of {v:?}: {e}"))
    });
    assert!(
        same_value(&read, &v),
        "the literal {literal} of {v:?} reads back as {read:?}"
    );
}
