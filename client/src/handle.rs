//! [`ReplicaHandle`]: a dedicated thread owns the [`Replica`] (its SQLite
//! connection never crosses an `.await`); async code sends it closures.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::error::{ReplicaError, Result};
use crate::replica::Replica;

type Job = Box<dyn FnOnce(&mut Replica) + Send>;

enum Msg {
    Run(Job),
    Close(oneshot::Sender<Replica>),
}

/// A handle to a replica running on its own thread. Cheap to clone; the
/// thread ends when [`ReplicaHandle::close`] is called or every handle is
/// dropped.
#[derive(Clone)]
pub struct ReplicaHandle {
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for ReplicaHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaHandle")
    }
}

impl ReplicaHandle {
    /// Moves the replica to a new thread.
    pub fn spawn(replica: Replica) -> ReplicaHandle {
        let (tx, rx) = mpsc::channel::<Msg>();
        let _thread: JoinHandle<()> = std::thread::Builder::new()
            .name("tenantsync-replica".into())
            .spawn(move || {
                let mut replica = replica;
                while let Ok(msg) = rx.recv() {
                    match msg {
                        Msg::Run(job) => job(&mut replica),
                        Msg::Close(back) => {
                            let _ = back.send(replica);
                            return;
                        }
                    }
                }
            })
            .expect("spawn the replica thread");
        ReplicaHandle { tx }
    }

    /// Runs `f` on the replica's thread and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Replica) -> T + Send + 'static,
    {
        let (back, rx) = oneshot::channel();
        let job: Job = Box::new(move |r| {
            let _ = back.send(f(r));
        });
        self.tx
            .send(Msg::Run(job))
            .map_err(|_| ReplicaError::Closed)?;
        rx.await.map_err(|_| ReplicaError::Closed)
    }

    /// Like [`ReplicaHandle::call`] for a closure returning a replica
    /// result.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Replica) -> Result<T> + Send + 'static,
    {
        self.call(f).await?
    }

    /// Runs `f` on the replica's thread, blocking this (non-async) thread.
    pub fn call_blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Replica) -> T + Send + 'static,
    {
        let (back, rx) = oneshot::channel();
        let job: Job = Box::new(move |r| {
            let _ = back.send(f(r));
        });
        self.tx
            .send(Msg::Run(job))
            .map_err(|_| ReplicaError::Closed)?;
        rx.blocking_recv().map_err(|_| ReplicaError::Closed)
    }

    /// Stops the thread after the jobs queued before, and gives the replica
    /// back (other clones of the handle then get [`ReplicaError::Closed`]).
    pub async fn close(self) -> Result<Replica> {
        let (back, rx) = oneshot::channel();
        self.tx
            .send(Msg::Close(back))
            .map_err(|_| ReplicaError::Closed)?;
        rx.await.map_err(|_| ReplicaError::Closed)
    }
}
