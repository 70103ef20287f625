//! [`FairQueue`]: one FIFO per tenant, taken round robin, so one tenant's
//! flood cannot stall another's work (the engine's writes, the readers'
//! sync jobs).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Per-tenant FIFOs served in turn.
pub(crate) struct FairQueue<T> {
    queues: HashMap<Arc<str>, VecDeque<T>>,
    /// Tenants with queued work, in service order.
    ring: VecDeque<Arc<str>>,
    len: usize,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        FairQueue {
            queues: HashMap::new(),
            ring: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> FairQueue<T> {
    pub fn push(&mut self, tenant: &Arc<str>, item: T) {
        let q = self.queues.entry(tenant.clone()).or_default();
        if q.is_empty() {
            self.ring.push_back(tenant.clone());
        }
        q.push_back(item);
        self.len += 1;
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes up to `quantum` items of the next tenant in turn.
    pub fn take_turn(&mut self, quantum: usize, out: &mut Vec<T>) {
        let Some(t) = self.ring.pop_front() else {
            return;
        };
        let q = self
            .queues
            .get_mut(&t)
            .expect("a tenant in the ring has a queue");
        for _ in 0..quantum {
            match q.pop_front() {
                Some(x) => {
                    out.push(x);
                    self.len -= 1;
                }
                None => break,
            }
        }
        if q.is_empty() {
            self.queues.remove(&t);
        } else {
            self.ring.push_back(t);
        }
    }

    /// One round: up to `quantum` items of each tenant with work, in
    /// turn, at most `max` in all. A tenant with a backlog gets no more
    /// than `quantum` of a group however idle the others are, so a write
    /// of another tenant never waits behind more than one such share.
    pub fn take(&mut self, quantum: usize, max: usize) -> Vec<T> {
        let mut out = Vec::new();
        let tenants = self.ring.len();
        for _ in 0..tenants {
            if out.len() >= max {
                break;
            }
            let room = quantum.min(max - out.len());
            self.take_turn(room, &mut out);
        }
        out
    }

    /// Every queued item, in fair order.
    pub fn drain_all(&mut self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.len);
        while !self.is_empty() {
            out.extend(self.take(usize::MAX, usize::MAX));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_are_served_in_turn() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut q = FairQueue::default();
        for i in 0..10 {
            q.push(&a, ("a", i));
        }
        q.push(&b, ("b", 0));
        q.push(&b, ("b", 1));
        // One round: two of each, however many `a` has queued.
        let got = q.take(2, 6);
        assert_eq!(got, vec![("a", 0), ("a", 1), ("b", 0), ("b", 1)]);
        assert_eq!(q.len(), 8);
        // A tenant alone still gets only its quantum per take.
        assert_eq!(q.take(2, 6), vec![("a", 2), ("a", 3)]);
        // `max` bounds the round.
        q.push(&b, ("b", 2));
        assert_eq!(q.take(4, 5).len(), 5);
        assert_eq!(q.drain_all().len(), 2);
        assert!(q.is_empty());
    }
}
