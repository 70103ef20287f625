//! [`ShardLog`]: a shard's log, one JetStream stream per shard (subject
//! `tenantsync.<cluster>.shard.<k>`), the truth of the shard in a cluster.
//! Each entry is one commit of the shard (a changeset, [`Kind::Changeset`]),
//! the shard's database whole ([`Kind::Image`], the first entry), or an
//! owner's claim ([`Kind::Claim`], which fences the owner before it). An
//! append names the sequence it must follow: one that does not is refused
//! ([`LogError::Fenced`]), so two owners can never both extend the log.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::Publish, stream};
use bytes::Bytes;
use futures_util::StreamExt;

/// What an entry holds (its `Tenantsync-Kind` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The shard's database file, whole: where a copy starts.
    Image,
    /// One commit's row changes (`cluster::changeset`).
    Changeset,
    /// A node taking the shard over (JSON `{"node", "term"}`): every
    /// append before it is the old owner's, none after it.
    Claim,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Image => "image",
            Kind::Changeset => "changeset",
            Kind::Claim => "claim",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        [Kind::Image, Kind::Changeset, Kind::Claim]
            .into_iter()
            .find(|k| k.name() == s)
    }
}

const KIND_HEADER: &str = "Tenantsync-Kind";

/// One entry of a shard's log.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub kind: Kind,
    pub payload: Bytes,
}

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log grew past the sequence the append expected: another node
    /// appended (this one is no longer the shard's owner, or is behind).
    #[error("shard {shard}: the log is past sequence {expected}; another node owns the shard")]
    Fenced { shard: usize, expected: u64 },
    #[error("shard {shard}: the log is unavailable: {reason}")]
    Unavailable { shard: usize, reason: String },
    #[error("shard {shard}: log entry {seq} is malformed: {reason}")]
    Malformed {
        shard: usize,
        seq: u64,
        reason: String,
    },
}

/// A shard's log on a JetStream server (or cluster of them).
#[derive(Clone)]
pub struct ShardLog {
    js: jetstream::Context,
    shard: usize,
    stream: String,
    subject: String,
}

/// How long an append waits for JetStream before it fails (the write is
/// then refused; a client retries).
pub const APPEND_TIMEOUT: Duration = Duration::from_secs(5);

impl ShardLog {
    /// The stream of shard `shard` of cluster `cluster`, created when
    /// missing with `replicas` copies (1 to 5; a JetStream cluster of 3
    /// keeps every acknowledged entry when one of its servers is lost).
    pub async fn open(
        js: &jetstream::Context,
        cluster: &str,
        shard: usize,
        replicas: usize,
    ) -> Result<ShardLog, LogError> {
        let stream = format!("TENANTSYNC_{}_SHARD_{shard}", cluster.to_uppercase());
        let subject = format!("tenantsync.{cluster}.shard.{shard}");
        js.get_or_create_stream(stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            num_replicas: replicas.clamp(1, 5),
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::New,
            allow_direct: true,
            ..Default::default()
        })
        .await
        .map_err(|e| LogError::Unavailable {
            shard,
            reason: format!("cannot open stream {stream}: {e}"),
        })?;
        Ok(ShardLog {
            js: js.clone(),
            shard,
            stream,
            subject,
        })
    }

    /// The shard's index.
    pub fn shard(&self) -> usize {
        self.shard
    }

    fn unavailable(&self, what: &str, e: impl std::fmt::Display) -> LogError {
        LogError::Unavailable {
            shard: self.shard,
            reason: format!("{what}: {e}"),
        }
    }

    /// The sequence of the last entry (0: an empty log).
    pub async fn last_seq(&self) -> Result<u64, LogError> {
        let mut s = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| self.unavailable("stream info", e))?;
        let info = s
            .info()
            .await
            .map_err(|e| self.unavailable("stream info", e))?;
        Ok(info.state.last_sequence)
    }

    /// Appends an entry that must follow `expected` (the last sequence this
    /// node applied): its sequence, once JetStream stored it (on a quorum
    /// of its replicas).
    pub async fn append(&self, expected: u64, kind: Kind, payload: Bytes) -> Result<u64, LogError> {
        let mut headers = HeaderMap::new();
        headers.insert(KIND_HEADER, kind.name());
        let publish = Publish::build()
            .payload(payload)
            .headers(headers)
            .expected_last_sequence(expected);
        let sent = async {
            let ack = self
                .js
                .send_publish(self.subject.clone(), publish)
                .await?
                .await?;
            Ok::<_, jetstream::context::PublishError>(ack)
        };
        match tokio::time::timeout(APPEND_TIMEOUT, sent).await {
            Err(_) => Err(self.unavailable("append", "no answer from JetStream in time")),
            Ok(Ok(ack)) => Ok(ack.sequence),
            Ok(Err(e)) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Err(LogError::Fenced {
                    shard: self.shard,
                    expected,
                })
            }
            Ok(Err(e)) => Err(self.unavailable("append", e)),
        }
    }

    fn entry(
        &self,
        seq: u64,
        headers: Option<&HeaderMap>,
        payload: Bytes,
    ) -> Result<Entry, LogError> {
        let kind = headers
            .and_then(|h| h.get(KIND_HEADER))
            .and_then(|v| Kind::parse(v.as_str()))
            .ok_or_else(|| LogError::Malformed {
                shard: self.shard,
                seq,
                reason: format!("no valid {KIND_HEADER} header"),
            })?;
        Ok(Entry { seq, kind, payload })
    }

    /// Entry `seq`.
    pub async fn get(&self, seq: u64) -> Result<Entry, LogError> {
        let s = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| self.unavailable("stream", e))?;
        let m = s
            .get_raw_message(seq)
            .await
            .map_err(|e| self.unavailable(&format!("entry {seq}"), e))?;
        self.entry(m.sequence, Some(&m.headers), m.payload)
    }

    /// The entries from `from` on, in order, as they are appended (an
    /// ordered consumer: a gap is re-fetched by the client library).
    pub async fn tail(
        &self,
        from: u64,
    ) -> Result<impl futures_util::Stream<Item = Result<Entry, LogError>> + use<>, LogError> {
        let s = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| self.unavailable("stream", e))?;
        let consumer = s
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: self.subject.clone(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| self.unavailable("consumer", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| self.unavailable("consumer", e))?;
        let me = self.clone();
        Ok(messages.map(move |m| {
            let m = m.map_err(|e| me.unavailable("tail", e))?;
            let seq = m
                .info()
                .map_err(|e| me.unavailable("tail", e))?
                .stream_sequence;
            me.entry(seq, m.headers.as_ref(), m.payload.clone())
        }))
    }
}
