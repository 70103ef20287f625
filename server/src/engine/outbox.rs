//! The per-connection outbox: a bounded queue of frames (answers, sync
//! chunks) and whole-commit items, drained by the WebSocket writer through
//! [`crate::Outbox`]. Consecutive items are coalesced into one `changes`
//! checkpoint (docs/arch/server.md, "Outbox and the `changes` checkpoint"),
//! with echo filtering and splitting at the message limit done here, on
//! changes that were JSON-encoded once by the engine.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tenantsync_core::{Change, PackedPk, SiteId};
use tenantsync_protocol::RowKey;
use tenantsync_protocol::change::encode_change;
use tenantsync_protocol::ws::ChangesMessageBuilder;
use tokio::sync::Notify;

use crate::contract::OutFrame;

/// One change, encoded once.
#[derive(Debug)]
pub(crate) struct Enc {
    /// The change's wire JSON (a 9-element array).
    pub json: Box<str>,
    /// Its author, for echo filtering.
    pub site: SiteId,
}

impl Enc {
    pub fn new(c: &Change) -> Enc {
        let mut json = String::with_capacity(96);
        encode_change(c, &mut json);
        Enc {
            json: json.into_boxed_str(),
            site: c.site_id,
        }
    }
}

/// Changes of one row: the commit's changes of it, or its whole state.
#[derive(Debug)]
pub(crate) struct RowChanges {
    pub table: Arc<str>,
    pub pk: PackedPk,
    pub changes: Vec<Enc>,
}

impl RowChanges {
    pub fn bytes(&self) -> usize {
        self.changes.iter().map(|e| e.json.len() + 1).sum()
    }
}

/// What one view (or one moved subscription) gets for one version: computed
/// once, shared by every subscription of the view.
#[derive(Debug, Default)]
pub(crate) struct ViewPart {
    pub version: i64,
    /// The commit's changes of rows that stay in the view (echo-filtered).
    pub deltas: Vec<Arc<RowChanges>>,
    /// Rows that entered: every clock (never echo-filtered).
    pub entered: Vec<Arc<RowChanges>>,
    /// Held rows that were deleted: the delete (echo-filtered).
    pub deleted: Vec<Arc<RowChanges>>,
    /// Held rows that left the view.
    pub left: Vec<RowKey>,
    /// Approximate encoded size.
    pub bytes: usize,
}

impl ViewPart {
    pub fn finish(mut self) -> ViewPart {
        self.bytes = self
            .deltas
            .iter()
            .chain(&self.entered)
            .chain(&self.deleted)
            .map(|r| r.bytes())
            .sum::<usize>()
            + self
                .left
                .iter()
                .map(|k| k.pk.0.len() * 2 + 32)
                .sum::<usize>();
        self
    }

    /// Whether it changes which rows a subscription holds.
    pub fn moves_rows(&self) -> bool {
        !(self.entered.is_empty() && self.deleted.is_empty() && self.left.is_empty())
    }
}

/// One subscription's share of an item.
#[derive(Debug, Clone)]
pub(crate) struct ItemPart {
    pub sub: Arc<str>,
    /// The subscription's cursor before this part.
    pub from: i64,
    pub part: Arc<ViewPart>,
}

/// Everything one connection gets for one commit (or a catch-up): every
/// subscription mentioned has everything up to `version`.
#[derive(Debug)]
pub(crate) struct Item {
    pub version: i64,
    pub parts: Vec<ItemPart>,
    pub committed: Instant,
    pub bytes: usize,
}

enum Entry {
    Frame(OutFrame, usize),
    Item(Item),
}

struct Queue {
    entries: VecDeque<Entry>,
    items: usize,
    bytes: usize,
    closed: bool,
}

/// The shared side of an outbox (engine, readers and the session push;
/// [`crate::Outbox`] pops).
pub(crate) struct OutboxShared {
    q: Mutex<Queue>,
    notify: Notify,
    /// Signalled when the queue drops to `max_bytes` or below (the
    /// session reads the peer's next message only then).
    room: Notify,
    /// The peer's site (echo filtering).
    pub site: SiteId,
    pub max_message_bytes: usize,
    pub max_items: usize,
    pub max_bytes: usize,
    /// Set by the engine when it stopped queueing for this connection;
    /// cleared (and the engine told) once the queue drained.
    pub lagging: AtomicBool,
    /// Set when the queue drained below half while lagging: the engine
    /// catches up the connection's subscriptions.
    drained_hook: Mutex<Option<Box<dyn Fn() + Send>>>,
}

impl OutboxShared {
    pub fn new(site: SiteId, max_message_bytes: usize, max_items: usize, max_bytes: usize) -> Self {
        OutboxShared {
            q: Mutex::new(Queue {
                entries: VecDeque::new(),
                items: 0,
                bytes: 0,
                closed: false,
            }),
            notify: Notify::new(),
            room: Notify::new(),
            site,
            max_message_bytes,
            max_items,
            max_bytes,
            lagging: AtomicBool::new(false),
            drained_hook: Mutex::new(None),
        }
    }

    pub fn set_drained_hook(&self, f: Box<dyn Fn() + Send>) {
        *self.drained_hook.lock().expect("outbox hook lock") = Some(f);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a frame whatever the bounds: answers to the peer's messages,
    /// bounded because the session reads the next message only once the
    /// queue is within `max_bytes` again ([`OutboxShared::room`]).
    pub fn push_frame(&self, f: OutFrame) {
        let n = match &f {
            OutFrame::Text(t) => t.len(),
            OutFrame::Close { .. } => 0,
        };
        {
            let mut q = self.lock();
            if q.closed {
                return;
            }
            if matches!(f, OutFrame::Close { .. }) {
                q.closed = true;
            }
            q.bytes += n;
            q.entries.push_back(Entry::Frame(f, n));
        }
        self.notify.notify_one();
        if self.is_closed() {
            self.room.notify_waiters();
        }
    }

    /// Queues a text frame if the queue has room for it (sync chunks);
    /// `false` when full.
    pub fn try_push_text(&self, text: String) -> bool {
        let n = text.len();
        {
            let mut q = self.lock();
            if q.closed {
                return true;
            }
            if q.bytes > 0 && q.bytes + n > self.max_bytes {
                return false;
            }
            q.bytes += n;
            q.entries.push_back(Entry::Frame(OutFrame::Text(text), n));
        }
        self.notify.notify_one();
        true
    }

    /// Queues a commit item if there is room; `false` when the connection
    /// must count as lagging.
    pub fn try_push_item(&self, item: Item) -> Result<(), Item> {
        {
            let mut q = self.lock();
            if q.closed {
                return Ok(());
            }
            if q.items >= self.max_items || (q.bytes > 0 && q.bytes + item.bytes > self.max_bytes) {
                return Err(item);
            }
            q.items += 1;
            q.bytes += item.bytes;
            q.entries.push_back(Entry::Item(item));
        }
        self.notify.notify_one();
        Ok(())
    }

    /// Queued bytes.
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Waits until the queue holds at most `max_bytes` (or is closed): a
    /// peer that sends without reading its answers (pings, bad messages,
    /// pushes) is read no further until it reads, and the socket's write
    /// timeout ends it if it never does.
    pub async fn room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let q = self.lock();
                if q.closed || q.bytes <= self.max_bytes {
                    return;
                }
            }
            notified.await;
        }
    }

    fn after_pop(&self, bytes_left: usize) {
        if bytes_left <= self.max_bytes {
            self.room.notify_waiters();
        }
        if bytes_left <= self.max_bytes / 2
            && self.lagging.swap(false, Ordering::AcqRel)
            && let Some(f) = self.drained_hook.lock().expect("outbox hook lock").as_ref()
        {
            f();
        }
    }
}

/// The draining side, owned by [`crate::Outbox`].
pub(crate) struct Drain {
    pub shared: Arc<OutboxShared>,
    ready: VecDeque<OutFrame>,
    /// Commit instants of the last yielded `changes` frame (latency).
    yielded: Vec<Instant>,
    done: bool,
}

impl Drain {
    pub fn new(shared: Arc<OutboxShared>) -> Drain {
        Drain {
            shared,
            ready: VecDeque::new(),
            yielded: Vec::new(),
            done: false,
        }
    }

    pub async fn next(&mut self) -> Option<OutFrame> {
        if self.done {
            return None;
        }
        loop {
            if let Some(f) = self.ready.pop_front() {
                if matches!(f, OutFrame::Close { .. }) {
                    self.done = true;
                }
                return Some(f);
            }
            if self.fill() {
                continue;
            }
            self.shared.notify.notified().await;
        }
    }

    /// Moves the next frame(s) into `ready`; false when the queue is empty.
    fn fill(&mut self) -> bool {
        let mut items = Vec::new();
        let left;
        {
            let mut q = self.shared.lock();
            match q.entries.front() {
                None => return false,
                Some(Entry::Frame(..)) => {
                    let Some(Entry::Frame(f, n)) = q.entries.pop_front() else {
                        unreachable!()
                    };
                    q.bytes -= n;
                    left = q.bytes;
                    drop(q);
                    self.ready.push_back(f);
                    self.shared.after_pop(left);
                    return true;
                }
                Some(Entry::Item(_)) => {}
            }
            let mut bytes = 0;
            while let Some(Entry::Item(it)) = q.entries.front() {
                // Coalesce up to a few messages' worth.
                if !items.is_empty() && bytes + it.bytes > self.shared.max_message_bytes * 4 {
                    break;
                }
                bytes += it.bytes;
                let Some(Entry::Item(it)) = q.entries.pop_front() else {
                    unreachable!()
                };
                q.items -= 1;
                q.bytes -= it.bytes;
                items.push(it);
            }
            left = q.bytes;
        }
        self.shared.after_pop(left);
        self.yielded = items.iter().map(|i| i.committed).collect();
        for text in build_changes(&items, &self.shared.site, self.shared.max_message_bytes) {
            self.ready.push_back(OutFrame::Text(text));
        }
        metrics::counter!("tenantsync_deliveries_total").increment(items.len() as u64);
        true
    }

    pub fn written(&mut self) {
        if self.ready.is_empty() {
            let h = metrics::histogram!("tenantsync_delivery_seconds");
            for t in self.yielded.drain(..) {
                h.record(t.elapsed().as_secs_f64());
            }
        }
    }
}

struct Agg<'a> {
    from: i64,
    changes: Vec<&'a str>,
    evict: Vec<RowKey>,
}

/// Builds the `changes` message(s) of consecutive items: one checkpoint at
/// the last item's version, split into messages under `max` bytes (all but
/// the last marked `more`).
pub(crate) fn build_changes(items: &[Item], me: &SiteId, max: usize) -> Vec<String> {
    let Some(last) = items.last() else {
        return Vec::new();
    };
    let version = last.version;
    let mut subs: BTreeMap<&str, Agg<'_>> = BTreeMap::new();
    for it in items {
        for p in &it.parts {
            let agg = subs.entry(&p.sub).or_insert_with(|| Agg {
                from: p.from,
                changes: Vec::new(),
                evict: Vec::new(),
            });
            let vp = &p.part;
            for r in &vp.entered {
                if !agg.evict.is_empty() {
                    agg.evict
                        .retain(|k| !(k.pk == r.pk && *k.table == *r.table));
                }
                agg.changes.extend(r.changes.iter().map(|e| &*e.json));
            }
            for r in vp.deltas.iter().chain(&vp.deleted) {
                agg.changes
                    .extend(r.changes.iter().filter(|e| e.site != *me).map(|e| &*e.json));
            }
            agg.evict.extend(vp.left.iter().cloned());
        }
    }
    let mut out = Vec::new();
    let mut b = ChangesMessageBuilder::new(version);
    let flush = |b: &mut ChangesMessageBuilder, out: &mut Vec<String>| {
        out.push(std::mem::replace(b, ChangesMessageBuilder::new(version)).finish_more());
    };
    for (sub, agg) in subs {
        let mut rest = agg.changes.as_slice();
        loop {
            let room = max.saturating_sub(b.len() + 48 + sub.len());
            let (mut take, mut size) = (0, 0);
            while take < rest.len() && size + rest[take].len() < room {
                size += rest[take].len() + 1;
                take += 1;
            }
            if take == 0 && !rest.is_empty() {
                if !b.is_empty() {
                    flush(&mut b, &mut out);
                    continue;
                }
                // One change larger than the limit: it goes alone.
                take = 1;
            }
            let done = take == rest.len();
            let evict: &[RowKey] = if done { &agg.evict } else { &[] };
            b.part(sub, agg.from, rest[..take].iter().copied(), evict);
            rest = &rest[take..];
            if done {
                break;
            }
            flush(&mut b, &mut out);
        }
    }
    out.push(b.finish());
    out
}
