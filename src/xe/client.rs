//! Typed XAPI calls on top of an [`XeRunner`], scoped to this host.
//!
//! CONTRACT (bodies to be written; add the typed calls attach/detach/status need).

use super::XeRunner;
use std::cell::RefCell;

/// Typed `xe` calls for this host. In dry-run mode mutating calls are not
/// run but recorded (and logged) exactly as they would run.
pub struct XeClient<'a> {
    runner: &'a dyn XeRunner,
    host_uuid: String,
    dry_run: bool,
    planned: RefCell<Vec<String>>,
}

impl<'a> XeClient<'a> {
    /// A client for the host with `host_uuid`.
    pub fn new(runner: &'a dyn XeRunner, host_uuid: String, dry_run: bool) -> Self {
        XeClient {
            runner,
            host_uuid,
            dry_run,
            planned: RefCell::new(Vec::new()),
        }
    }

    /// This host's uuid.
    pub fn host_uuid(&self) -> &str {
        &self.host_uuid
    }

    /// In dry-run mode: the mutating commands that would have run, each as
    /// `xe <args>` quoted for a shell user.
    pub fn planned_commands(&self) -> Vec<String> {
        let _ = (self.runner, self.dry_run);
        self.planned.borrow().clone()
    }
}
