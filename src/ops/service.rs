//! `coral service install|show|uninstall`: the boot-time oneshot unit.
//!
//! CONTRACT (bodies to be written). Each returns the text to print.

use std::path::{Path, PathBuf};

/// Unit file name.
pub const UNIT_NAME: &str = "coral-up.service";

/// What the unit runs.
#[derive(Clone, Debug, Default)]
pub struct ServiceSpec {
    /// Absolute path of the coral binary (ExecStart).
    pub exe: PathBuf,
    /// VM uuid or exact name-label.
    pub vm: String,
    /// Pass `--start`.
    pub start: bool,
    /// Pass `--restart`.
    pub restart: bool,
    /// Pass `--device`.
    pub device: Option<String>,
    /// Pass `--firmware`.
    pub firmware: Option<PathBuf>,
}

/// The unit text.
pub fn unit_text(spec: &ServiceSpec) -> String {
    let _ = spec;
    todo!("ops::service::unit_text")
}

/// Write the unit under `root` (default `/`), daemon-reload and enable (only without `root`).
pub fn install(spec: &ServiceSpec, root: Option<&Path>) -> anyhow::Result<String> {
    let _ = (spec, root);
    todo!("ops::service::install")
}

/// The installed unit's text.
pub fn show(root: Option<&Path>) -> anyhow::Result<String> {
    let _ = root;
    todo!("ops::service::show")
}

/// Disable and remove the unit.
pub fn uninstall(root: Option<&Path>) -> anyhow::Result<String> {
    let _ = root;
    todo!("ops::service::uninstall")
}
