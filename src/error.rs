//! Failure classes and their documented exit codes.
//!
//! Library code returns `anyhow::Error`s; where the class of a failure matters
//! to the user (the exit code), the innermost cause is tagged with a
//! [`Failure`] via [`fail`]. `main` picks the first `Failure` in the chain.

use std::fmt;

/// What kind of thing went wrong; each maps to one exit code (see README).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Anything not classified below.
    Other,
    /// No Coral found, or `--device` names none / several match.
    NoCoral,
    /// No firmware image, or an image that fails verification.
    Firmware,
    /// A USB or DFU failure: permission, busy, stall, vanished, verify mismatch.
    Usb,
    /// A device or XAPI object did not appear before its deadline.
    Timeout,
    /// `xe` missing, failing, or hanging; inventory unreadable.
    Xapi,
    /// A VM problem: not found, ambiguous, wrong power state, held by another VM.
    Vm,
    /// Another `coral` run holds the lock (`--no-wait`, or the wait expired).
    Busy,
}

impl FailureKind {
    /// The process exit code for this kind (documented in README.md).
    pub fn exit_code(self) -> u8 {
        match self {
            FailureKind::Other => 1,
            FailureKind::NoCoral => 3,
            FailureKind::Firmware => 4,
            FailureKind::Usb => 5,
            FailureKind::Timeout => 6,
            FailureKind::Xapi => 7,
            FailureKind::Vm => 8,
            FailureKind::Busy => 9,
        }
    }
}

/// A classified, user-facing failure: one line naming the object and the next step.
#[derive(Debug)]
pub struct Failure {
    /// The class, for the exit code.
    pub kind: FailureKind,
    /// The one-line message.
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Build a classified error: `return Err(fail(FailureKind::Vm, format!(...)))`.
pub fn fail(kind: FailureKind, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Failure {
        kind,
        message: message.into(),
    })
}

/// The exit code for an error chain: the first [`Failure`] found, else 1.
pub fn exit_code_of(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|e| e.downcast_ref::<Failure>())
        .map(|f| f.kind.exit_code())
        .unwrap_or(1)
}
