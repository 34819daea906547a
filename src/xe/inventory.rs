//! This host's uuid, from `/etc/xensource-inventory` (`INSTALLATION_UUID='…'`).

use crate::error::{fail, FailureKind};
use std::path::Path;

/// Where XCP-ng keeps the inventory (env `CORAL_INVENTORY` overrides it, in `app`).
pub const DEFAULT_INVENTORY: &str = "/etc/xensource-inventory";

/// `INSTALLATION_UUID` of this host; a clear `FailureKind::Xapi` error naming
/// the file when it is missing or lacks the key.
pub fn this_host_uuid(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        fail(
            FailureKind::Xapi,
            format!(
                "cannot read this host's uuid from {} ({e}); is this an XCP-ng dom0? (CORAL_INVENTORY names another file)",
                path.display()
            ),
        )
    })?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("INSTALLATION_UUID="))
        .map(|value| {
            value
                .trim()
                .trim_matches(|c| c == '\'' || c == '"')
                .to_string()
        })
        .find(|uuid| !uuid.is_empty())
        .ok_or_else(|| {
            fail(
                FailureKind::Xapi,
                format!(
                    "{} has no INSTALLATION_UUID; is this an XCP-ng dom0?",
                    path.display()
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_quoted_uuid_and_explains_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inventory");
        std::fs::write(
            &path,
            "BUILD_NUMBER='release/yangtze'\nINSTALLATION_UUID='abc-123'\n",
        )
        .unwrap();
        assert_eq!(this_host_uuid(&path).unwrap(), "abc-123");
        let err = this_host_uuid(&dir.path().join("missing")).unwrap_err();
        assert_eq!(crate::error::exit_code_of(&err), 7);
        assert!(err.to_string().contains("XCP-ng dom0"));
    }
}
