//! XAPI through the `xe` command line.
//!
//! [`XeRunner`] is the narrow boundary: "run xe with these arguments, give me
//! stdout or a typed error". [`command`] is the one file that starts
//! processes; [`parse`] reads `--minimal` and `params=` record output as the
//! fact sheet specifies; [`errors`] classifies what `xe` printed; [`client`]
//! offers typed calls on top; [`inventory`] reads this host's uuid.

pub mod client;
pub mod command;
pub mod errors;
pub mod inventory;
pub mod parse;

pub use errors::XeError;

use std::time::Duration;

/// Runs one `xe` command. Implemented by [`command::XeCommand`] (a real
/// process) and by the simulated XAPI world (`crate::simulate`).
pub trait XeRunner {
    /// Run `xe <args…>`, giving up after `timeout`; on exit status 0 return
    /// its stdout, else the failure classified by [`XeError::from_output`].
    fn run(&self, args: &[String], timeout: Duration) -> Result<String, XeError>;

    /// Start `xe <args…>` and return at once: the call runs while the caller
    /// does other work (several reads at once, or beside the USB work), and
    /// [`StartedCall::wait`] collects its answer as [`XeRunner::run`] would
    /// give it. For reads only (a write's outcome must be known before the
    /// next step). This default runs the call to its end first (no overlap).
    fn start<'r>(&'r self, args: &[String], timeout: Duration) -> Box<dyn StartedCall + 'r> {
        Box::new(Answered(self.run(args, timeout)))
    }
}

/// An `xe` call started with [`XeRunner::start`]. Dropped without
/// [`StartedCall::wait`], it is abandoned (a real `xe` is killed: harmless
/// for a read).
pub trait StartedCall {
    /// Wait for the call's end (within the deadline it was started with).
    fn wait(self: Box<Self>) -> Result<String, XeError>;
}

/// A call that has already ended.
pub struct Answered(pub Result<String, XeError>);

impl StartedCall for Answered {
    fn wait(self: Box<Self>) -> Result<String, XeError> {
        self.0
    }
}

/// The first 8 characters of a uuid, for messages (placeholders whole).
pub fn short(uuid: &str) -> &str {
    if uuid.starts_with('<') {
        return uuid;
    }
    uuid.get(..8).unwrap_or(uuid)
}

/// 8-4-4-4-12 hex digits.
pub fn looks_like_uuid(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Arguments as a shell user would type them (each quoted when needed).
/// For display only: `coral` never runs a shell.
pub fn display_args(args: &[String]) -> String {
    args.iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quote one argument POSIX-style when it holds anything but safe characters.
pub fn shell_quote(arg: &str) -> String {
    let safe = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=.,:/@+%".contains(&b));
    if safe {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// A simulated call whose answer is known when it starts (at `began` on
/// `clock`) but arrives only `took` later, or fails at `timeout` when it
/// takes longer: how a simulated runner overlaps started calls on virtual time.
pub struct ArrivesLater<'c> {
    /// The clock the call's time passes on.
    pub clock: &'c dyn crate::clock::Clock,
    /// When it started.
    pub began: Duration,
    /// How long it takes.
    pub took: Duration,
    /// The caller's deadline.
    pub timeout: Duration,
    /// Its arguments (for a timeout's error).
    pub args: Vec<String>,
    /// Its answer.
    pub answer: Result<String, XeError>,
}

impl StartedCall for ArrivesLater<'_> {
    fn wait(self: Box<Self>) -> Result<String, XeError> {
        let end = self.began + self.took.min(self.timeout);
        let now = self.clock.now();
        if now < end {
            self.clock.sleep(end - now);
        }
        if self.took > self.timeout {
            return Err(XeError::TimedOut {
                args: self.args,
                after: self.timeout,
            });
        }
        self.answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(shell_quote("uuid=abc-1"), "uuid=abc-1");
        assert_eq!(shell_quote("name-label=my vm"), "'name-label=my vm'");
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
        assert_eq!(shell_quote("$(reboot)"), "'$(reboot)'");
    }

    #[test]
    fn short_uuids() {
        assert_eq!(short("cd7c086b-9216-1f42-f5fd-f6a9dbd967af"), "cd7c086b");
        assert_eq!(short("<new VUSB>"), "<new VUSB>");
        assert!(looks_like_uuid("cd7c086b-9216-1f42-f5fd-f6a9dbd967af"));
        assert!(!looks_like_uuid("frigate"));
    }
}
