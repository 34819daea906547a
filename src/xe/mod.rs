//! XAPI through the `xe` command line.
//!
//! [`XeRunner`] is the narrow boundary: "run xe with these arguments, give me
//! stdout or a typed error". [`command`] is the one file that starts
//! processes; [`parse`] reads `--minimal` and `params=` record output as the
//! fact sheet specifies; [`client`] offers typed calls on top;
//! [`inventory`] reads this host's uuid.

pub mod client;
pub mod command;
pub mod inventory;
pub mod parse;

use std::fmt;
use std::time::Duration;

/// Runs one `xe` command. Implemented by [`command::XeCommand`] (a real
/// process) and by the simulated XAPI world (`crate::sim::xapi`).
pub trait XeRunner {
    /// Run `xe <args…>`, giving up after `timeout`; on exit status 0 return
    /// its stdout.
    fn run(&self, args: &[String], timeout: Duration) -> Result<String, XeError>;
}

/// A failed `xe` call, keeping xe's own message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XeError {
    /// The `xe` executable could not be found or started.
    Missing {
        /// What we tried to run.
        program: String,
        /// Why it did not start.
        reason: String,
    },
    /// `xe` ran and exited non-zero.
    Failed {
        /// The arguments it was given.
        args: Vec<String>,
        /// Its exit status.
        status: i32,
        /// Its stderr (and stdout, where it wrote the error there), trimmed.
        message: String,
    },
    /// `xe` did not finish before its deadline and was killed.
    TimedOut {
        /// The arguments it was given.
        args: Vec<String>,
        /// How long we waited.
        after: Duration,
    },
}

impl XeError {
    /// The first `xe` argument (the command name), for messages.
    pub fn command(&self) -> &str {
        match self {
            XeError::Failed { args, .. } | XeError::TimedOut { args, .. } => {
                args.first().map(String::as_str).unwrap_or("")
            }
            XeError::Missing { .. } => "",
        }
    }
}

impl fmt::Display for XeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XeError::Missing { program, reason } => write!(
                f,
                "cannot run `{program}`: {reason}; is this an XCP-ng dom0? (set CORAL_XE to the xe path)"
            ),
            XeError::Failed {
                args,
                status,
                message,
            } => {
                let one_line = message
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ");
                write!(f, "`xe {}` failed (exit {status}): {one_line}", display_args(args))
            }
            XeError::TimedOut { args, after } => write!(
                f,
                "`xe {}` did not answer within {} s and was stopped; is xapi running? (`systemctl status xapi`)",
                display_args(args),
                after.as_secs_f32()
            ),
        }
    }
}

impl std::error::Error for XeError {}

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
}
