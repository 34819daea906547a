//! This host's uuid, from `/etc/xensource-inventory` (`INSTALLATION_UUID='…'`).
//!
//! CONTRACT (bodies to be written).

use std::path::Path;

/// Where XCP-ng keeps the inventory (env `CORAL_INVENTORY` overrides it, in `app`).
pub const DEFAULT_INVENTORY: &str = "/etc/xensource-inventory";

/// `INSTALLATION_UUID` of this host; a clear `FailureKind::Xapi` error naming
/// the file when it is missing or lacks the key.
pub fn this_host_uuid(path: &Path) -> anyhow::Result<String> {
    let _ = path;
    todo!("xe::inventory::this_host_uuid")
}
