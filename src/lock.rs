//! One `coral` run at a time: an exclusive `flock` on a lock file, released
//! when the process ends however it ends.

use crate::clock::{poll_until, Clock};
use crate::error::{fail, fail_then, FailureKind, NextStep};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// How often a waiting run tries the lock again.
/// Where the lock lives, unless told otherwise.
pub const DEFAULT_LOCK_FILE: &str = "/run/coral.lock";
/// How long a run waits for another to finish, unless told otherwise.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(300);
const LOCK_POLL_INTERVAL: Duration = Duration::from_millis(50);

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
    _file: File,
}

/// Take the lock at `path`; `FailureKind::Busy` when it cannot be had.
pub fn acquire(path: &Path, wait: LockWait, clock: &dyn Clock) -> anyhow::Result<LockGuard> {
    let file = open(path)?;
    let try_lock = || try_lock(&file, path).map(|got| got.then_some(()));
    let got = match wait {
        LockWait::NoWait => try_lock()?,
        LockWait::UpTo(timeout) => match try_lock()? {
            Some(()) => Some(()),
            None => {
                log::info!(
                    "waiting for another coral run to finish (lock {}, up to {} s)",
                    path.display(),
                    timeout.as_secs()
                );
                poll_until(clock, timeout, LOCK_POLL_INTERVAL, try_lock)?
            }
        },
    };
    if got.is_none() {
        return Err(fail_then(
            FailureKind::Busy,
            format!("another coral run holds {}", path.display()),
            NextStep::RerunLater {
                waited: matches!(wait, LockWait::UpTo(_)),
            },
        ));
    }
    Ok(held(file))
}

/// Take the lock if it is free now; `Ok(None)` when another run holds it
/// (for `coral watch`, which tries again later instead of waiting).
pub fn try_acquire(path: &Path) -> anyhow::Result<Option<LockGuard>> {
    let file = open(path)?;
    Ok(try_lock(&file, path)?.then(|| held(file)))
}

/// The lock file, created when missing.
fn open(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| {
            fail_then(
                FailureKind::Busy,
                format!("cannot open the lock file {}: {e}", path.display()),
                NextStep::RootOrLockFile,
            )
        })
}

/// One attempt at the exclusive lock: true when this run has it now.
fn try_lock(file: &File, path: &Path) -> anyhow::Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(fail(
            FailureKind::Busy,
            format!("cannot lock {}: {e}", path.display()),
        )),
    }
}

/// The locked file as a guard, with this process's id written in it.
fn held(mut file: File) -> LockGuard {
    let _ = file
        .set_len(0)
        .and_then(|_| writeln!(file, "{}", std::process::id()));
    LockGuard { _file: file }
}

/// Whether the lock at `path` is free, without taking it or creating the
/// file (for `coral doctor`): a shared lock attempt fails while a run holds it.
pub fn is_free(path: &Path) -> std::io::Result<bool> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            Ok(true)
        }
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    #[test]
    fn a_second_holder_fails_fast_or_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coral.lock");
        let clock = SystemClock::new();
        assert!(is_free(&path).unwrap());
        assert!(!path.exists(), "probing creates nothing");
        let first = acquire(&path, LockWait::NoWait, &clock).unwrap();
        assert!(!is_free(&path).unwrap());
        let err = acquire(&path, LockWait::NoWait, &clock).unwrap_err();
        assert_eq!(crate::error::exit_code_of(&err), 9);
        let next = |err| crate::error::next_step_of(err).cloned();
        assert_eq!(next(&err), Some(NextStep::RerunLater { waited: false }));
        let err = acquire(&path, LockWait::UpTo(Duration::from_millis(120)), &clock).unwrap_err();
        assert_eq!(next(&err), Some(NextStep::RerunLater { waited: true }));

        let released = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(first);
        });
        acquire(&path, LockWait::UpTo(Duration::from_secs(5)), &clock).unwrap();
        released.join().unwrap();
    }
}
