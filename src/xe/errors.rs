//! What a failed `xe` call means, classified from what `xe` printed (the
//! fact sheet's formats): the procedure decides on the variant, and only the
//! edge words it for the user.

use super::display_args;
use std::fmt;
use std::time::Duration;

/// A failed `xe` call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XeError {
    /// The `xe` executable could not be found or started.
    Missing {
        /// What we tried to run.
        program: String,
        /// Why it did not start.
        reason: String,
    },
    /// `xe` did not finish before its deadline and was killed. xapi goes on
    /// with the call regardless: its effect may still land.
    TimedOut {
        /// The arguments it was given.
        args: Vec<String>,
        /// How long we waited.
        after: Duration,
    },
    /// xapi is not running (`Connection refused`) or still starting
    /// (HOST_STILL_BOOTING): the call never reached it; retrying is safe.
    Unavailable {
        /// The arguments it was given.
        args: Vec<String>,
        /// What xe printed, trimmed.
        message: String,
    },
    /// xapi refused the call with an API error.
    Api {
        /// The arguments it was given.
        args: Vec<String>,
        /// The error code, e.g. `VM_BAD_POWER_STATE`.
        code: String,
        /// Its parameters, in order, as printed.
        params: Vec<String>,
    },
    /// The command line or a selector was refused by the CLI server
    /// (`Error: No matching VMs found`, `Unknown field`, `Required parameter
    /// not found`, `Unknown command` …).
    Cli {
        /// The arguments it was given.
        args: Vec<String>,
        /// What xe printed, trimmed.
        message: String,
    },
    /// An argument holds a line break: `xe` would split it into several
    /// arguments, so it was never run.
    BadArgument {
        /// The argument.
        arg: String,
    },
    /// `xe` answered with output that breaks its own format (a record
    /// without a valid uuid, a field twice, a value out of its range).
    Malformed {
        /// The arguments it was given.
        args: Vec<String>,
        /// What is wrong.
        reason: String,
    },
    /// `xe` exited non-zero with a message none of the above explains.
    Failed {
        /// The arguments it was given.
        args: Vec<String>,
        /// Its exit status.
        status: i32,
        /// What it printed, trimmed.
        message: String,
    },
}

/// API error descriptions xe prints instead of the code (xen-api
/// `ocaml/idl/datamodel_errors.ml`), for the codes a client of USB
/// passthrough meets.
const DESCRIPTIONS: &[(&str, &str)] = &[
    (
        "VM_BAD_POWER_STATE",
        "You attempted an operation on a VM that was not in an appropriate power state at the time",
    ),
    ("UUID_INVALID", "The uuid you supplied was invalid."),
    ("HANDLE_INVALID", "You gave an invalid object reference."),
    (
        "OPERATION_NOT_ALLOWED",
        "You attempted an operation that was not allowed.",
    ),
    ("TOO_MANY_VUSBS", "The VM has too many VUSBs."),
    (
        "USB_GROUP_CONFLICT",
        "USB_groups are currently restricted to contain no more than one VUSB.",
    ),
    (
        "USB_ALREADY_ATTACHED",
        "The USB device is currently attached to a VM.",
    ),
    (
        "VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT",
        "VM didn't acknowledge the need to shutdown.",
    ),
    (
        "VM_SHUTDOWN_TIMEOUT",
        "VM failed to shutdown before the timeout expired",
    ),
    (
        "OTHER_OPERATION_IN_PROGRESS",
        "Another operation involving the object is currently in progress",
    ),
    (
        "NO_HOSTS_AVAILABLE",
        "There were no hosts available to complete the specified operation.",
    ),
    (
        "HOST_STILL_BOOTING",
        "The host toolstack is still initialising. Please wait.",
    ),
    (
        "VM_HAS_VUSBS",
        "The operation is not allowed when the VM has VUSBs.",
    ),
    (
        "INTERNAL_ERROR",
        "The server failed to handle your request, due to an internal error.",
    ),
];

/// Texts of CLI (not API) failures.
const CLI_PREFIXES: &[&str] = &[
    "Error: ",
    "Unknown field",
    "Unknown command",
    "Required parameter not found",
    "Syntax error",
    "For usage run",
];

impl XeError {
    /// Classify a non-zero exit of `xe` from what it printed.
    pub fn from_output(args: &[String], status: i32, message: &str) -> XeError {
        let message = message.trim().to_string();
        let lines: Vec<&str> = message.lines().map(str::trim).collect();
        let first = lines.first().copied().unwrap_or("");
        let args = args.to_vec();
        if first.contains("Connection refused") {
            return XeError::Unavailable { args, message };
        }
        if let Some(code) = lines.iter().find_map(|l| l.strip_prefix("Error code: ")) {
            let params = lines
                .iter()
                .find_map(|l| l.strip_prefix("Error parameters: "))
                .map(|p| p.split(", ").map(str::to_string).collect())
                .unwrap_or_default();
            return Self::api(args, code.trim().to_string(), params, message);
        }
        if let Some((code, _)) = DESCRIPTIONS.iter().find(|(_, d)| first.starts_with(d)) {
            let params = lines[1..]
                .iter()
                .filter_map(|l| l.split_once(": ").map(|(_, v)| v.to_string()))
                .collect();
            return Self::api(args, code.to_string(), params, message);
        }
        if CLI_PREFIXES.iter().any(|p| first.starts_with(p)) {
            return XeError::Cli { args, message };
        }
        XeError::Failed {
            args,
            status,
            message,
        }
    }

    fn api(args: Vec<String>, code: String, params: Vec<String>, message: String) -> XeError {
        if code == "HOST_STILL_BOOTING" {
            XeError::Unavailable { args, message }
        } else {
            XeError::Api { args, code, params }
        }
    }

    /// The API error code, when xapi refused the call.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            XeError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// xapi down or starting: the only failures worth retrying.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, XeError::Unavailable { .. })
    }

    /// The deadline passed; the call may still take effect inside xapi.
    pub fn is_timeout(&self) -> bool {
        matches!(self, XeError::TimedOut { .. })
    }

    /// The first `xe` argument (the command name), for messages.
    pub fn command(&self) -> &str {
        match self {
            XeError::TimedOut { args, .. }
            | XeError::Unavailable { args, .. }
            | XeError::Api { args, .. }
            | XeError::Cli { args, .. }
            | XeError::Malformed { args, .. }
            | XeError::Failed { args, .. } => args.first().map(String::as_str).unwrap_or(""),
            XeError::Missing { .. } | XeError::BadArgument { .. } => "",
        }
    }
}

/// Several lines as one.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

impl fmt::Display for XeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XeError::Missing { program, reason } => write!(
                f,
                "cannot run `{program}`: {reason}; is this an XCP-ng dom0? (set CORAL_XE to the xe path)"
            ),
            XeError::TimedOut { args, after } => write!(
                f,
                "`xe {}` did not answer within {} s and was stopped (xapi may still complete it)",
                display_args(args),
                after.as_secs_f32()
            ),
            XeError::Unavailable { args, message } => write!(
                f,
                "xapi is not available for `xe {}`: {}; check `systemctl status xapi`",
                display_args(args),
                one_line(message)
            ),
            XeError::Api { args, code, params } => write!(
                f,
                "`xe {}` was refused: {code}{}",
                display_args(args),
                if params.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", params.join(", "))
                }
            ),
            XeError::Cli { args, message } => write!(
                f,
                "`xe {}` failed: {}",
                display_args(args),
                one_line(message)
            ),
            XeError::BadArgument { arg } => write!(
                f,
                "{arg:?} holds a line break, which xe would split into several arguments"
            ),
            XeError::Malformed { args, reason } => write!(
                f,
                "`xe {}` answered with malformed output ({reason}); nothing was changed",
                display_args(args)
            ),
            XeError::Failed {
                args,
                status,
                message,
            } => write!(
                f,
                "`xe {}` failed (exit {status}): {}",
                display_args(args),
                one_line(message)
            ),
        }
    }
}

impl std::error::Error for XeError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(text: &str) -> XeError {
        XeError::from_output(&["vm-start".into()], 1, text)
    }

    #[test]
    fn classifies_xe_texts() {
        assert!(classify("Error: Connection refused (calling connect )\n").is_unavailable());
        assert!(
            classify("The host toolstack is still initialising. Please wait.\n").is_unavailable()
        );
        let e = classify("You attempted an operation on a VM that was not in an appropriate power state at the time; for example, you attempted to start a VM that was already running.  The parameters returned are the VM's handle, and the expected and actual VM state at the time of the call.\nvm: abc (x)\nexpected: halted\nactual: running\n");
        assert_eq!(
            e,
            XeError::Api {
                args: vec!["vm-start".into()],
                code: "VM_BAD_POWER_STATE".into(),
                params: vec!["abc (x)".into(), "halted".into(), "running".into()]
            }
        );
        let e = classify("Error code: SOMETHING_ODD\nError parameters: x, y\n");
        assert_eq!(e.api_code(), Some("SOMETHING_ODD"));
        assert!(matches!(
            classify("Error: No matching VMs found"),
            XeError::Cli { .. }
        ));
        assert!(matches!(
            classify("Unknown field 'frigate'"),
            XeError::Cli { .. }
        ));
        assert!(matches!(
            classify("Required parameter not found: uuid\nFor usage run: 'xe help'"),
            XeError::Cli { .. }
        ));
        assert!(matches!(classify("segfault"), XeError::Failed { .. }));
        assert_eq!(
            classify("Another operation involving the object is currently in progress\nclass: VM\nobject: abc\n")
                .api_code(),
            Some("OTHER_OPERATION_IN_PROGRESS")
        );
    }

    #[test]
    fn every_message_is_one_line() {
        let e = classify("Error code: X\nError parameters: a\n");
        assert!(!e.to_string().contains('\n'));
        let e = XeError::BadArgument {
            arg: "name-label=a\nb".into(),
        };
        assert!(!e.to_string().contains('\n'), "{e}");
    }
}
