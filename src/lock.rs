//! One `coral` run at a time: an exclusive `flock` on a lock file.
//!
//! CONTRACT (bodies to be written).

use crate::clock::Clock;
use std::path::Path;
use std::time::Duration;

/// How to behave when another run holds the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockWait {
    /// Fail at once (`--no-wait`).
    NoWait,
    /// Wait up to this long, saying so once.
    UpTo(Duration),
}

/// Held lock; released on drop.
#[derive(Debug)]
pub struct LockGuard {
    _file: std::fs::File,
}

/// Take the lock at `path`; `FailureKind::Busy` when it cannot be had.
pub fn acquire(path: &Path, wait: LockWait, clock: &dyn Clock) -> anyhow::Result<LockGuard> {
    let _ = (path, wait, clock);
    todo!("lock::acquire")
}
