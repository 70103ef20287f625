//! Target `protocol_decode`: arbitrary bytes as JSON into every message of
//! the protocol, both directions (`ClientMsg`, `ServerMsg`, every HTTP
//! request and response body, change lists, row keys).
//!
//! Properties, for each type:
//! - decoding never panics (a bad message is an error, whatever it holds);
//! - whatever decodes encodes again, and that text decodes to an equal
//!   value and encodes to the same text (one canonical form: nothing a peer
//!   sends changes meaning on a second hop);
//! - a `changes` message re-built with the server's fast encoder
//!   (`ChangesMessageBuilder`, `encode_change`) is exactly serde's text.

use std::fmt::Debug;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tenantsync_protocol::change::encode_change;
use tenantsync_protocol::http::{
    ErrorBody, PolicyReloadRequest, PolicyReloadResponse, PullRequest, PullResponse, PushRequest,
    PushResponse, SchemaResponse, SqlRequest, SqlResponse,
};
use tenantsync_protocol::ws::ChangesMessageBuilder;
use tenantsync_protocol::{ClientMsg, RowKey, ServerMsg, WireChanges};

/// The target's body.
pub fn run(data: &[u8]) {
    check::<ClientMsg>(data);
    if let Some(msg) = check::<ServerMsg>(data) {
        check_builder(&msg);
    }
    check::<PushRequest>(data);
    check::<PushResponse>(data);
    check::<PullRequest>(data);
    check::<PullResponse>(data);
    check::<SchemaResponse>(data);
    check::<SqlRequest>(data);
    check::<SqlResponse>(data);
    check::<PolicyReloadRequest>(data);
    check::<PolicyReloadResponse>(data);
    check::<ErrorBody>(data);
    check::<WireChanges>(data);
    check::<Vec<RowKey>>(data);
}

/// Decodes `data` as a `T`; when it decodes, checks the round trip and
/// returns the value.
fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) -> Option<T> {
    let name = std::any::type_name::<T>();
    let value: T = serde_json::from_slice(data).ok()?;
    let text = serde_json::to_string(&value)
        .unwrap_or_else(|e| panic!("{name} decoded but does not encode: {e}\n{value:?}"));
    let back: T = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("{name}: its own encoding does not decode: {e}\ntext: {text}\nvalue: {value:?}")
    });
    assert_eq!(back, value, "{name}: decode(encode(v)) != v\ntext: {text}");
    let again = serde_json::to_string(&back).expect("encodes once, encodes twice");
    assert_eq!(again, text, "{name}: encoding is not stable");
    Some(value)
}

/// The server writes `changes` messages with the builder; clients read them
/// with serde: both must be the same text.
fn check_builder(msg: &ServerMsg) {
    let ServerMsg::Changes {
        version,
        subs,
        more,
    } = msg
    else {
        return;
    };
    let mut b = ChangesMessageBuilder::new(*version);
    for (id, part) in subs {
        let encoded: Vec<String> = part
            .changes
            .iter()
            .map(|c| {
                let mut s = String::new();
                encode_change(c, &mut s);
                s
            })
            .collect();
        b.part(
            id,
            part.from,
            encoded.iter().map(String::as_str),
            &part.evict,
        );
    }
    let built = if *more { b.finish_more() } else { b.finish() };
    let serde = serde_json::to_string(msg).expect("a changes message encodes");
    assert_eq!(built, serde, "the builder and serde write different text");
}
