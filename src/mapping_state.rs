//! What coral remembers about each Coral → VM mapping between runs: whether
//! an admin paused it (`coral detach`), and what `coral watch` last did and
//! when. One small JSON file, `$CORAL_STATE_DIR/mappings.json` (default
//! [`crate::DATA_DIR`]`/mappings.json`), written atomically (temporary file +
//! rename), so a reader never sees half a file.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The file's name inside that directory.
const FILE_NAME: &str = "mappings.json";

/// The state of one mapping, keyed by the VM's uuid.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingState {
    /// The VM's name-label when last seen (for people).
    #[serde(default)]
    pub vm_name: String,
    /// Paused by `coral detach`: the watcher leaves this mapping alone until
    /// `coral attach` or `coral up` for the VM resumes it.
    #[serde(default)]
    pub paused: bool,
    /// The watcher's last action, one line.
    #[serde(default)]
    pub last_action: Option<String>,
    /// When that was, seconds since the Unix epoch.
    #[serde(default)]
    pub last_action_at: Option<u64>,
    /// Whether that action succeeded.
    #[serde(default)]
    pub last_action_ok: Option<bool>,
}

/// Every mapping's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingStates {
    /// VM uuid → state.
    #[serde(default)]
    pub mappings: BTreeMap<String, MappingState>,
}

/// The state file, read and written whole.
#[derive(Clone, Debug)]
pub struct StateStore {
    path: PathBuf,
    read_only: bool,
}

impl StateStore {
    /// The store in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        StateStore {
            path: dir.join(FILE_NAME),
            read_only: false,
        }
    }

    /// The store named by `$CORAL_STATE_DIR`, else the default directory.
    pub fn from_env() -> Self {
        let dir = std::env::var_os("CORAL_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(crate::DATA_DIR));
        Self::in_dir(&dir)
    }

    /// The same store, read but never written (`--dry-run`).
    pub fn read_only(self) -> Self {
        StateStore {
            read_only: true,
            ..self
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The states; an absent file is an empty state, an unreadable one an error.
    pub fn load(&self) -> io::Result<MappingStates> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(MappingStates::default()),
            Err(e) => Err(e),
        }
    }

    /// True when the mapping of `vm_uuid` is paused. An unreadable file
    /// counts as "not paused" (logged): recovery is the safe default.
    pub fn is_paused(&self, vm_uuid: &str) -> bool {
        match self.load() {
            Ok(states) => states.mappings.get(vm_uuid).is_some_and(|s| s.paused),
            Err(e) => {
                log::warn!("cannot read {}: {e}", self.path.display());
                false
            }
        }
    }

    /// Change one mapping's state and write the file back.
    pub fn update(&self, vm_uuid: &str, change: impl FnOnce(&mut MappingState)) -> io::Result<()> {
        let mut states = self.load().unwrap_or_default();
        change(states.mappings.entry(vm_uuid.to_string()).or_default());
        self.save(&states)
    }

    /// Pause or resume a mapping (`coral detach` pauses; `attach`/`up` resume).
    pub fn set_paused(&self, vm_uuid: &str, vm_name: &str, paused: bool) -> io::Result<()> {
        let mut states = self.load().unwrap_or_default();
        let unchanged = states
            .mappings
            .get(vm_uuid)
            .map_or(!paused, |s| s.paused == paused);
        if unchanged {
            return Ok(());
        }
        let state = states.mappings.entry(vm_uuid.to_string()).or_default();
        state.paused = paused;
        state.vm_name = vm_name.to_string();
        self.save(&states)
    }

    /// Record what the watcher just did for a mapping.
    pub fn record_action(
        &self,
        vm_uuid: &str,
        vm_name: &str,
        line: &str,
        ok: bool,
    ) -> io::Result<()> {
        self.update(vm_uuid, |s| {
            s.vm_name = vm_name.to_string();
            s.last_action = Some(line.to_string());
            s.last_action_at = Some(unix_now());
            s.last_action_ok = Some(ok);
        })
    }

    fn save(&self, states: &MappingStates) -> io::Result<()> {
        if self.read_only {
            log::debug!("dry run: would update {}", self.path.display());
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(states).map_err(io::Error::other)?;
        std::fs::write(&tmp, text + "\n")?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// Seconds since the Unix epoch now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_resumes_and_records_without_losing_other_mappings() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::in_dir(dir.path());
        assert!(!store.is_paused("vm-a"));
        store.set_paused("vm-a", "frigate", true).unwrap();
        store
            .record_action("vm-b", "nvr", "recovered", true)
            .unwrap();
        assert!(store.is_paused("vm-a"));
        assert!(!store.is_paused("vm-b"));
        store.set_paused("vm-a", "frigate", false).unwrap();
        let states = store.load().unwrap();
        assert!(!states.mappings["vm-a"].paused);
        assert_eq!(
            states.mappings["vm-b"].last_action.as_deref(),
            Some("recovered")
        );
        assert_eq!(states.mappings["vm-b"].last_action_ok, Some(true));
    }

    #[test]
    fn a_resume_of_an_unknown_mapping_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::in_dir(dir.path());
        store.set_paused("vm-a", "frigate", false).unwrap();
        assert!(!store.path().exists());
    }
}
