//! The Coral → VM mappings the boot service (and later `coral watch`)
//! recovers: `/etc/coral/coral.toml`, or the file named by `$CORAL_CONFIG`.
//!
//! ```toml
//! [[coral]]
//! vm = "3c6ef362-1f42-4a5d-9b1e-f6a9dbd967af"  # the VM's uuid: what coral uses
//! vm_name = "frigate"                           # for people only
//! device = "2-4"                                # optional: the Coral's USB port path
//! start = false                                 # start the VM if it is halted
//! restart = false                               # restart it if it runs without its Coral
//! ```
//!
//! Reading checks everything a hand edit can get wrong and reports the first
//! mistake as one line with the file's line number, before any USB or `xe`
//! call. `coral service install` writes the file (VM resolved and checked).

use crate::error::{fail, fail_then, FailureKind, NextStep};
use crate::usb::PortPath;
pub use crate::xe::looks_like_uuid;
use serde::Deserialize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the config lives unless `$CORAL_CONFIG` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/coral/coral.toml";
/// The mode of the files `coral service install` writes (the config, units).
const FILE_MODE: u32 = 0o644;
/// Env var naming another config file.
pub const PATH_ENV: &str = "CORAL_CONFIG";

/// One Coral → VM mapping.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Entry {
    /// The VM's uuid (resolved when the entry was written).
    pub vm_uuid: String,
    /// The VM's name-label when the entry was written (for people).
    pub vm_name: String,
    /// The Coral's USB port path (`2-1.4`); any bus of the same port chain
    /// matches, so the boot loader's `1-4` and the ready `2-4` are one Coral.
    pub device: Option<String>,
    /// Start the VM if it is halted (instead of relying on auto_poweron).
    pub start: bool,
    /// Restart the VM (cleanly) if it runs without its Coral.
    pub restart: bool,
    /// Its own deadlines, where they differ from the defaults.
    pub deadlines: Deadlines,
}

/// An entry's deadlines in seconds (None: the default; at boot each is
/// also capped by the boot budget).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Deadlines {
    /// Waiting for the Coral to come back as 18d1:9302 after the upload.
    pub replug_timeout: Option<f64>,
    /// Waiting for XAPI's scan to list the ready Coral.
    pub scan_timeout: Option<f64>,
    /// Waiting for a clean shutdown (restarts only).
    pub shutdown_timeout: Option<f64>,
}

impl Deadlines {
    /// One of these deadlines as a duration, else `default`.
    pub fn or(value: Option<f64>, default: Duration) -> Duration {
        value
            .and_then(|s| crate::clock::checked_seconds(s, false).ok())
            .unwrap_or(default)
    }

    /// Each deadline present, as `(key, seconds)`, in file order.
    fn present(&self) -> Vec<(&'static str, f64)> {
        [
            ("replug_timeout", self.replug_timeout),
            ("scan_timeout", self.scan_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
        ]
        .into_iter()
        .filter_map(|(key, value)| value.map(|v| (key, v)))
        .collect()
    }
}

impl Entry {
    /// `VM 'name' (uuid)` for messages.
    pub fn label(&self) -> String {
        if self.vm_name.is_empty() {
            format!("VM {}", self.vm_uuid)
        } else {
            format!("VM '{}' ({})", self.vm_name, self.vm_uuid)
        }
    }

    /// Whether two entries are for the same Coral (same port chain).
    fn same_device(&self, other: &Entry) -> bool {
        match (&self.device, &other.device) {
            (Some(a), Some(b)) => same_chain(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    /// Mappings in file order.
    pub entries: Vec<Entry>,
}

/// Where the config is read and written now, and what the boot unit must
/// be told (`Environment=CORAL_CONFIG=…`) when it is not the default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigPath {
    /// The file this run reads and writes.
    pub file: PathBuf,
    /// Set when `$CORAL_CONFIG` names a non-default file: the unit passes it on.
    pub from_env: Option<PathBuf>,
}

impl ConfigPath {
    /// `$CORAL_CONFIG`, else `/etc/coral/coral.toml` under `root` (default `/`).
    pub fn resolve(root: Option<&Path>) -> Self {
        match std::env::var_os(PATH_ENV).filter(|v| !v.is_empty()) {
            Some(path) => {
                let path = PathBuf::from(path);
                let from_env = (path != Path::new(DEFAULT_PATH)).then(|| path.clone());
                ConfigPath {
                    file: path,
                    from_env,
                }
            }
            None => ConfigPath {
                file: root
                    .unwrap_or(Path::new("/"))
                    .join(DEFAULT_PATH.trim_start_matches('/')),
                from_env: None,
            },
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    coral: Vec<toml::Spanned<RawEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    vm: toml::Spanned<String>,
    #[serde(default)]
    vm_name: String,
    #[serde(default)]
    device: Option<toml::Spanned<String>>,
    #[serde(default)]
    start: bool,
    #[serde(default)]
    restart: bool,
    #[serde(default)]
    replug_timeout: Option<toml::Spanned<f64>>,
    #[serde(default)]
    scan_timeout: Option<toml::Spanned<f64>>,
    #[serde(default)]
    shutdown_timeout: Option<toml::Spanned<f64>>,
}

/// Read the config; `Ok(None)` when the file does not exist.
pub fn load(path: &Path) -> anyhow::Result<Option<Config>> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(fail(
            FailureKind::Other,
            format!("cannot read {}: {e}; run as root", path.display()),
        )),
    }
}

/// Parse and check a config text; the error is one line:
/// `<file>:<line>: <what is wrong>; <how to fix it>`.
pub fn parse(text: &str, path: &Path) -> anyhow::Result<Config> {
    let error = |span: Option<Range<usize>>, message: &str| {
        let line = span.map(|s| line_of(text, s.start)).unwrap_or(1);
        let message = message.lines().next().unwrap_or("").trim();
        fail_then(
            FailureKind::Other,
            format!("{}:{line}: {message}", path.display()),
            NextStep::FixConfig,
        )
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| error(e.span(), e.message()))?;
    let mut config = Config::default();
    let mut spans = Vec::new();
    for spanned in raw.coral {
        let span = spanned.span();
        let raw = spanned.into_inner();
        if !looks_like_uuid(raw.vm.get_ref()) {
            return Err(error(
                Some(raw.vm.span()),
                &format!(
                    "vm = {:?} is not a VM uuid (`xe vm-list name-label=NAME --minimal` prints it)",
                    raw.vm.get_ref()
                ),
            ));
        }
        if let Some(device) = &raw.device {
            if let Err(e) = device.get_ref().parse::<PortPath>() {
                return Err(error(Some(device.span()), &format!("device: {e}")));
            }
        }
        let seconds = |value: Option<toml::Spanned<f64>>, key: &str| match value {
            Some(v) => match crate::clock::checked_seconds(*v.get_ref(), false) {
                Ok(_) => Ok(Some(v.into_inner())),
                Err(why) => Err(error(
                    Some(v.span()),
                    &format!("{key} = {}: {why}", v.get_ref()),
                )),
            },
            None => Ok(None),
        };
        let deadlines = Deadlines {
            replug_timeout: seconds(raw.replug_timeout, "replug_timeout")?,
            scan_timeout: seconds(raw.scan_timeout, "scan_timeout")?,
            shutdown_timeout: seconds(raw.shutdown_timeout, "shutdown_timeout")?,
        };
        config.entries.push(Entry {
            vm_uuid: raw.vm.get_ref().to_ascii_lowercase(),
            vm_name: raw.vm_name,
            device: raw.device.map(|d| d.into_inner()),
            start: raw.start,
            restart: raw.restart,
            deadlines,
        });
        spans.push(span);
    }
    if let Err((index, message)) = config.check() {
        return Err(error(Some(spans[index].clone()), &message));
    }
    Ok(config)
}

impl Config {
    /// Rules across entries: with several entries each names its Coral, and
    /// one Coral goes to one VM. Err(index of the offending entry, message).
    pub fn check(&self) -> Result<(), (usize, String)> {
        for (i, entry) in self.entries.iter().enumerate() {
            if self.entries.len() > 1 && entry.device.is_none() {
                return Err((
                    i,
                    format!(
                        "{} has no device, but with several entries each needs `device = \"PATH\"` ({})",
                        entry.label(),
                        NextStep::StatusShowsPaths
                    ),
                ));
            }
            if let Some(earlier) = self.entries[..i].iter().find(|e| e.same_device(entry)) {
                return Err((
                    i,
                    format!(
                        "the Coral at {} is already mapped to {}; one Coral goes to one VM",
                        entry.device.as_deref().unwrap_or("(any)"),
                        earlier.label()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Add `entry`, or update the entry it replaces: the same VM and Coral,
    /// or (without a device) the VM's only entry, whose device is kept.
    /// Refuses a Coral already mapped to another VM.
    pub fn upsert(&mut self, mut entry: Entry) -> anyhow::Result<Upserted> {
        let same_vm: Vec<usize> = (0..self.entries.len())
            .filter(|&i| self.entries[i].vm_uuid == entry.vm_uuid)
            .collect();
        let target = match &entry.device {
            Some(_) => same_vm
                .iter()
                .copied()
                .find(|&i| self.entries[i].same_device(&entry)),
            None if same_vm.len() == 1 => {
                entry.device = self.entries[same_vm[0]].device.clone();
                Some(same_vm[0])
            }
            None => None,
        };
        if let Some(other) = self
            .entries
            .iter()
            .enumerate()
            .find(|(i, e)| Some(*i) != target && e.device.is_some() && e.same_device(&entry))
            .map(|(_, e)| e)
        {
            return Err(fail_then(
                FailureKind::Other,
                format!(
                    "the Coral at {} is already mapped to {}",
                    entry.device.as_deref().unwrap_or_default(),
                    other.label(),
                ),
                NextStep::UninstallFirst {
                    vm: other.vm_uuid.clone(),
                },
            ));
        }
        let mut next = self.clone();
        let outcome = match target {
            Some(i) if next.entries[i] == entry => Upserted::Unchanged,
            Some(i) => {
                next.entries[i] = entry;
                Upserted::Updated
            }
            None => {
                next.entries.push(entry);
                Upserted::Added
            }
        };
        if let Err((_, message)) = next.check() {
            return Err(fail_then(
                FailureKind::Other,
                message,
                NextStep::DeviceForEach,
            ));
        }
        *self = next;
        Ok(outcome)
    }

    /// Move `entry`'s VM to `entry`'s Coral (`service install --replace`):
    /// the VM's entries for other Corals are dropped, then `entry` is
    /// upserted. Returns what the upsert did and the entries dropped. Refused,
    /// with nothing changed, as [`Config::upsert`] refuses.
    pub fn replace_vm(&mut self, entry: Entry) -> anyhow::Result<(Upserted, Vec<Entry>)> {
        let mut next = self.clone();
        let (dropped, kept) = next
            .entries
            .drain(..)
            .partition(|e| e.vm_uuid == entry.vm_uuid && !e.same_device(&entry));
        next.entries = kept;
        let upserted = next.upsert(entry)?;
        *self = next;
        Ok((upserted, dropped))
    }

    /// The VM's entries for other Corals than `entry`'s (what a second
    /// `service install --device` keeps beside it).
    pub fn other_devices_of(&self, entry: &Entry) -> Vec<&Entry> {
        self.entries
            .iter()
            .filter(|e| e.vm_uuid == entry.vm_uuid && !e.same_device(entry))
            .collect()
    }

    /// Remove the entries whose VM uuid or recorded name is `vm`; returns them.
    pub fn remove_vm(&mut self, vm: &str) -> Vec<Entry> {
        let (gone, kept) = self.entries.drain(..).partition(|e| {
            e.vm_uuid.eq_ignore_ascii_case(vm) || (!e.vm_name.is_empty() && e.vm_name == vm)
        });
        self.entries = kept;
        gone
    }

    /// The file's text (comments explain each key).
    pub fn to_toml(&self) -> String {
        let mut text = String::from(
            "# Coral → VM mappings recovered at boot by coral-up.service (`coral up`).\n\
             # Written by `coral service install`; hand edits are checked on every run.\n\
             # Keys: vm (the VM's uuid), vm_name (for people), device (the Coral's USB\n\
             # port path, needed with several Corals), start (start the VM if halted),\n\
             # restart (restart it cleanly if it runs without its Coral); optional\n\
             # replug_timeout, scan_timeout, shutdown_timeout (seconds; at boot each\n\
             # is capped by the boot budget).\n",
        );
        for entry in &self.entries {
            text.push_str("\n[[coral]]\n");
            text.push_str(&format!("vm = {}\n", toml_string(&entry.vm_uuid)));
            text.push_str(&format!("vm_name = {}\n", toml_string(&entry.vm_name)));
            if let Some(device) = &entry.device {
                text.push_str(&format!("device = {}\n", toml_string(device)));
            }
            text.push_str(&format!("start = {}\n", entry.start));
            text.push_str(&format!("restart = {}\n", entry.restart));
            for (key, value) in entry.deadlines.present() {
                text.push_str(&format!("{key} = {value:?}\n"));
            }
        }
        text
    }
}

/// What [`Config::upsert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upserted {
    /// A new entry.
    Added,
    /// An existing entry changed.
    Updated,
    /// The entry was already exactly so.
    Unchanged,
}

/// Write the config atomically (temporary file, fsync, rename).
pub fn write(path: &Path, config: &Config) -> anyhow::Result<()> {
    write_file(path, config.to_toml().as_bytes())
}

/// Write any small file atomically and durably ([`crate::atomic_file`]),
/// creating its directory.
pub fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = crate::atomic_file::directory_of(path);
    let written = std::fs::create_dir_all(dir)
        .and_then(|_| crate::atomic_file::write(path, bytes, FILE_MODE));
    written.map_err(|e| {
        fail(
            FailureKind::Other,
            format!("cannot write {}: {e}; run as root", path.display()),
        )
    })
}

/// A TOML basic string (escapes quotes, backslashes and control characters).
fn toml_string(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn same_chain(a: &str, b: &str) -> bool {
    match (a.parse::<PortPath>(), b.parse::<PortPath>()) {
        (Ok(a), Ok(b)) => a.same_port_chain(&b),
        _ => a == b,
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID_A: &str = "3c6ef362-1f42-4a5d-9b1e-f6a9dbd967af";
    const UUID_B: &str = "cd7c086b-9216-1f42-f5fd-f6a9dbd967af";

    fn entry(uuid: &str, device: Option<&str>) -> Entry {
        Entry {
            vm_uuid: uuid.into(),
            vm_name: "frigate \"cam\"\n".into(),
            device: device.map(str::to_string),
            start: true,
            restart: false,
            deadlines: Deadlines::default(),
        }
    }

    #[test]
    fn deadlines_round_trip_and_bad_ones_name_their_line() {
        let mut with = entry(UUID_A, Some("2-4"));
        with.deadlines.scan_timeout = Some(45.0);
        with.deadlines.replug_timeout = Some(12.5);
        let config = Config {
            entries: vec![with.clone()],
        };
        let text = config.to_toml();
        assert!(text.contains("scan_timeout = 45.0\n"), "{text}");
        assert!(!text.contains("shutdown_timeout ="), "{text}");
        let back = parse(&text, Path::new("c.toml")).unwrap();
        assert_eq!(back.entries, vec![with]);
        let err = parse_err(&format!(
            "[[coral]]\nvm = \"{UUID_A}\"\nscan_timeout = 0.0\n"
        ));
        assert!(
            err.contains("coral.toml:3:") && err.contains("scan_timeout"),
            "{err}"
        );
    }

    fn parse_err(text: &str) -> String {
        parse(text, Path::new("/etc/coral/coral.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn written_text_reads_back_the_same() {
        let config = Config {
            entries: vec![entry(UUID_A, Some("2-4")), entry(UUID_B, Some("2-1.3"))],
        };
        let back = parse(&config.to_toml(), Path::new("x")).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn mistakes_are_one_line_with_the_line_number() {
        let cases = [
            ("[[coral]]\nvm = \"frigate\"\n", ":2: vm = \"frigate\" is not a VM uuid"),
            (
                &format!("[[coral]]\nvm = \"{UUID_A}\"\ndevice = \"usb4\"\n"),
                ":3: device: 'usb4' is not a USB port path",
            ),
            (&format!("[[coral]]\nvm = \"{UUID_A}\"\nstrat = true\n"), ":3: unknown field `strat`"),
            (&format!("[[coral]]\nvm = \"{UUID_A}\"\nstart = yes\n"), ":3: "),
            ("\n\n[[coral]]\nvm_name = \"x\"\n", ":3: missing field `vm`"),
            (
                &format!("[[coral]]\nvm = \"{UUID_A}\"\ndevice = \"2-4\"\n\n[[coral]]\nvm = \"{UUID_B}\"\ndevice = \"1-4\"\n"),
                ":5: the Coral at 1-4 is already mapped to VM",
            ),
            (
                &format!("[[coral]]\nvm = \"{UUID_A}\"\ndevice = \"2-4\"\n\n[[coral]]\nvm = \"{UUID_B}\"\n"),
                ":5: VM",
            ),
        ];
        for (text, expected) in cases {
            let err = parse_err(text);
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
            assert!(err.starts_with("/etc/coral/coral.toml:"), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }

    #[test]
    fn upsert_updates_the_vms_entry_and_refuses_a_taken_coral() {
        let mut config = Config::default();
        assert_eq!(
            config.upsert(entry(UUID_A, Some("2-4"))).unwrap(),
            Upserted::Added
        );
        let mut again = entry(UUID_A, None);
        again.restart = true;
        assert_eq!(config.upsert(again).unwrap(), Upserted::Updated);
        assert_eq!(config.entries.len(), 1);
        assert_eq!(config.entries[0].device.as_deref(), Some("2-4"));
        assert!(config.entries[0].restart);
        let err = config.upsert(entry(UUID_B, Some("1-4"))).unwrap_err();
        assert_eq!(
            crate::error::next_step_of(&err),
            Some(&NextStep::UninstallFirst {
                vm: UUID_A.to_string()
            }),
            "{err}"
        );
        let err = config.upsert(entry(UUID_B, None)).unwrap_err();
        assert_eq!(
            crate::error::next_step_of(&err),
            Some(&NextStep::DeviceForEach),
            "{err}"
        );
        assert_eq!(
            config.upsert(entry(UUID_B, Some("2-1.3"))).unwrap(),
            Upserted::Added
        );
        assert_eq!(config.remove_vm(UUID_A).len(), 1);
        assert_eq!(config.entries.len(), 1);
    }

    #[test]
    fn replace_moves_the_vm_to_its_new_coral_and_keeps_the_others() {
        let mut config = Config {
            entries: vec![entry(UUID_A, Some("2-4")), entry(UUID_B, Some("2-1.3"))],
        };
        // Without --replace: a second Coral for the VM.
        let mut plain = config.clone();
        assert_eq!(
            plain.upsert(entry(UUID_A, Some("3-2"))).unwrap(),
            Upserted::Added
        );
        assert_eq!(plain.entries.len(), 3);
        assert_eq!(plain.other_devices_of(&entry(UUID_A, Some("3-2"))).len(), 1);
        // With it: the VM's entry moves; the other VM's stays.
        let (upserted, dropped) = config.replace_vm(entry(UUID_A, Some("3-2"))).unwrap();
        assert_eq!(upserted, Upserted::Added);
        assert_eq!(dropped, vec![entry(UUID_A, Some("2-4"))]);
        assert_eq!(
            config.entries,
            vec![entry(UUID_B, Some("2-1.3")), entry(UUID_A, Some("3-2"))]
        );
        // A Coral mapped to another VM is refused, and nothing changes.
        let before = config.clone();
        assert!(config.replace_vm(entry(UUID_A, Some("1-1.3"))).is_err());
        assert_eq!(config, before);
        // The one entry without a device (the only Coral) gets one.
        let mut single = Config {
            entries: vec![entry(UUID_A, None)],
        };
        let (_, dropped) = single.replace_vm(entry(UUID_A, Some("2-4"))).unwrap();
        assert_eq!(dropped, vec![entry(UUID_A, None)]);
        assert_eq!(single.entries, vec![entry(UUID_A, Some("2-4"))]);
    }
}
