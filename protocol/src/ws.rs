//! WebSocket messages: one JSON object per text frame, tagged by `"type"`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tenantsync_types::{Change, SiteId};

use crate::change::{RowKey, array_list};
use crate::error::ErrorCode;

/// A message from a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    /// First message of a session.
    Hello {
        /// Protocol version (1).
        protocol: u32,
        /// The peer's cr-sqlite site id.
        site_id: SiteId,
        /// Free-form client name/version, for logs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<String>,
        /// The bearer token, when the upgrade request carried none (browsers
        /// cannot set headers on a WebSocket).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// The server schema version the replica has (0: none yet): the
        /// `welcome` then carries the migrations above it
        /// (docs/PROTOCOL.md §5.4).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        schema_version: Option<i64>,
    },
    /// Start (or resume) a subscription.
    Subscribe {
        /// Subscription id, chosen by the peer, unique per peer.
        id: String,
        /// `SELECT ... FROM <crr> [WHERE ...]`.
        query: String,
        /// The peer's cursor for this subscription when resuming.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<i64>,
    },
    /// Stop a subscription; the server forgets its cursor.
    Unsubscribe {
        /// Subscription id.
        id: String,
    },
    /// Ask for everything after `cursor` again (after a gap).
    Resync {
        /// Subscription id.
        sub: String,
        /// The peer's cursor.
        cursor: i64,
    },
    /// Acknowledge applied changes, per subscription.
    Ack {
        /// Subscription id -> server version applied and committed.
        cursors: BTreeMap<String, i64>,
    },
    /// Push the peer's own changes of its versions `(from, to]`.
    Push {
        /// Request id, echoed in the answer.
        id: String,
        /// Exclusive start of the peer's version range.
        from: i64,
        /// Inclusive end of the peer's version range.
        to: i64,
        /// Every change the peer authored in the range.
        #[serde(with = "array_list")]
        changes: Vec<Change>,
    },
    /// Liveness check.
    Ping {
        /// Echoed in the pong.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
}

/// What follows a `subscribed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscribeMode {
    /// A snapshot, then live changes.
    Snapshot,
    /// Changes after the cursor.
    Resume,
    /// The cursor is older than the server remembers: a snapshot with
    /// `reset`, then live changes.
    Refetch,
}

/// What the server knows of the peer (in `welcome`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's site id.
    pub site_id: SiteId,
    /// Highest of the peer's own versions held contiguously by the server.
    pub pushed_version: i64,
}

/// Limits the server enforces on this session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most subscriptions per connection.
    pub max_subscriptions: usize,
}

/// One subscription's part of a `changes` message: what changed for it in
/// `(from, version]`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SubPart {
    /// Exclusive start of the range this part covers.
    pub from: i64,
    /// Changes (deltas, whole rows entering, deletes).
    #[serde(default, with = "array_list", skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    /// Rows that left the subscription.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evict: Vec<RowKey>,
}

/// A row refused by a write policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedRow {
    /// The CRR.
    pub table: String,
    /// Packed pk (hex).
    pub pk: tenantsync_types::PackedPk,
    /// `INSERT`, `UPDATE` or `DELETE`.
    pub command: String,
    /// The policy that decided (a restrictive policy that failed, or the
    /// permissive ones none of which granted), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Why, in words.
    pub reason: String,
}

/// A refused push: nothing of it was applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushRefusal {
    /// Request id (the `push` message's; an HTTP push has none, and its
    /// refusal body has no `id`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// `policy_refused` (or another push error code).
    pub code: ErrorCode,
    /// Human-readable summary.
    pub message: String,
    /// The rows the write policies refused, with the reasons.
    pub rows: Vec<RefusedRow>,
    /// The server's current state (whole rows, with clocks) of every row
    /// the push touched that the peer may see (nothing of the push was
    /// applied).
    #[serde(with = "array_list")]
    pub state: Vec<Change>,
    /// The push's rows the peer may not see on the server (drop them).
    pub invisible: Vec<RowKey>,
    /// The peer's pushed_version, unchanged: the server does not hold the
    /// refused changes (docs/PROTOCOL.md §7).
    pub pushed_version: i64,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable message naming what was wrong.
    pub message: String,
    /// The request (or subscription) id this answers, if any.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// With `gap`: the server's pushed_version for the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_version: Option<i64>,
    /// With `rate_limited`: when to retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl ErrorMsg {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorMsg {
        ErrorMsg {
            code,
            message: message.into(),
            reference: None,
            pushed_version: None,
            retry_after_ms: None,
        }
    }

    /// The same error answering request `id`.
    pub fn with_ref(mut self, id: impl Into<String>) -> ErrorMsg {
        self.reference = Some(id.into());
        self
    }
}

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// Answer to `hello`.
    Welcome {
        /// Protocol version (1).
        protocol: u32,
        /// The server database's site id.
        server_site_id: SiteId,
        /// The server's current version.
        db_version: i64,
        /// What the server knows of the peer.
        peer: PeerInfo,
        /// Limits of this session.
        limits: Limits,
        /// The server's schema version: a replica behind it migrates
        /// before it subscribes (docs/PROTOCOL.md §5.4).
        #[serde(default = "crate::http::first_schema_version")]
        schema_version: i64,
        /// With the hello's `schema_version` below the server's: the
        /// migrations above it, oldest first.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        migrations: Vec<crate::http::SchemaMigration>,
    },
    /// Answer to `subscribe` / `resync`.
    Subscribed {
        /// Subscription id.
        id: String,
        /// The CRR.
        table: String,
        /// Delivered columns, in table order.
        columns: Vec<String>,
        /// Primary-key columns, in pk order.
        pk: Vec<String>,
        /// The view key (shared by subscriptions with equal effective queries).
        view: String,
        /// What follows.
        mode: SubscribeMode,
        /// With `resume`: the cursor the changes start from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<i64>,
    },
    /// A chunk of a subscription's initial sync (after `subscribed` or
    /// `resync`): a snapshot, a refetch or a resume catch-up, consistent
    /// with one server version. The client applies the chunks of one sync
    /// together, at the `last` one.
    Snapshot {
        /// Subscription id.
        sub: String,
        /// The server version the sync is consistent with; the
        /// subscription's cursor after the last chunk.
        version: i64,
        /// At the last chunk, drop the subscription's rows that no chunk of
        /// this sync delivered (snapshot and refetch: true; resume: false).
        reset: bool,
        /// Whole rows (and, in a resume, the changes of held rows and the
        /// deletes since the cursor).
        #[serde(with = "array_list")]
        changes: Vec<Change>,
        /// Rows that left the subscription since the cursor (resume only).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        evict: Vec<RowKey>,
        /// Last chunk of this sync: the subscription is live after it.
        last: bool,
    },
    /// Deltas for several subscriptions up to one version: the checkpoint.
    Changes {
        /// Every part covers `(part.from, version]`.
        version: i64,
        /// Subscription id -> its part.
        subs: BTreeMap<String, SubPart>,
        /// More messages for the same `version` follow (a checkpoint too
        /// large for one message); apply them together with the one that
        /// has `more` false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
    },
    /// Answer to `unsubscribe`.
    Unsubscribed {
        /// Subscription id.
        id: String,
    },
    /// A push was applied.
    PushOk {
        /// Request id.
        id: String,
        /// The peer's pushed_version after it.
        pushed_version: i64,
        /// The server version the push committed in (0 for a duplicate).
        server_version: i64,
    },
    /// A push was refused whole.
    PushRefused(PushRefusal),
    /// The server's schema changed: the client runs `migrations` on its
    /// replica before it applies any later message (docs/PROTOCOL.md
    /// §5.4).
    Schema {
        /// The new schema version.
        schema_version: i64,
        /// The new version's migration.
        migrations: Vec<crate::http::SchemaMigration>,
    },
    /// Answer to `ping`.
    Pong {
        /// Echo of the ping's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// An error.
    Error(ErrorMsg),
}

/// Builds the JSON text of a `changes` message from parts whose changes are
/// already encoded (see [`crate::change::encode_change`]), so that a fan-out
/// encodes each change once however many peers receive it. Parts must be
/// added in increasing subscription-id order (as `BTreeMap` iterates).
pub struct ChangesMessageBuilder {
    out: String,
    parts: usize,
}

impl ChangesMessageBuilder {
    /// The length of the text so far, in bytes (to split messages before
    /// they reach the size limit).
    pub fn len(&self) -> usize {
        self.out.len()
    }

    /// Whether no part was added yet.
    pub fn is_empty(&self) -> bool {
        self.parts == 0
    }

    /// The message text, marked `more` (another message of the same version
    /// follows).
    pub fn finish_more(mut self) -> String {
        self.out.push_str(r#"},"more":true}"#);
        self.out
    }
}

impl ChangesMessageBuilder {
    /// Starts a message up to `version`.
    pub fn new(version: i64) -> ChangesMessageBuilder {
        ChangesMessageBuilder {
            out: format!(r#"{{"type":"changes","version":{version},"subs":{{"#),
            parts: 0,
        }
    }

    /// Adds one subscription's part.
    pub fn part<'a>(
        &mut self,
        sub: &str,
        from: i64,
        encoded_changes: impl IntoIterator<Item = &'a str>,
        evict: &[RowKey],
    ) -> &mut Self {
        if self.parts > 0 {
            self.out.push(',');
        }
        self.parts += 1;
        crate::change::push_json_str(sub, &mut self.out);
        self.out.push_str(&format!(r#":{{"from":{from}"#));
        let mut changes = encoded_changes.into_iter().peekable();
        if changes.peek().is_some() {
            self.out.push_str(r#","changes":"#);
            crate::change::join_encoded(changes, &mut self.out);
        }
        if !evict.is_empty() {
            self.out.push_str(r#","evict":"#);
            self.out
                .push_str(&serde_json::to_string(evict).expect("row keys serialise"));
        }
        self.out.push('}');
        self
    }

    /// The message text.
    pub fn finish(mut self) -> String {
        self.out.push_str("}}");
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::encode_change;
    use tenantsync_types::PackedPk;
    use tenantsync_types::Value;

    fn change(cid: &str, val: Value) -> Change {
        Change {
            table: "todos".into(),
            pk: PackedPk(vec![1, 9, 7]),
            cid: cid.into(),
            val,
            col_version: 1,
            db_version: 12,
            site_id: SiteId([7; 16]),
            cl: 1,
            seq: 0,
        }
    }

    #[track_caller]
    fn check_client(json: &str, expected: ClientMsg) {
        let parsed: ClientMsg = serde_json::from_str(json).unwrap();
        assert_eq!(parsed, expected);
        let again: ClientMsg =
            serde_json::from_str(&serde_json::to_string(&parsed).unwrap()).unwrap();
        assert_eq!(again, expected);
    }

    #[test]
    fn client_messages_read_as_the_spec_writes_them() {
        let site = SiteId([0x11; 16]);
        check_client(
            r#"{"type":"hello","protocol":1,"site_id":"11111111111111111111111111111111"}"#,
            ClientMsg::Hello {
                protocol: 1,
                site_id: site,
                client: None,
                token: None,
                schema_version: None,
            },
        );
        check_client(
            r#"{"type":"subscribe","id":"s","query":"SELECT * FROM todos","cursor":5}"#,
            ClientMsg::Subscribe {
                id: "s".into(),
                query: "SELECT * FROM todos".into(),
                cursor: Some(5),
            },
        );
        check_client(
            r#"{"type":"ack","cursors":{"a":1,"b":2}}"#,
            ClientMsg::Ack {
                cursors: [("a".to_owned(), 1), ("b".to_owned(), 2)].into(),
            },
        );
        check_client(
            r#"{"type":"push","id":"p","from":0,"to":1,"changes":[["todos","010907","title","x",1,12,"07070707070707070707070707070707",1,0]]}"#,
            ClientMsg::Push {
                id: "p".into(),
                from: 0,
                to: 1,
                changes: vec![change("title", Value::Text("x".into()))],
            },
        );
        check_client(
            r#"{"type":"resync","sub":"s","cursor":3}"#,
            ClientMsg::Resync {
                sub: "s".into(),
                cursor: 3,
            },
        );
        check_client(
            r#"{"type":"unsubscribe","id":"s"}"#,
            ClientMsg::Unsubscribe { id: "s".into() },
        );
        check_client(r#"{"type":"ping"}"#, ClientMsg::Ping { id: None });
    }

    #[track_caller]
    fn check_bad(json: &str, expected: &str) {
        let err = serde_json::from_str::<ClientMsg>(json)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{json}: {err}");
    }

    #[test]
    fn bad_client_messages_say_what_is_wrong() {
        check_bad(r#"{"type":"launch"}"#, "unknown variant `launch`");
        check_bad(r#"{"type":"subscribe","id":"s"}"#, "missing field `query`");
        check_bad(
            r#"{"type":"subscribe","id":1,"query":"x"}"#,
            "invalid type: integer `1`",
        );
        check_bad(r#"{"type":"ping","extra":1}"#, "unknown field `extra`");
        check_bad(r#"{"query":"x"}"#, "missing field `type`");
    }

    #[test]
    fn the_builder_writes_what_serde_reads() {
        let c1 = change("title", Value::Text("a \"quoted\" title".into()));
        let c2 = change("done", Value::Integer(1));
        let encoded: Vec<String> = [&c1, &c2]
            .iter()
            .map(|c| {
                let mut s = String::new();
                encode_change(c, &mut s);
                s
            })
            .collect();
        let evict = vec![RowKey {
            table: "todos".into(),
            pk: PackedPk(vec![1, 9, 8]),
        }];
        let mut b = ChangesMessageBuilder::new(20);
        b.part("a\"b", 12, encoded.iter().map(String::as_str), &[]);
        b.part("quiet", 15, std::iter::empty(), &[]);
        b.part("z", 12, std::iter::empty(), &evict);
        let text = b.finish();
        let msg: ServerMsg = serde_json::from_str(&text).unwrap();
        let expected = ServerMsg::Changes {
            version: 20,
            subs: [
                (
                    "a\"b".to_owned(),
                    SubPart {
                        from: 12,
                        changes: vec![c1, c2],
                        evict: vec![],
                    },
                ),
                (
                    "quiet".to_owned(),
                    SubPart {
                        from: 15,
                        changes: vec![],
                        evict: vec![],
                    },
                ),
                (
                    "z".to_owned(),
                    SubPart {
                        from: 12,
                        changes: vec![],
                        evict,
                    },
                ),
            ]
            .into(),
            more: false,
        };
        assert_eq!(msg, expected);
        assert_eq!(serde_json::to_string(&expected).unwrap(), text);
    }

    #[test]
    fn server_errors_carry_their_reference() {
        let e = ServerMsg::Error(
            ErrorMsg::new(ErrorCode::Gap, "push starts at 9, server holds 4").with_ref("p1"),
        );
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"type":"error","code":"gap","message":"push starts at 9, server holds 4","ref":"p1"}"#
        );
        assert_eq!(serde_json::from_str::<ServerMsg>(&json).unwrap(), e);
    }
}
