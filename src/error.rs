//! Failure classes and their documented exit codes, and what to do next.
//!
//! Library code returns `anyhow::Error`s; where the class of a failure matters
//! to the user (the exit code), the innermost cause is tagged with a
//! [`Failure`] via [`fail`]. `main` picks the first `Failure` in the chain.
//!
//! The library never spells the command line: a failure carries its next
//! step as a [`NextStep`], and a text that refers to an option names it as a
//! [`Flag`]. The binary installs a [`Wording`] once at start
//! ([`set_wording`]) that turns both into the words the user types.

use std::fmt;
use std::sync::OnceLock;

/// What kind of thing went wrong; each maps to one exit code (see README).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Anything not classified below.
    Other,
    /// A bad command-line value that slipped past clap (exit 2, as clap's own).
    Usage,
    /// No Coral found, or the requested port has none / several match.
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
    /// Another `coral` run holds the lock (no waiting, or the wait expired).
    Busy,
}

impl FailureKind {
    /// The process exit code for this kind (documented in README.md).
    pub fn exit_code(self) -> u8 {
        match self {
            FailureKind::Other => 1,
            FailureKind::Usage => 2,
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
    /// What happened, naming the object (one line).
    pub message: String,
    /// What the user can do about it, worded at the edge.
    pub next: Option<NextStep>,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        match &self.next {
            Some(next) => write!(f, "; {next}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for Failure {}

/// Build a classified error: `return Err(fail(FailureKind::Vm, format!(...)))`.
pub fn fail(kind: FailureKind, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Failure {
        kind,
        message: message.into(),
        next: None,
    })
}

/// A classified error with its next step: the message says what happened,
/// the step what to do (worded by the binary, after "; ").
pub fn fail_then(kind: FailureKind, message: impl Into<String>, next: NextStep) -> anyhow::Error {
    anyhow::Error::new(Failure {
        kind,
        message: message.into(),
        next: Some(next),
    })
}

/// The next step of the first [`Failure`] in an error chain that has one.
pub fn next_step_of(err: &anyhow::Error) -> Option<&NextStep> {
    err.chain()
        .filter_map(|e| e.downcast_ref::<Failure>())
        .find_map(|f| f.next.as_ref())
}

/// An option of the command line the library refers to (to say which value
/// is wrong, or which one changes what). The binary spells it (`--vm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    /// The VM to hand the Coral to.
    Vm,
    /// The Coral's USB port path.
    Device,
    /// Start a halted VM.
    Start,
    /// Restart a running VM.
    Restart,
    /// Power a VM off when its clean shutdown fails.
    ForceShutdown,
    /// How long a clean shutdown may take.
    ShutdownTimeout,
    /// Where the lock is.
    LockFile,
    /// Do not wait for the lock.
    NoWait,
    /// How long to wait for the lock.
    LockTimeout,
    /// The firmware image file.
    Firmware,
    /// Upload an image the manifest does not know.
    AllowUnknownFirmware,
}

/// What the user can do next, as data; the binary words it. Each names the
/// objects it needs (a VM uuid, a URL), never a command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NextStep {
    /// Detach the Coral from `vm`, which holds it, first.
    Detach {
        /// The VM holding the Coral.
        vm: String,
    },
    /// Find which VM holds the Coral, then detach it there.
    FindHolderAndDetach,
    /// Give the VM's clean shutdown longer, or allow forcing it off.
    LongerShutdownOrForce,
    /// Force `vm` off now instead of waiting for its clean shutdown.
    ForceOffNow {
        /// The VM still shutting down.
        vm: String,
    },
    /// A restart of `vm` a previous run left unfinished: finish it now.
    FinishRestart {
        /// The VM coral was restarting.
        vm: String,
    },
    /// After fixing why `vm` would not start with the Coral, attach it again with a restart.
    RestorePassthrough {
        /// The VM started without its Coral.
        vm: String,
    },
    /// Resume `vm`'s mapping, paused by a detach, by attaching it again.
    ResumeMapping {
        /// The VM whose mapping is paused.
        vm: String,
    },
    /// Give `vm`'s mapping the port of its Coral.
    DeviceForMapping {
        /// The VM of the mapping.
        vm: String,
    },
    /// Pass the ready Coral through to a VM.
    AttachToVm,
    /// Restart the running `vm` now so that it gets the Coral.
    RestartNow {
        /// The VM waiting for its next start.
        vm: String,
    },
    /// After fixing, recover `vm`'s Coral again.
    UpAfterFixing {
        /// The VM left without its Coral.
        vm: String,
    },
    /// Recover every configured Coral again.
    Up,
    /// Check xapi, then recover every configured Coral again.
    CheckXapiThenUp,
    /// Add a mapping to the config.
    AddEntry,
    /// Fix the config file by hand, or rewrite it.
    FixConfig,
    /// Remove `vm`'s mapping first.
    UninstallFirst {
        /// The VM the Coral is mapped to.
        vm: String,
    },
    /// Move `vm`'s mapping to the Coral at `device` (replacing its others).
    MoveEntry {
        /// The VM of the mapping.
        vm: String,
        /// The port the mapping moves to.
        device: String,
    },
    /// Name the Coral of every mapping.
    DeviceForEach,
    /// The status lists the Corals' port paths.
    StatusShowsPaths,
    /// Pick one of the Corals listed, by port path.
    PassOneOfThose,
    /// Several Corals: pick one by port path.
    ChooseDevice,
    /// Several VMs share the name: name the VM by uuid.
    PassVmUuid,
    /// Upload the firmware first.
    InitFirst,
    /// Replug the Coral, then upload the firmware again.
    ReplugThenInit,
    /// The Coral came back ready: send it back to its boot loader, or replug it.
    InitForceOrReplug,
    /// Upload the firmware again (replug if it keeps failing).
    RetryInit,
    /// Run again, logging every USB request.
    RerunVerbose,
    /// No firmware image anywhere: fetch the pinned one or install a file
    /// into `dir` (where installed images are looked for).
    GetFirmware {
        /// The install directory, as the user would type it.
        dir: String,
    },
    /// The image file named cannot be read: get the image, or name a copy.
    FetchOrNameCopy,
    /// The file is not the size of a Coral image: name the real image.
    NameRealImage,
    /// The download is not the pinned image: retry, or fetch `url` elsewhere.
    RetryFetchOrElsewhere {
        /// Where the image is.
        url: String,
    },
    /// The install directory cannot be written: run as root or choose another.
    RootOrOtherDir,
    /// The manifest compiled in is empty: the build is broken.
    RebuildWithManifest,
    /// A VM name not found: how to see the names there are.
    ListVms,
    /// An image the manifest does not know: use the known one or allow it.
    KnownFirmwareOrAllow,
    /// The download failed, or there is no downloader: download `url` on a
    /// machine that can, and install the file into `dir`.
    DownloadElsewhere {
        /// Where the image is.
        url: String,
        /// Where it is to be installed.
        dir: String,
    },
    /// The lock file cannot be opened: run as root or use another lock file.
    RootOrLockFile,
    /// Another run holds the lock: rerun later, or wait (longer) for it.
    RerunLater {
        /// True when this run waited for the lock; false when it did not wait.
        waited: bool,
    },
    /// A file or directory coral must own alone is unsafe (a symlink, another
    /// user's, writable by others): remove it; coral creates it again, private.
    RemoveUnsafe {
        /// The offending path.
        path: String,
    },
    /// The mapping state was unreadable and kept aside: the pauses it held
    /// are lost; detach again what should stay detached, then delete it.
    RedoPausesThenDelete {
        /// The file kept aside.
        aside: String,
    },
}

/// How the binary spells flags and next steps.
pub trait Wording: Sync {
    /// The option as the user types it.
    fn flag(&self, flag: Flag) -> String;
    /// The next step as the user reads it (no leading separator).
    fn step(&self, step: &NextStep) -> String;
}

static WORDING: OnceLock<&'static dyn Wording> = OnceLock::new();

/// Install the binary's wording (once, at start; later calls are ignored).
/// Until then flags and next steps show as their variant names.
pub fn set_wording(wording: &'static dyn Wording) {
    let _ = WORDING.set(wording);
}

impl fmt::Display for Flag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match WORDING.get() {
            Some(wording) => f.write_str(&wording.flag(*self)),
            None => write!(f, "<{self:?}>"),
        }
    }
}

impl fmt::Display for NextStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match WORDING.get() {
            Some(wording) => f.write_str(&wording.step(self)),
            None => write!(f, "next: {self:?}"),
        }
    }
}

/// The exit code for an error chain: the first [`Failure`] found, else 1.
pub fn exit_code_of(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|e| e.downcast_ref::<Failure>())
        .map(|f| f.kind.exit_code())
        .unwrap_or(1)
}
