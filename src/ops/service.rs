//! `coral service install|show|uninstall`: the Coral → VM entries of the
//! config and the boot-time oneshot unit that recovers them all (`coral up`)
//! after xapi is ready and before XCP-ng auto-starts VMs.
//!
//! Units come from [`units`], which returns every unit coral installs
//! (today the boot unit; a watcher can add its own). Everything is written
//! under a root (`--root`, the simulation's own directory, or `/`); only the
//! real root runs `systemctl`. A dry run writes nothing and says what it
//! would write.

use super::boot::budget;
use super::xapi_common::resolve_vm;
use crate::config::{self, Config, ConfigPath, Entry, Upserted};
use crate::error::{fail, fail_then, FailureKind, Flag, NextStep};
use crate::usb::PortPath;
use crate::xe::client::XeClient;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The boot unit's file name.
pub const UNIT_NAME: &str = "coral-up.service";
/// The watcher's unit file name.
pub const WATCH_UNIT_NAME: &str = "coral-watch.service";
/// How long systemd waits for the watcher to stop: it exits within a second,
/// unless it is bringing a VM it restarted back up (clean shutdown + start).
const WATCH_STOP_TIMEOUT_SECS: u64 = 300;
/// Pause before systemd restarts a watcher that exited with an error (a
/// broken config): the journal shows the error, and a fix is picked up.
const WATCH_RESTART_SECS: u64 = 30;
/// Where units go, relative to the root.
const UNIT_DIR: &str = "etc/systemd/system";
/// The target whose `.wants` holds the enable symlink.
const WANTED_BY: &str = "multi-user.target";
/// The XCP-ng service that auto-starts VMs; the boot unit runs before it.
pub const AUTOSTART_UNIT: &str = "xapi-domains.service";

/// One unit file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unit {
    /// File name, e.g. `coral-up.service`.
    pub name: &'static str,
    /// Its text.
    pub text: String,
}

/// What the units run.
#[derive(Clone, Debug, Default)]
pub struct UnitSpec {
    /// Absolute path of the coral binary (ExecStart).
    pub exe: PathBuf,
    /// A non-default config file the unit must name (`$CORAL_CONFIG`).
    pub config_env: Option<PathBuf>,
}

/// Every unit `coral service install` writes: the boot oneshot, and the
/// watcher that keeps the Corals with their VMs afterwards. Two units, because
/// the boot path must end (XCP-ng's VM auto-start waits for it, and a oneshot
/// cannot use `Restart=` on systemd 219) while the watcher never ends and is
/// restarted if it fails.
pub fn units(spec: &UnitSpec) -> Vec<Unit> {
    vec![
        Unit {
            name: UNIT_NAME,
            text: boot_unit_text(spec),
        },
        Unit {
            name: WATCH_UNIT_NAME,
            text: watch_unit_text(spec),
        },
    ]
}

/// The watcher: `coral watch` for every config entry, from after the boot
/// unit until shutdown.
pub fn watch_unit_text(spec: &UnitSpec) -> String {
    let exec = [spec.exe.display().to_string(), "watch".to_string()]
        .iter()
        .map(|a| systemd_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "# Written by `coral service install`; remove with `coral service uninstall`.\n\
# Re-initializes and re-attaches a Coral that resets, vanishes or falls back to\n\
# its boot loader while the host runs (README \"coral watch\").\n\
[Unit]\n\
Description=Keep Coral USB Accelerators passed through to their VMs\n\
Wants=xapi-init-complete.target\n\
After=xapi-init-complete.target {UNIT_NAME}\n\
\n\
[Service]\n\
Type=simple\n\
{environment}ExecStart={exec}\n\
Restart=on-failure\n\
RestartSec={WATCH_RESTART_SECS}\n\
TimeoutStopSec={WATCH_STOP_TIMEOUT_SECS}\n\
\n\
[Install]\n\
WantedBy={WANTED_BY}\n",
        environment = config_environment(spec),
    )
}

/// `Environment=CORAL_CONFIG=…` when the config is not at its default path.
fn config_environment(spec: &UnitSpec) -> String {
    spec.config_env
        .as_ref()
        .map(|p| {
            format!(
                "Environment={}\n",
                systemd_quote(&format!("{}={}", config::PATH_ENV, p.display()))
            )
        })
        .unwrap_or_default()
}

/// The boot unit: `coral up` for every config entry, within the boot budget.
pub fn boot_unit_text(spec: &UnitSpec) -> String {
    let exec = [
        spec.exe.display().to_string(),
        "--lock-timeout".to_string(),
        budget::LOCK_WAIT.as_secs().to_string(),
        "up".to_string(),
    ]
    .iter()
    .map(|a| systemd_quote(a))
    .collect::<Vec<_>>()
    .join(" ");
    let environment = config_environment(spec);
    format!(
        "# Written by `coral service install`; remove with `coral service uninstall`.\n\
# Recovers every Coral -> VM entry of the config before XCP-ng auto-starts VMs.\n\
# coral's own waits end within {waits} s (README \"Boot budget\"); if it fails or\n\
# times out, {AUTOSTART_UNIT} still starts the VMs (it does not require this unit).\n\
[Unit]\n\
Description=Initialize Coral USB Accelerators and pass them to their VMs before VMs auto-start\n\
Wants=xapi-init-complete.target\n\
After=xapi-init-complete.target\n\
Before={AUTOSTART_UNIT}\n\
\n\
[Service]\n\
Type=oneshot\n\
RemainAfterExit=yes\n\
{environment}ExecStart={exec}\n\
TimeoutStartSec={timeout}\n\
\n\
[Install]\n\
WantedBy={WANTED_BY}\n",
        waits = budget::WORST_CASE_WAITS.as_secs(),
        timeout = budget::UNIT_START_TIMEOUT.as_secs(),
    )
}

/// One ExecStart argument per systemd.syntax(7): specifiers (`%`) and
/// variables (`$`) escaped; double-quoted with `\"`/`\\` when needed.
pub fn systemd_quote(arg: &str) -> String {
    let escaped = arg.replace('%', "%%").replace('$', "$$");
    let plain = !escaped.is_empty()
        && escaped
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=+@,%$".contains(c));
    if plain {
        escaped
    } else {
        format!("\"{}\"", escaped.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// Where a unit file goes under `root` (default `/`).
pub fn unit_path(root: Option<&Path>, name: &str) -> PathBuf {
    root.unwrap_or(Path::new("/")).join(UNIT_DIR).join(name)
}

/// Where `service` writes and how it enables units.
#[derive(Clone, Debug)]
pub struct Place {
    /// `--root` (or the simulation's directory); None: the real `/`.
    pub root: Option<PathBuf>,
    /// The config file.
    pub config: ConfigPath,
    /// Write nothing; say what would be written.
    pub dry_run: bool,
}

impl Place {
    /// How units are enabled here.
    pub fn systemd(&self) -> Box<dyn Systemd> {
        match &self.root {
            Some(root) => Box::new(RootedSystemd { root: root.clone() }),
            None => Box::new(Systemctl),
        }
    }
}

/// Enabling units: `systemctl` on the real root, symlinks under another.
pub trait Systemd {
    /// `systemctl daemon-reload`.
    fn reload(&self) -> anyhow::Result<()>;
    /// `systemctl enable UNIT`.
    fn enable(&self, unit: &str) -> anyhow::Result<()>;
    /// `systemctl disable UNIT`.
    fn disable(&self, unit: &str) -> anyhow::Result<()>;
    /// Whether UNIT is enabled (read-only).
    fn is_enabled(&self, unit: &str) -> anyhow::Result<bool>;
    /// `systemctl restart UNIT` (starts it if it is not running).
    fn restart(&self, unit: &str) -> anyhow::Result<()>;
    /// `systemctl stop UNIT`.
    fn stop(&self, unit: &str) -> anyhow::Result<()>;
}

/// The real `systemctl`.
pub struct Systemctl;

impl Systemd for Systemctl {
    fn reload(&self) -> anyhow::Result<()> {
        systemctl(&["daemon-reload"]).map(drop)
    }
    fn enable(&self, unit: &str) -> anyhow::Result<()> {
        systemctl(&["enable", unit]).map(drop)
    }
    fn disable(&self, unit: &str) -> anyhow::Result<()> {
        systemctl(&["disable", unit]).map(drop)
    }
    fn restart(&self, unit: &str) -> anyhow::Result<()> {
        systemctl(&["restart", unit]).map(drop)
    }
    fn stop(&self, unit: &str) -> anyhow::Result<()> {
        systemctl(&["stop", unit]).map(drop)
    }
    fn is_enabled(&self, unit: &str) -> anyhow::Result<bool> {
        let out = Command::new("systemctl")
            .args(["is-enabled", unit])
            .output()
            .map_err(|e| {
                fail(
                    FailureKind::Other,
                    format!("cannot run systemctl ({e}); is this a systemd host?"),
                )
            })?;
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "enabled")
    }
}

/// Units under another root: enabling is the `WantedBy=` symlink systemd
/// would make; nothing is reloaded.
pub struct RootedSystemd {
    /// The root directory.
    pub root: PathBuf,
}

impl RootedSystemd {
    fn link(&self, unit: &str) -> PathBuf {
        self.root
            .join(UNIT_DIR)
            .join(format!("{WANTED_BY}.wants"))
            .join(unit)
    }
}

impl Systemd for RootedSystemd {
    fn reload(&self) -> anyhow::Result<()> {
        Ok(())
    }
    fn enable(&self, unit: &str) -> anyhow::Result<()> {
        let link = self.link(unit);
        let target = Path::new("/").join(UNIT_DIR).join(unit);
        let _ = std::fs::remove_file(&link);
        link.parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| std::os::unix::fs::symlink(&target, &link))
            .map_err(|e| {
                fail(
                    FailureKind::Other,
                    format!("cannot enable {unit} ({}): {e}", link.display()),
                )
            })
    }
    fn disable(&self, unit: &str) -> anyhow::Result<()> {
        match std::fs::remove_file(self.link(unit)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(fail(
                FailureKind::Other,
                format!("cannot disable {unit}: {e}"),
            )),
            _ => Ok(()),
        }
    }
    fn is_enabled(&self, unit: &str) -> anyhow::Result<bool> {
        Ok(self.link(unit).symlink_metadata().is_ok())
    }
    fn restart(&self, _unit: &str) -> anyhow::Result<()> {
        Ok(())
    }
    fn stop(&self, _unit: &str) -> anyhow::Result<()> {
        Ok(())
    }
}

/// What `service install` is asked to map.
#[derive(Clone, Debug, Default)]
pub struct InstallRequest {
    /// The VM: uuid or exact name-label (resolved through `xe`).
    pub vm: String,
    /// The Coral's port path, when there are several.
    pub device: Option<String>,
    /// Start the VM if it is halted.
    pub start: bool,
    /// Restart it if it runs without its Coral.
    pub restart: bool,
    /// The entry's own deadlines (None: the defaults).
    pub deadlines: crate::config::Deadlines,
    /// Replace the VM's entries for other Corals (move it to `device`)
    /// rather than add a second Coral beside them.
    pub replace: bool,
}

/// Put `entry` into `config`: with `replace`, in place of the VM's entries
/// for other Corals (`--replace`), else beside them (a second Coral, which
/// the lines returned say, with the command that moves it instead).
fn apply(config: &mut Config, entry: Entry, replace: bool) -> anyhow::Result<Vec<String>> {
    let label = entry.label();
    let device = entry.device.clone().unwrap_or_default();
    let kept: Vec<String> = config
        .other_devices_of(&entry)
        .iter()
        .filter_map(|e| e.device.clone())
        .collect();
    let (upserted, dropped) = if replace {
        config.replace_vm(entry.clone())?
    } else {
        (config.upsert(entry.clone())?, Vec::new())
    };
    let dropped: Vec<String> = dropped
        .into_iter()
        .map(|e| e.device.unwrap_or_else(|| "the only Coral".into()))
        .collect();
    let mut lines = vec![match upserted {
        _ if !dropped.is_empty() => format!(
            "{label}: entry moved to the Coral at {device} (its entry for {} is removed)",
            dropped.join(", ")
        ),
        Upserted::Added => format!("{label}: new entry"),
        Upserted::Updated => format!("{label}: entry updated"),
        Upserted::Unchanged => format!("{label}: entry unchanged"),
    }];
    if !replace && upserted == Upserted::Added && !kept.is_empty() {
        lines.push(format!(
            "{label} keeps its entry for the Coral at {}: it now has {} Corals; to move it to {device} instead: {}",
            kept.join(", "),
            kept.len() + 1,
            NextStep::MoveEntry {
                vm: entry.vm_uuid.clone(),
                device: device.clone(),
            },
        ));
    }
    Ok(lines)
}

/// The entry `request` stands for: the VM resolved by uuid and checked
/// (XAPI refuses USB for HA-protected VMs), the device checked.
pub fn resolve_entry(xe: &XeClient, request: &InstallRequest) -> anyhow::Result<Entry> {
    if let Some(device) = &request.device {
        device.parse::<PortPath>().map_err(|e| {
            fail_then(
                FailureKind::NoCoral,
                format!("{} {device:?}: {e}", Flag::Device),
                NextStep::StatusShowsPaths,
            )
        })?;
    }
    let vm = resolve_vm(xe, &request.vm)?;
    if vm.info.ha_restart_priority == "restart" {
        return Err(fail(
            FailureKind::Vm,
            format!(
                "{} is protected by HA (restart priority 'restart'), which XAPI forbids with USB passthrough; change its HA priority first",
                vm.label
            ),
        ));
    }
    // The name, for people: as given, or read by uuid (never parsed from a listing).
    let vm_name = if vm.uuid() == request.vm {
        xe.param("vm", vm.uuid(), "name-label").unwrap_or_default()
    } else {
        request.vm.clone()
    };
    Ok(Entry {
        vm_uuid: vm.uuid().to_string(),
        vm_name,
        device: request.device.clone(),
        start: request.start,
        restart: request.restart,
        deadlines: request.deadlines,
    })
}

/// Add or update the entry for `request`, write the units and enable them.
pub fn install(
    xe: &XeClient,
    place: &Place,
    spec: &UnitSpec,
    request: &InstallRequest,
) -> anyhow::Result<String> {
    check_exe(spec)?;
    let mut config = load_config(place)?;
    let entry = resolve_entry(xe, request)?;
    let start = entry.start;
    let changes = apply(&mut config, entry, request.replace)?;
    let mut out = Output::new(place);
    for line in changes {
        out.line(line);
    }
    out.write(&place.config.file, config.to_toml().as_bytes())?;
    let systemd = place.systemd();
    for unit in units(spec) {
        out.write(
            &unit_path(place.root.as_deref(), unit.name),
            unit.text.as_bytes(),
        )?;
    }
    out.act("systemctl daemon-reload", || systemd.reload())?;
    for unit in units(spec) {
        out.act(&format!("systemctl enable {}", unit.name), || {
            systemd.enable(unit.name)
        })?;
    }
    // The watcher reads the config when it starts: (re)start it now.
    out.act(&format!("systemctl restart {WATCH_UNIT_NAME}"), || {
        systemd.restart(WATCH_UNIT_NAME)
    })?;
    out.line(format!(
        "at boot {UNIT_NAME} runs `coral up` for {} entr{} before XCP-ng auto-starts VMs",
        config.entries.len(),
        if config.entries.len() == 1 {
            "y"
        } else {
            "ies"
        }
    ));
    if !start {
        out.line("the VM must have auto_poweron (VM and pool other-config:auto_poweron=true, see README) to start with its Coral; or reinstall with --start; `coral doctor` checks it".to_string());
    }
    Ok(out.text())
}

/// The units install would write, then the config: as install would leave
/// it with `request` (resolved through `xe` when it answers), else as it is.
pub fn show(
    xe: Option<&XeClient>,
    place: &Place,
    spec: &UnitSpec,
    request: Option<&InstallRequest>,
) -> anyhow::Result<String> {
    let mut config = load_config(place)?;
    let mut text = String::new();
    for unit in units(spec) {
        let path = unit_path(place.root.as_deref(), unit.name);
        let note = match std::fs::read_to_string(&path) {
            Ok(installed) if installed == unit.text => "installed, as install writes it",
            Ok(_) => "installed, but differs: install rewrites it",
            Err(_) => "not installed: install writes it",
        };
        text.push_str(&format!("# {} ({note})\n{}\n", path.display(), unit.text));
    }
    let config_note = match request {
        Some(request) => {
            let resolved = match xe {
                Some(xe) => resolve_entry(xe, request),
                None => Err(anyhow::anyhow!("xe is not available here")),
            };
            match resolved {
                Ok(entry) => {
                    apply(&mut config, entry, request.replace)?;
                    "as install would write it".to_string()
                }
                Err(err) => format!(
                    "as it is now; install resolves VM '{}' to its uuid first, which failed here: {err:#}",
                    request.vm
                ),
            }
        }
        None if place.config.file.exists() => "installed".to_string(),
        None => "no entries yet: `coral service install --vm VM`".to_string(),
    };
    text.push_str(&format!(
        "# {} ({config_note})\n{}",
        place.config.file.display(),
        config.to_toml()
    ));
    Ok(text.trim_end().to_string())
}

/// Remove the entries of `vm` (uuid or recorded name), or with `None` every
/// entry, the config and the units. Removing the last entry removes the
/// units too: a boot unit without entries would only fail.
pub fn uninstall(place: &Place, vm: Option<&str>) -> anyhow::Result<String> {
    let mut out = Output::new(place);
    let mut config = load_config(place)?;
    if let Some(vm) = vm {
        let gone = config.remove_vm(vm);
        if gone.is_empty() {
            return Ok(format!(
                "no entry for VM '{vm}' in {}; nothing to do",
                place.config.file.display()
            ));
        }
        for entry in &gone {
            out.line(format!("{}: entry removed", entry.label()));
        }
        if !config.entries.is_empty() {
            out.write(&place.config.file, config.to_toml().as_bytes())?;
            let systemd = place.systemd();
            if unit_path(place.root.as_deref(), WATCH_UNIT_NAME).exists() {
                out.act(&format!("systemctl restart {WATCH_UNIT_NAME}"), || {
                    systemd.restart(WATCH_UNIT_NAME)
                })?;
            }
            return Ok(out.text());
        }
        out.line("no entries left: removing the boot service".to_string());
    }
    let systemd = place.systemd();
    for name in unit_names() {
        let path = unit_path(place.root.as_deref(), name);
        if path.exists() {
            if name == WATCH_UNIT_NAME {
                out.act(&format!("systemctl stop {name}"), || systemd.stop(name))?;
            }
            out.act(&format!("systemctl disable {name}"), || {
                systemd.disable(name)
            })?;
            out.remove(&path)?;
        }
    }
    if place.config.file.exists() {
        out.remove(&place.config.file)?;
    }
    out.act("systemctl daemon-reload", || systemd.reload())?;
    if out.lines.is_empty() {
        return Ok(format!("{UNIT_NAME} is not installed; nothing to do"));
    }
    Ok(out.text())
}

/// Every unit name coral may have installed.
fn unit_names() -> Vec<&'static str> {
    units(&UnitSpec::default()).iter().map(|u| u.name).collect()
}

fn load_config(place: &Place) -> anyhow::Result<Config> {
    Ok(config::load(&place.config.file)?.unwrap_or_default())
}

fn check_exe(spec: &UnitSpec) -> anyhow::Result<()> {
    if spec.exe.is_absolute() {
        Ok(())
    } else {
        Err(fail(
            FailureKind::Other,
            format!(
                "ExecStart needs an absolute path, got {}",
                spec.exe.display()
            ),
        ))
    }
}

/// Lines for the user; in a dry run every change is described, not made.
struct Output {
    dry_run: bool,
    /// Under another root (--root, --simulate) systemctl is not run: each
    /// command is still named, as the real host would run it.
    rooted: bool,
    lines: Vec<String>,
}

impl Output {
    fn new(place: &Place) -> Self {
        Output {
            dry_run: place.dry_run,
            rooted: place.root.is_some(),
            lines: Vec::new(),
        }
    }

    fn line(&mut self, line: String) {
        self.lines.push(line);
    }

    fn write(&mut self, path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
        if std::fs::read(path).is_ok_and(|old| old == bytes) {
            self.line(format!("{} is up to date", path.display()));
        } else if self.dry_run {
            self.line(format!(
                "would write {}:\n{}",
                path.display(),
                String::from_utf8_lossy(bytes).trim_end()
            ));
        } else {
            config::write_file(path, bytes)?;
            self.line(format!("wrote {}", path.display()));
        }
        Ok(())
    }

    fn remove(&mut self, path: &Path) -> anyhow::Result<()> {
        if self.dry_run {
            self.line(format!("would remove {}", path.display()));
            return Ok(());
        }
        std::fs::remove_file(path).map_err(|e| {
            fail(
                FailureKind::Other,
                format!("cannot remove {}: {e}; run as root", path.display()),
            )
        })?;
        self.line(format!("removed {}", path.display()));
        Ok(())
    }

    fn act(&mut self, what: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
        if self.dry_run {
            self.line(format!("would run: {what}"));
            return Ok(());
        }
        f()?;
        if self.rooted {
            self.line(format!("would run on a real host: {what}"));
        }
        Ok(())
    }

    fn text(&self) -> String {
        self.lines.join("\n")
    }
}

fn systemctl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("systemctl").args(args).output().map_err(|e| {
        fail(
            FailureKind::Other,
            format!("cannot run systemctl ({e}); is this a systemd host?"),
        )
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(fail(
            FailureKind::Other,
            format!(
                "`systemctl {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_names_for_systemd() {
        assert_eq!(systemd_quote("frigate"), "frigate");
        assert_eq!(systemd_quote("my vm"), "\"my vm\"");
        assert_eq!(systemd_quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(systemd_quote("50%$HOME"), "50%%$$HOME");
    }

    #[test]
    fn the_boot_unit_runs_up_for_every_entry_within_the_budget() {
        let spec = UnitSpec {
            exe: "/usr/bin/coral".into(),
            config_env: Some("/srv/my coral.toml".into()),
        };
        let text = boot_unit_text(&spec);
        assert!(
            text.contains("\nExecStart=/usr/bin/coral --lock-timeout 30 up\n"),
            "{text}"
        );
        assert!(
            text.contains("\nEnvironment=\"CORAL_CONFIG=/srv/my coral.toml\"\n"),
            "{text}"
        );
        assert!(text.contains("\nTimeoutStartSec=240\n"), "{text}");
        assert!(!text.contains("Restart="), "systemd 219 oneshot: {text}");
        assert!(!text.contains("Requires"), "{text}");
    }
}
