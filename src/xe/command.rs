//! The one file that starts processes: the real `xe`.
//!
//! CONTRACT (bodies to be written).

use super::{XeError, XeRunner};
use std::path::PathBuf;
use std::time::Duration;

/// Runs the real `xe`: `$CORAL_XE`, else `xe` on PATH, else `/opt/xensource/bin/xe`.
#[derive(Clone, Debug)]
pub struct XeCommand {
    /// The executable.
    pub program: PathBuf,
}

impl XeCommand {
    /// Pick the executable as documented above.
    pub fn from_env() -> Self {
        todo!("xe::command::XeCommand::from_env")
    }
}

impl XeRunner for XeCommand {
    fn run(&self, args: &[String], timeout: Duration) -> Result<String, XeError> {
        let _ = (args, timeout);
        todo!("xe::command::XeCommand::run")
    }
}
