//! What coral remembers about each Coral → VM mapping between runs: whether
//! an admin paused it (`coral detach`), and what `coral watch` last did and
//! when. One small JSON file, `$CORAL_STATE_DIR/mappings.json` (default
//! [`crate::DATA_DIR`]`/mappings.json`).
//!
//! Every change is a read-modify-write under the state file's own lock
//! (`.mappings.lock`, 0600, next to it), written durably and atomically
//! ([`crate::atomic_file`]). A file that cannot be parsed is never silently
//! overwritten with defaults: it is kept aside as
//! `mappings.json.unreadable-<UTC time>`, an error line says that the pauses
//! recorded there are lost, and `coral doctor` and `coral status` say so
//! until the admin deletes the kept file. Recovery goes on from the config:
//! bringing the Coral back after a power loss is the job.

use crate::error::NextStep;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The file's name inside that directory.
const FILE_NAME: &str = "mappings.json";
/// The state file's own lock, next to it: every read-modify-write holds it.
const LOCK_NAME: &str = ".mappings.lock";
/// What an unreadable state file kept aside is called, before its time.
const ASIDE_PREFIX: &str = "mappings.json.unreadable-";
/// The state file's mode.
const FILE_MODE: u32 = 0o644;

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
    /// Written before coral begins a clean shutdown of the VM (write-ahead),
    /// cleared once it runs again or coral has finished with it: present
    /// after a run that died in between, so the next run starts the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_intent: Option<RestartIntent>,
}

/// A restart coral began: the VM is to run again once it has halted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartIntent {
    /// The VM and what the restart was for, one line.
    #[serde(default)]
    pub why: String,
    /// When it was recorded, seconds since the Unix epoch.
    #[serde(default)]
    pub at: u64,
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

    /// The states; an absent file is an empty state, an unreadable one an
    /// error (`InvalidData` when it cannot be parsed).
    pub fn load(&self) -> io::Result<MappingStates> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(MappingStates::default()),
            Err(e) => Err(e),
        }
    }

    /// The states, for a run that acts on them (the boot path, the
    /// watcher): a file that cannot be parsed is kept aside (see the module
    /// doc) and counts as empty; one that cannot be read at all counts as
    /// empty (logged). Recovery is the safe default.
    pub fn load_or_recover(&self) -> MappingStates {
        match self.load() {
            Ok(states) => states,
            Err(e) if e.kind() == io::ErrorKind::InvalidData && !self.read_only => {
                let recovered = self.modify(|_| false);
                if let Err(e) = recovered {
                    log::error!("cannot set aside {}: {e}", self.path.display());
                }
                self.load().unwrap_or_default()
            }
            Err(e) => {
                log::error!(
                    "cannot read {} ({e}): the pauses recorded there are not honoured",
                    self.path.display()
                );
                MappingStates::default()
            }
        }
    }

    /// True when the mapping of `vm_uuid` is paused. An unreadable file
    /// counts as "not paused" (logged, kept aside): recovery is the safe default.
    pub fn is_paused(&self, vm_uuid: &str) -> bool {
        self.load_or_recover()
            .mappings
            .get(vm_uuid)
            .is_some_and(|s| s.paused)
    }

    /// Change one mapping's state and write the file back.
    pub fn update(&self, vm_uuid: &str, change: impl FnOnce(&mut MappingState)) -> io::Result<()> {
        self.modify(|states| {
            change(states.mappings.entry(vm_uuid.to_string()).or_default());
            true
        })
    }

    /// Pause or resume a mapping (`coral detach` pauses; `attach`/`up` resume).
    pub fn set_paused(&self, vm_uuid: &str, vm_name: &str, paused: bool) -> io::Result<()> {
        self.modify(|states| {
            let unchanged = states
                .mappings
                .get(vm_uuid)
                .map_or(!paused, |s| s.paused == paused);
            if !unchanged {
                let state = states.mappings.entry(vm_uuid.to_string()).or_default();
                state.paused = paused;
                state.vm_name = vm_name.to_string();
            }
            !unchanged
        })
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

    /// Record, before the shutdown begins, that coral is about to shut the
    /// VM down and will start it again (durable once this returns).
    pub fn record_intent(&self, vm_uuid: &str, why: &str) -> io::Result<()> {
        self.update(vm_uuid, |s| {
            s.restart_intent = Some(RestartIntent {
                why: why.to_string(),
                at: unix_now(),
            });
        })
    }

    /// Forget the VM's restart intent (nothing is written when there is none).
    pub fn clear_intent(&self, vm_uuid: &str) -> io::Result<()> {
        self.modify(|states| {
            states
                .mappings
                .get_mut(vm_uuid)
                .and_then(|s| s.restart_intent.take())
                .is_some()
        })
    }

    /// Every VM with a restart intent, as a run that acts on it reads them
    /// ([`Self::load_or_recover`]: an unparseable file is kept aside, and
    /// its intents are lost).
    pub fn intents(&self) -> Vec<(String, MappingState)> {
        self.load_or_recover()
            .mappings
            .into_iter()
            .filter(|(_, s)| s.restart_intent.is_some())
            .collect()
    }

    /// Forget the records `keep` refuses (VMs XAPI no longer has); the
    /// uuids forgotten.
    pub fn prune(&self, keep: impl Fn(&str) -> bool) -> io::Result<Vec<String>> {
        let mut gone = Vec::new();
        self.modify(|states| {
            states.mappings.retain(|uuid, _| {
                let kept = keep(uuid);
                if !kept {
                    gone.push(uuid.clone());
                }
                kept
            });
            !gone.is_empty()
        })?;
        Ok(gone)
    }

    /// What is wrong with the state, for `coral status` and `coral doctor`:
    /// a file that cannot be read or parsed now, and every unreadable file
    /// kept aside (each one's pauses are lost): what, and the next step.
    pub fn problems(&self) -> Vec<(String, NextStep)> {
        let redo = |file: &Path| NextStep::RedoPausesThenDelete {
            aside: file.display().to_string(),
        };
        let mut problems = Vec::new();
        if let Err(e) = self.load() {
            problems.push((
                format!(
                    "{} cannot be read ({e}): the pauses recorded there are lost",
                    self.path.display()
                ),
                redo(&self.path),
            ));
        }
        for aside in self.kept_aside() {
            problems.push((
                format!(
                    "the mapping state was unreadable and is kept aside as {}: the pauses recorded there are lost",
                    aside.display(),
                ),
                redo(&aside),
            ));
        }
        problems
    }

    /// Unreadable state files kept aside, oldest first.
    pub fn kept_aside(&self) -> Vec<PathBuf> {
        let dir = crate::atomic_file::directory_of(&self.path);
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|entry| entry.ok())
            .filter(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(ASIDE_PREFIX)
            })
            .map(|entry| entry.path())
            .collect();
        found.sort();
        found
    }

    /// Read, change and write the states under the state file's lock. A
    /// file that cannot be parsed is kept aside first (never overwritten);
    /// `change` says whether anything changed (false: nothing is written).
    fn modify(&self, change: impl FnOnce(&mut MappingStates) -> bool) -> io::Result<()> {
        if self.read_only {
            log::debug!("dry run: would update {}", self.path.display());
            return Ok(());
        }
        let dir = crate::atomic_file::directory_of(&self.path);
        std::fs::create_dir_all(dir)?;
        let _lock = crate::lock::hold_file_lock(&dir.join(LOCK_NAME))?;
        let mut states = match self.load() {
            Ok(states) => states,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                self.set_aside(&e)?;
                MappingStates::default()
            }
            Err(e) => return Err(e),
        };
        if !change(&mut states) {
            return Ok(());
        }
        let text = serde_json::to_string_pretty(&states).map_err(io::Error::other)?;
        crate::atomic_file::write(&self.path, (text + "\n").as_bytes(), FILE_MODE)
    }

    /// Keep the unparseable file as `mappings.json.unreadable-<UTC time>`
    /// and say, at error priority, that its pauses are lost.
    fn set_aside(&self, error: &io::Error) -> io::Result<()> {
        let dir = crate::atomic_file::directory_of(&self.path);
        let stamp = utc_stamp(unix_now());
        let mut aside = dir.join(format!("{ASIDE_PREFIX}{stamp}"));
        for n in 2.. {
            if std::fs::symlink_metadata(&aside).is_err() {
                break;
            }
            aside = dir.join(format!("{ASIDE_PREFIX}{stamp}-{n}"));
        }
        std::fs::rename(&self.path, &aside)?;
        crate::atomic_file::sync_dir(dir)?;
        log::error!(
            "{} cannot be parsed ({error}); kept aside as {}: the pauses recorded there are lost, so every mapping is recovered as if none were paused; {}",
            self.path.display(),
            aside.display(),
            NextStep::RedoPausesThenDelete {
                aside: aside.display().to_string()
            }
        );
        Ok(())
    }
}

/// `20261206T021500Z` for a time in seconds since the Unix epoch (UTC).
fn utc_stamp(unix: u64) -> String {
    let days = i64::try_from(unix / 86_400).unwrap_or(0);
    let secs = unix % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
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
    fn an_unparseable_file_is_kept_aside_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::in_dir(dir.path());
        store.set_paused("vm-a", "frigate", true).unwrap();
        let whole = std::fs::read(store.path()).unwrap();
        std::fs::write(store.path(), &whole[..whole.len() / 2]).unwrap();
        assert_eq!(store.problems().len(), 1, "{:?}", store.problems());
        store
            .record_action("vm-b", "nvr", "recovered", true)
            .unwrap();
        let aside = store.kept_aside();
        assert_eq!(aside.len(), 1);
        assert_eq!(std::fs::read(&aside[0]).unwrap(), &whole[..whole.len() / 2]);
        let problems = store.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].0.contains("pauses recorded there are lost"));
        assert!(store.load().unwrap().mappings.contains_key("vm-b"));
    }

    #[test]
    fn concurrent_changes_are_never_lost() {
        let dir = tempfile::tempdir().unwrap();
        let writers: Vec<_> = (0..6)
            .map(|i| {
                let store = StateStore::in_dir(dir.path());
                std::thread::spawn(move || {
                    for n in 0..15 {
                        store
                            .record_action(&format!("vm-{i}"), "vm", &format!("step {n}"), true)
                            .unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let states = StateStore::in_dir(dir.path()).load().unwrap();
        assert_eq!(states.mappings.len(), 6, "{states:?}");
        for state in states.mappings.values() {
            assert_eq!(state.last_action.as_deref(), Some("step 14"));
        }
    }

    #[test]
    fn stamps_are_utc() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
        assert_eq!(utc_stamp(1_796_523_305), "20261206T021505Z");
    }

    #[test]
    fn an_intent_is_recorded_and_cleared_and_old_files_parse() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::in_dir(dir.path());
        std::fs::write(
            store.path(),
            r#"{"mappings":{"vm-a":{"vm_name":"frigate","paused":true}}}"#,
        )
        .unwrap();
        assert!(store.intents().is_empty());
        store.record_intent("vm-b", "shut down to attach").unwrap();
        let intents = store.intents();
        assert_eq!(intents.len(), 1);
        assert_eq!(intents[0].0, "vm-b");
        assert!(store.is_paused("vm-a"));
        store.clear_intent("vm-b").unwrap();
        assert!(store.intents().is_empty());
        assert!(!std::fs::read_to_string(store.path())
            .unwrap()
            .contains("restart_intent"));
    }

    #[test]
    fn a_resume_of_an_unknown_mapping_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::in_dir(dir.path());
        store.set_paused("vm-a", "frigate", false).unwrap();
        assert!(!store.path().exists());
    }
}
