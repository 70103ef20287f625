//! What the load clients and drivers count, shared by every task: the
//! current phase, write and delivery counters, latency samples (per phase,
//! quiet tenants and the noisy one apart), snapshot rows, sync modes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

/// The phases, in run order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Connecting, subscribing, initial syncs.
    Snapshot = 0,
    /// Every tenant at its share of the rate.
    Steady = 1,
    /// The same, plus one tenant flooding.
    Noisy = 2,
    /// A share of the clients drop and resume from their cursors, under
    /// the steady load.
    Reconnect = 3,
    /// A policy reload (`POST /v1/admin/policy`) under the steady load.
    Reload = 4,
    /// Writes stopped; waiting for quiescence.
    Settle = 5,
}

/// Number of phases with their own counters.
pub const PHASES: usize = 6;

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
    /// Number of samples.
    pub samples: usize,
}

impl Percentiles {
    /// Percentiles of samples in microseconds (sorts them).
    pub fn of(samples: &mut [u32]) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            f64::from(samples[i]) / 1000.0
        };
        Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: f64::from(samples[samples.len() - 1]) / 1000.0,
            samples: samples.len(),
        }
    }
}

/// Counters of one phase.
#[derive(Default)]
pub struct PhaseCounters {
    /// Writes issued (pushes sent, service requests sent).
    pub issued: AtomicU64,
    /// Writes the server accepted (push_ok with a version, service 200).
    pub accepted: AtomicU64,
    /// Writes refused for good (errors other than rate_limited and gap).
    pub refused: AtomicU64,
    /// `rate_limited` answers (the write is retried after the delay).
    pub rate_limited: AtomicU64,
    /// Writes of the noisy tenant accepted.
    pub noisy_accepted: AtomicU64,
    /// Rows received in initial syncs (snapshot, resume, refetch chunks).
    pub sync_rows: AtomicU64,
    /// Writes the load generator could not issue in time (its own queue
    /// full): load it did not offer.
    pub dropped: AtomicU64,
    /// Deliveries of tagged writes to clients (one per client and write).
    pub deliveries: AtomicU64,
    /// `changes` messages received.
    pub messages: AtomicU64,
    /// Gaps seen (a part starting after the cursor: resync).
    pub gaps: AtomicU64,
}

/// Everything shared.
pub struct Stats {
    /// The run's one clock.
    pub start: Instant,
    phase: AtomicU8,
    /// When each phase started (ns on the run clock; 0 = not yet).
    phase_start: [AtomicU64; PHASES],
    /// The noisy tenant's index (`usize::MAX`: none).
    noisy: std::sync::atomic::AtomicUsize,
    /// Write ids handed out.
    writes: AtomicU64,
    /// Reconnect storm: time from drop to every subscription live (µs).
    resume: Mutex<Vec<u32>>,
    /// Per phase.
    pub phases: [PhaseCounters; PHASES],
    /// Latency samples (µs) per phase: quiet tenants, noisy tenant.
    latency: [Mutex<(Vec<u32>, Vec<u32>)>; PHASES],
    /// Subscriptions whose last sync chunk arrived (live), ever.
    pub syncs_done: AtomicU64,
    /// `subscribed` answers by mode: snapshot, resume, refetch.
    pub modes: [AtomicU64; 3],
    /// Sessions opened (welcome received), ever.
    pub sessions: AtomicU64,
    /// Connection attempts that failed.
    pub connect_errors: AtomicU64,
    /// Error messages received that were not about a push.
    pub errors: AtomicU64,
    /// The last few error messages (for the report).
    pub error_samples: Mutex<Vec<String>>,
    /// Nanoseconds (on the run clock) of the last data-bearing message any
    /// client received.
    pub last_data_ns: AtomicU64,
    /// When the schema change was posted (ns on the run clock; 0: not yet).
    schema_posted_ns: AtomicU64,
    /// Per `schema` message received: µs since the post.
    schema: Mutex<Vec<u32>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            start: Instant::now(),
            phase: AtomicU8::new(0),
            phase_start: Default::default(),
            noisy: std::sync::atomic::AtomicUsize::new(usize::MAX),
            writes: AtomicU64::new(0),
            resume: Mutex::new(Vec::new()),
            phases: Default::default(),
            latency: Default::default(),
            syncs_done: AtomicU64::new(0),
            modes: Default::default(),
            sessions: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            error_samples: Mutex::new(Vec::new()),
            last_data_ns: AtomicU64::new(0),
            schema_posted_ns: AtomicU64::new(0),
            schema: Mutex::new(Vec::new()),
        }
    }
}

impl Stats {
    /// Nanoseconds since the run started.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Snapshot,
            1 => Phase::Steady,
            2 => Phase::Noisy,
            3 => Phase::Reconnect,
            4 => Phase::Reload,
            _ => Phase::Settle,
        }
    }

    /// Enters a phase.
    pub fn set_phase(&self, p: Phase) {
        self.phase_start[p as usize].store(self.now_ns().max(1), Ordering::Release);
        self.phase.store(p as u8, Ordering::Release);
    }

    /// The phase that was current at `ns`.
    pub fn phase_at(&self, ns: u64) -> usize {
        (0..PHASES)
            .rev()
            .find(|&p| {
                let s = self.phase_start[p].load(Ordering::Acquire);
                s != 0 && s <= ns
            })
            .unwrap_or(0)
    }

    /// Sets the noisy tenant.
    pub fn set_noisy_tenant(&self, t: usize) {
        self.noisy.store(t, Ordering::Relaxed);
    }

    /// The noisy tenant (`usize::MAX` when none).
    pub fn noisy_tenant(&self) -> usize {
        self.noisy.load(Ordering::Relaxed)
    }

    /// The schema change is being posted now.
    pub fn schema_posted(&self) {
        self.schema_posted_ns
            .store(self.now_ns().max(1), Ordering::Release);
    }

    /// A client received the `schema` message.
    pub fn schema_seen(&self) {
        let posted = self.schema_posted_ns.load(Ordering::Acquire);
        if posted == 0 {
            return;
        }
        let us = (self.now_ns().saturating_sub(posted) / 1000).min(u64::from(u32::MAX)) as u32;
        self.schema
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(us);
    }

    /// `schema` messages received since the post.
    pub fn schema_count(&self) -> usize {
        self.schema.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// `schema` messages received since the post, and their delays.
    pub fn schema_delays(&self) -> (usize, Percentiles) {
        let mut v = self
            .schema
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (v.len(), Percentiles::of(&mut v))
    }

    /// A new write id.
    pub fn next_write(&self) -> u64 {
        self.writes.fetch_add(1, Ordering::Relaxed)
    }

    /// Notes a data-bearing message (for quiescence).
    pub fn data(&self, now_ns: u64) {
        self.last_data_ns.fetch_max(now_ns, Ordering::Relaxed);
    }

    /// Records one client's resume after a drop.
    pub fn resumed(&self, d: std::time::Duration) {
        let us = d.as_micros().min(u128::from(u32::MAX)) as u32;
        self.resume
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(us);
    }

    /// Percentiles of the resume times.
    pub fn resume_times(&self) -> Percentiles {
        let mut r = self
            .resume
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Percentiles::of(&mut r)
    }

    /// The counters of the current phase.
    pub fn now(&self) -> &PhaseCounters {
        &self.phases[self.phase() as usize]
    }

    /// Records one delivery of a write sent at `sent_ns`: counted in the
    /// current phase, its latency in the phase the write was sent in.
    pub fn delivered(&self, noisy: bool, sent_ns: u64, now_ns: u64) {
        self.now().deliveries.fetch_add(1, Ordering::Relaxed);
        let p = self.phase_at(sent_ns);
        let us = (now_ns.saturating_sub(sent_ns) / 1000).min(u64::from(u32::MAX)) as u32;
        let mut l = self.latency[p].lock().unwrap_or_else(|e| e.into_inner());
        if noisy { l.1.push(us) } else { l.0.push(us) }
    }

    /// Latency percentiles of a phase: (quiet tenants, noisy tenant, all).
    pub fn latency(&self, p: Phase) -> (Percentiles, Percentiles, Percentiles) {
        let l = self.latency[p as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut quiet = l.0.clone();
        let mut noisy = l.1.clone();
        let mut all: Vec<u32> = quiet.iter().chain(&noisy).copied().collect();
        (
            Percentiles::of(&mut quiet),
            Percentiles::of(&mut noisy),
            Percentiles::of(&mut all),
        )
    }

    /// Keeps an error message for the report (the first 20).
    pub fn error(&self, m: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut s = self.error_samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < 20 {
            s.push(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut s: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        let p = Percentiles::of(&mut s);
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
    }
}
