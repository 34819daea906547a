//! One `coral` run at a time: an exclusive `flock` on a lock file, released
//! when the process ends however it ends.

use crate::atomic_file::NO_FOLLOW;
use crate::clock::{poll_until, Clock};
use crate::error::{fail, fail_then, FailureKind, NextStep};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

/// Where the lock lives, unless told otherwise.
pub const DEFAULT_LOCK_FILE: &str = "/run/coral.lock";
/// How long a run waits for another to finish, unless told otherwise.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a waiting run tries the lock again.
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

/// The lock file's mode: `flock` needs only read access, so anyone who can
/// open the file can hold the lock and block every run.
const LOCK_MODE: u32 = 0o600;

/// Hold an exclusive lock on `path` until the guard drops, waiting as long
/// as it takes: for short critical sections such as the state file's
/// read-modify-write. The file is opened as the run lock is (0600, never
/// through a symlink, this user's).
pub fn hold_file_lock(path: &Path) -> std::io::Result<LockGuard> {
    let file = open(path).map_err(|e| std::io::Error::other(format!("{e:#}")))?;
    file.lock()?;
    Ok(LockGuard { _file: file })
}

/// The lock file, created 0600 when missing, never through a symlink. An
/// existing one must be a regular file of this user's; a looser mode (an
/// older coral created it 0644) is tightened.
fn open(path: &Path) -> anyhow::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(LOCK_MODE)
        .custom_flags(NO_FOLLOW)
        .open(path)
        .map_err(|e| {
            // O_NOFOLLOW refuses a symlink with ELOOP, or EACCES when it
            // sits in a sticky directory such as /tmp: say which it is.
            let symlink = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink());
            if symlink || e.raw_os_error() == Some(libc::ELOOP) {
                return unsafe_lock(path, "is a symlink".into());
            }
            fail_then(
                FailureKind::Busy,
                format!("cannot open the lock file {}: {e}", path.display()),
                NextStep::RootOrLockFile,
            )
        })?;
    check_owned(&file, path)?;
    Ok(file)
}

/// The open lock file is a regular file of this user's, mode 0600.
fn check_owned(file: &File, path: &Path) -> anyhow::Result<()> {
    let meta = file.metadata().map_err(|e| {
        fail(
            FailureKind::Busy,
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    if !meta.is_file() {
        return Err(unsafe_lock(path, "is not a regular file".into()));
    }
    let uid = crate::atomic_file::effective_uid();
    if meta.uid() != uid {
        return Err(unsafe_lock(
            path,
            format!(
                "belongs to uid {}, not to this user (uid {uid})",
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o777 != LOCK_MODE {
        log::warn!(
            "the lock file {} had mode {:o}; setting it to {LOCK_MODE:o}",
            path.display(),
            meta.mode() & 0o777
        );
        file.set_permissions(std::fs::Permissions::from_mode(LOCK_MODE))
            .map_err(|e| {
                fail(
                    FailureKind::Busy,
                    format!("cannot set the mode of {}: {e}", path.display()),
                )
            })?;
    }
    Ok(())
}

/// A lock file another user could hold or replace: refused, with the fix.
fn unsafe_lock(path: &Path, why: String) -> anyhow::Error {
    fail_then(
        FailureKind::Other,
        format!("the lock file {} {why}", path.display()),
        NextStep::RemoveUnsafe {
            path: path.display().to_string(),
        },
    )
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

/// Why an existing lock file at `path` would be refused or changed (a
/// symlink, not a regular file, another user's, a looser mode than 0600),
/// without opening it (for `coral doctor`); None when it is fine or absent.
pub fn unsafe_reason(path: &Path) -> Option<String> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    let uid = crate::atomic_file::effective_uid();
    if meta.file_type().is_symlink() {
        Some("is a symlink".into())
    } else if !meta.is_file() {
        Some("is not a regular file".into())
    } else if meta.uid() != uid {
        Some(format!(
            "belongs to uid {}, not to this user (uid {uid})",
            meta.uid()
        ))
    } else if meta.mode() & 0o777 != LOCK_MODE {
        Some(format!(
            "has mode {:o}: anyone who can read it can hold the lock (the next run sets {LOCK_MODE:o})",
            meta.mode() & 0o777
        ))
    } else {
        None
    }
}

/// Whether the lock at `path` is free, without taking it or creating the
/// file (for `coral doctor`): a shared lock attempt fails while a run holds it.
pub fn is_free(path: &Path) -> std::io::Result<bool> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(NO_FOLLOW)
        .open(path)
    {
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
