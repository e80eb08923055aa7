//! Thread pools by size, built once and reused: a merge asks for N threads, and building a pool per tensor
//! (or per in-memory call) would cost more than small merges do.
//!
//! A process forked after it used a pool (Python's `multiprocessing` with the fork start method) inherits the
//! pools but not their threads: work handed to them would wait forever. The binding registers
//! [`disable_after_fork`] as a `pthread_atfork` child handler, and a forked child then runs every merge on a
//! fresh single-thread pool (results do not depend on the thread count).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{CoreError, Result};

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// A pool has been built in this process (so a forked child inherits pools without threads).
static POOLS_USED: AtomicBool = AtomicBool::new(false);
/// This process is a fork of one that had used pools: the cached pools are unusable and their lock may be held.
static FORKED: AtomicBool = AtomicBool::new(false);

/// Turn parallelism off in a forked child (see the module docs). Async-signal-safe: it only stores a flag.
pub fn disable_after_fork() {
    if POOLS_USED.load(Ordering::SeqCst) {
        FORKED.store(true, Ordering::SeqCst);
    }
}

/// The pool of `threads` workers (default: every core), built once.
///
/// # Errors
/// A parameter error for 0 threads or when the threads cannot start.
pub fn pool(threads: Option<usize>) -> Result<Arc<ThreadPool>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<ThreadPool>>>> = OnceLock::new();
    let n = threads.unwrap_or_else(default_threads);
    if n == 0 {
        return Err(CoreError::param("threads must be at least 1"));
    }
    if FORKED.load(Ordering::SeqCst) {
        return build(1).map(Arc::new);
    }
    POOLS_USED.store(true, Ordering::SeqCst);
    let mut pools = POOLS.get_or_init(Default::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(p) = pools.get(&n) {
        return Ok(p.clone());
    }
    let p = Arc::new(build(n)?);
    pools.insert(n, p.clone());
    Ok(p)
}

fn build(n: usize) -> Result<ThreadPool> {
    ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("ferromerge-{i}"))
        .build()
        .map_err(|e| CoreError::param(format!("cannot start {n} threads: {e}")))
}
