//! The one file that starts processes: the real `xe`.

use super::{display_args, Answered, StartedCall, XeError, XeRunner};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where XCP-ng installs `xe` when it is not on PATH.
pub const XE_FALLBACK: &str = "/opt/xensource/bin/xe";
/// How often a running `xe` is checked for exit.
const WAIT_POLL: Duration = Duration::from_millis(5);

/// Runs the real `xe`: `$CORAL_XE`, else `xe` on PATH, else `/opt/xensource/bin/xe`.
#[derive(Clone, Debug)]
pub struct XeCommand {
    /// The executable.
    pub program: PathBuf,
}

impl XeCommand {
    /// Pick the executable as documented above.
    pub fn from_env() -> Self {
        let program = std::env::var_os("CORAL_XE")
            .map(PathBuf::from)
            .or_else(|| find_on_path("xe"))
            .unwrap_or_else(|| PathBuf::from(XE_FALLBACK));
        XeCommand { program }
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

impl XeRunner for XeCommand {
    fn run(&self, args: &[String], timeout: Duration) -> Result<String, XeError> {
        self.spawn(args, timeout)?.finish()
    }

    fn start<'r>(&'r self, args: &[String], timeout: Duration) -> Box<dyn StartedCall + 'r> {
        match self.spawn(args, timeout) {
            Ok(running) => Box::new(running),
            Err(err) => Box::new(Answered(Err(err))),
        }
    }
}

impl XeCommand {
    /// Start the process; [`Running::finish`] waits for it.
    fn spawn(&self, args: &[String], timeout: Duration) -> Result<Running, XeError> {
        log::trace!("xe {}", display_args(args));
        let started = Instant::now();
        let mut child = Command::new(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| XeError::Missing {
                program: self.program.display().to_string(),
                reason: e.to_string(),
            })?;
        let stdout = reader(child.stdout.take());
        let stderr = reader(child.stderr.take());
        Ok(Running {
            program: self.program.display().to_string(),
            args: args.to_vec(),
            started,
            timeout,
            child: Reaped(Some(child)),
            stdout,
            stderr,
        })
    }
}

/// An `xe` process under way.
struct Running {
    program: String,
    args: Vec<String>,
    started: Instant,
    timeout: Duration,
    child: Reaped,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

impl Running {
    /// Wait for the exit (killing it at its deadline) and classify it.
    fn finish(mut self) -> Result<String, XeError> {
        let Some(mut child) = self.child.0.take() else {
            return Err(XeError::Missing {
                program: self.program,
                reason: "already collected".into(),
            });
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if self.started.elapsed() >= self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(XeError::TimedOut {
                        args: self.args,
                        after: self.timeout,
                    });
                }
                Ok(None) => std::thread::sleep(WAIT_POLL),
                Err(e) => {
                    return Err(XeError::Missing {
                        program: self.program,
                        reason: e.to_string(),
                    })
                }
            }
        };
        let args = self.args;
        let stdout = self.stdout.join().unwrap_or_default();
        let stderr = self.stderr.join().unwrap_or_default();
        log::debug!(
            "xe {} answered in {:.1} ms",
            args.first().map(String::as_str).unwrap_or(""),
            self.started.elapsed().as_secs_f64() * 1000.0
        );
        if status.success() {
            Ok(stdout)
        } else {
            let message = if stderr.trim().is_empty() {
                stdout
            } else {
                stderr
            };
            Err(XeError::from_output(
                &args,
                status.code().unwrap_or(-1),
                &message,
            ))
        }
    }
}

impl StartedCall for Running {
    fn wait(self: Box<Self>) -> Result<String, XeError> {
        (*self).finish()
    }
}

/// The process until it is waited for: an abandoned read is killed and
/// reaped (no zombie, no stray `xe`).
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Read a pipe to the end on its own thread (so a full pipe never blocks xe).
fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_xe_is_a_missing_error() {
        let xe = XeCommand {
            program: "/nonexistent/xe".into(),
        };
        let err = xe
            .run(&["vm-list".into()], Duration::from_secs(1))
            .unwrap_err();
        assert!(matches!(err, XeError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("CORAL_XE"));
    }

    #[test]
    fn a_hanging_xe_is_killed_at_its_deadline() {
        let xe = XeCommand {
            program: "/bin/sleep".into(),
        };
        let err = xe
            .run(&["5".into()], Duration::from_millis(100))
            .unwrap_err();
        assert!(matches!(err, XeError::TimedOut { .. }), "{err}");
    }

    #[test]
    fn arguments_reach_xe_unchanged_without_a_shell() {
        let xe = XeCommand {
            program: "/bin/echo".into(),
        };
        let out = xe
            .run(&["name-label=a b;$(reboot)".into()], Duration::from_secs(5))
            .unwrap();
        assert_eq!(out, "name-label=a b;$(reboot)\n");
    }
}
