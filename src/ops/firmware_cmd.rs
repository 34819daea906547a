//! `coral firmware show|install|fetch`.
//!
//! CONTRACT (bodies to be written). Each returns the text to print.

use crate::firmware::FirmwareChoice;
use std::path::Path;

/// Which image would be used, from where, and its checksum.
pub fn show(choice: &FirmwareChoice) -> anyhow::Result<String> {
    let _ = choice;
    todo!("ops::firmware_cmd::show")
}

/// Verify `file` and install it atomically under `dir`.
pub fn install(file: &Path, dir: &Path, allow_unknown: bool) -> anyhow::Result<String> {
    let _ = (file, dir, allow_unknown);
    todo!("ops::firmware_cmd::install")
}

/// Download the pinned default image with `curl`, verify, install under `dir`.
pub fn fetch(dir: &Path) -> anyhow::Result<String> {
    let _ = dir;
    todo!("ops::firmware_cmd::fetch")
}
