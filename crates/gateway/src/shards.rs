//! Thread-per-core execution of QUIC connections.
//!
//! Everything one tunnel does — its QUIC connection driver, control stream, data streams and
//! their HTTP connections — runs on one thread, as a single-threaded Tokio runtime (a shard);
//! different connections are spread over the shards, one per core. A request then crosses no
//! thread on its way through the gateway: no futex wake per hop, and the connection driver runs
//! after the streams that woke it, so it sends their data in one datagram instead of one each.
//! (On a work-stealing runtime the driver, woken into the LIFO slot, ran after every single
//! write.) One QUIC connection is driven by one task anyway, so it never used more than about
//! one core.
//!
//! quinn spawns a connection's driver where [`quinn::Incoming::accept`] is called, so a
//! connection is placed on a shard by accepting it there ([`Shards::spawn`]).

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use tokio::runtime::Handle;

/// The runtimes connections are placed on: the caller's own runtime first, then one extra
/// single-threaded runtime per extra thread. Dropping it stops the extra threads (their tasks
/// are dropped).
pub struct Shards {
    shards: Vec<Shard>,
}

struct Shard {
    handle: Handle,
    /// Tasks placed here and not yet finished: the next one goes where there are fewest.
    load: Arc<AtomicUsize>,
    thread: Option<ShardThread>,
}

struct ShardThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ShardThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Shards {
    /// Only the caller's runtime (what tests and embedders get by default).
    pub fn current() -> Self {
        Self {
            shards: vec![Shard {
                handle: Handle::current(),
                load: Arc::default(),
                thread: None,
            }],
        }
    }

    /// The caller's runtime plus `count - 1` threads, each with a single-threaded runtime.
    /// Must be called from within a Tokio runtime.
    pub fn start(count: usize) -> std::io::Result<Self> {
        let mut shards = Self::current();
        for i in 1..count.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let join = std::thread::Builder::new()
                .name(format!("shard-{i}"))
                .spawn(move || {
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            shards.shards.push(Shard {
                handle,
                load: Arc::default(),
                thread: Some(ShardThread {
                    stop: Some(stop),
                    join: Some(join),
                }),
            });
        }
        Ok(shards)
    }

    /// One shard per available core.
    pub fn per_core() -> std::io::Result<Self> {
        Self::start(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// How many shards there are.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether there are none (never: there is always the caller's runtime).
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Runs `task` on the shard with the fewest unfinished tasks; returns that shard's index.
    pub fn spawn<F>(&self, task: F) -> usize
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (index, shard) = self
            .shards
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.load.load(Relaxed))
            .expect("there is always one shard");
        let load = shard.load.clone();
        load.fetch_add(1, Relaxed);
        shard.handle.spawn(async move {
            let _done = Finished(load);
            task.await;
        });
        index
    }

    /// Unfinished tasks per shard.
    pub fn loads(&self) -> Vec<usize> {
        self.shards.iter().map(|s| s.load.load(Relaxed)).collect()
    }

    /// Whether shard `index` runs on a thread of its own (shard 0 is the caller's runtime).
    pub fn has_own_thread(&self, index: usize) -> bool {
        self.shards.get(index).is_some_and(|s| s.thread.is_some())
    }
}

/// Counts a task as finished when it ends, however it ends (also when its runtime drops it).
struct Finished(Arc<AtomicUsize>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_go_to_the_least_loaded_shard_and_run_on_its_thread() {
        let shards = Shards::start(3).expect("shards");
        assert_eq!(shards.len(), 3);
        let (release, hold) = tokio::sync::watch::channel(false);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut placed = Vec::new();
        for _ in 0..6 {
            let tx = tx.clone();
            let mut hold = hold.clone();
            placed.push(shards.spawn(async move {
                let _ = tx.send(std::thread::current().name().map(str::to_owned));
                let _ = hold.wait_for(|r| *r).await;
            }));
        }
        // Six long tasks over three shards: two each, in turn.
        assert_eq!(placed, [0, 1, 2, 0, 1, 2]);
        let mut names = Vec::new();
        for _ in 0..6 {
            names.push(rx.recv().await.expect("ran"));
        }
        assert_eq!(
            names
                .iter()
                .filter(|n| n.as_deref() == Some("shard-1"))
                .count(),
            2
        );
        assert_eq!(
            names
                .iter()
                .filter(|n| n.as_deref() == Some("shard-2"))
                .count(),
            2
        );
        assert_eq!(shards.loads(), [2, 2, 2]);
        release.send(true).expect("release");
        for _ in 0..100 {
            if shards.loads() == [0, 0, 0] {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(shards.loads(), [0, 0, 0]);
        assert!(!shards.has_own_thread(0));
        assert!(shards.has_own_thread(2));
    }
}
