//! Evaluating a predicate on a changed row happens per change per candidate
//! view: in the common case (comparisons, IN, memberships, AND/OR over
//! columns and parameters) it must not allocate. Counted with a global
//! allocator, not timed.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use tenantsync_policy::MembershipResults;
use tenantsync_types::Value;

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn evaluating_the_example_predicates_does_not_allocate() {
    let engine = common::example_engine();
    let id = common::identity(r#"{"sub":"alice","role":"authenticated","tenant_id":"t1"}"#);
    let q = engine
        .rewrite(&id, "SELECT * FROM todos WHERE list_id IN (1, 2, 7) AND done = 0 AND priority BETWEEN 1 AND 3")
        .unwrap();
    let mut ms = MembershipResults::new();
    for m in &q.memberships {
        ms.insert(m.id, m.set((0..50).map(Value::Integer)));
    }
    let rows: Vec<Vec<Value>> = vec![
        vec![
            1.into(),
            "t1".into(),
            7.into(),
            "alice".into(),
            "x".into(),
            0.into(),
            2.into(),
        ],
        vec![
            2.into(),
            "t1".into(),
            3.into(),
            "bob".into(),
            "y".into(),
            0.into(),
            1.into(),
        ],
        vec![
            3.into(),
            "t2".into(),
            9.into(),
            "bob".into(),
            "z".into(),
            1.into(),
            Value::Null,
        ],
    ];
    let mut truths = Vec::with_capacity(rows.len());
    let before = ALLOCS.load(Ordering::Relaxed);
    for r in &rows {
        truths.push(q.predicate.eval(r, &q.params, &ms));
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    assert_eq!(allocs, 0, "eval allocated {allocs} times");
    assert_eq!(
        truths.iter().filter(|t| t.is_true()).count(),
        1,
        "{truths:?}"
    );
}
