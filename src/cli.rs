//! The command line, as clap derive types. Doc comments are the help text.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Wake a Google Coral USB Accelerator after a power loss and hand it to an
/// XCP-ng VM. Run as root in dom0.
#[derive(Debug, Parser)]
#[command(name = "coral", version, about, long_about = None, after_help = environment_help())]
pub struct Cli {
    /// Run against the built-in simulated Coral and XCP-ng host (no hardware needed).
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub simulate: bool,

    /// Change nothing and write no file: do the reads, print each step as `would …` and each
    /// mutating `xe` or `systemctl` command the reads already determine as `would run: …`.
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub dry_run: bool,

    /// More detail (-v: debug, -vv: every USB request and xe call).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet", help_heading = GLOBAL)]
    pub verbose: u8,

    /// Print nothing on success; only errors.
    #[arg(short, long, global = true, help_heading = GLOBAL)]
    pub quiet: bool,

    #[command(flatten)]
    pub lock: LockArgs,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Upload the firmware to every uninitialized Coral (1a6e:089a) and wait until it is ready (18d1:9302).
    Init(InitArgs),
    /// Pass the ready Coral through to a VM (PUSB passthrough, VUSB), restarting it only when asked.
    Attach(AttachArgs),
    /// Remove the Coral's VUSB from a VM (unplugs it first if the VM is running).
    Detach(DetachArgs),
    /// Show each Coral: port, USB state, PUSB, passthrough, group, VUSB, VM.
    Status(StatusArgs),
    /// Do everything after a power loss: init if needed, wait for XAPI, attach.
    Up(UpArgs),
    /// Which firmware image would be used; install or fetch one.
    #[command(subcommand)]
    Firmware(FirmwareCommand),
    /// Keep the Coral with its VM: recover it whenever it drops (a long-running service).
    Watch(WatchArgs),
    /// The systemd services: coral-up.service (`coral up` at boot, before VMs auto-start) and coral-watch.service (`coral watch`, while the host runs).
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Check, read-only, everything the boot path depends on; exit 0 only when all pass.
    Doctor(DoctorArgs),
    /// Print a shell completion script: `coral completions bash > /etc/bash_completion.d/coral`.
    Completions(CompletionsArgs),
    /// Print the manual page (roff): `coral man | man -l -`; `--dir DIR` writes one page per command.
    Man(ManArgs),
}

/// Options of `coral doctor`.
#[derive(Debug, Args, Clone, Default)]
pub struct DoctorArgs {
    /// Print JSON (schema in README.md) instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub root: ServiceRootArgs,
}

/// Options of `coral completions`.
#[derive(Debug, Args, Clone)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Options of `coral man`.
#[derive(Debug, Args, Clone, Default)]
pub struct ManArgs {
    /// Write coral.1 and a page per subcommand (coral-up.1, …) into DIR instead.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Selecting a Coral.
#[derive(Debug, Args, Clone, Default)]
pub struct DeviceArgs {
    /// The Coral's USB port path, e.g. 2-1.4 (see `coral status`); needed when there are several.
    #[arg(long, value_name = "PATH")]
    pub device: Option<String>,
}

/// Where the firmware comes from and how it is checked.
#[derive(Debug, Args, Clone, Default)]
pub struct FirmwareArgs {
    /// Firmware image to upload (default: $CORAL_FIRMWARE, the installed copy, or the embedded one).
    #[arg(long, value_name = "FILE")]
    pub firmware: Option<PathBuf>,

    /// Upload an image whose SHA-256 is not in the manifest of known images.
    #[arg(long)]
    pub allow_unknown_firmware: bool,
}

/// Options of `coral init`.
#[derive(Debug, Args, Clone, Default)]
pub struct InitArgs {
    #[command(flatten)]
    pub device: DeviceArgs,

    #[command(flatten)]
    pub firmware: FirmwareArgs,

    /// Re-flash a Coral that is already ready (detach it to DFU mode first).
    #[arg(long)]
    pub force: bool,

    #[command(flatten)]
    pub replug: ReplugArgs,

    /// Seconds to wait for a Coral to appear on the USB bus (0: fail at once if none).
    #[arg(long, value_name = "SECS", default_value_t = coral::ops::init::DEFAULT_INIT_WAIT_DEVICE.as_secs_f64(), value_parser = seconds_or_zero)]
    pub wait_device: f64,
}

/// How long to wait for the Coral after its firmware upload (init, up, the
/// watcher and the config entries share it).
#[derive(Debug, Args, Clone, Default)]
pub struct ReplugArgs {
    /// Seconds to wait for the Coral to come back as 18d1:9302 after the reset.
    #[arg(long, value_name = "SECS", default_value_t = coral::ops::init::DEFAULT_REPLUG_TIMEOUT.as_secs_f64(), value_parser = positive_seconds)]
    pub timeout: f64,
}

/// Which VM, and how its power may be touched.
#[derive(Debug, Args, Clone, Default)]
pub struct VmArgs {
    /// The VM: its uuid or its exact name-label (without it, `up` and `watch` take every entry of the config).
    #[arg(long, value_name = "UUID|NAME", value_parser = VmReference)]
    pub vm: Option<String>,

    /// Start the VM afterwards if it is halted.
    #[arg(long)]
    pub start: bool,

    /// If the VM is running without the Coral, shut it down cleanly and start it again.
    #[arg(long)]
    pub restart: bool,

    /// With --restart: hard power-off if the clean shutdown does not finish in time.
    #[arg(long, requires = "restart")]
    pub force_shutdown: bool,

    /// Seconds to wait for a clean shutdown.
    #[arg(long, value_name = "SECS", default_value_t = coral::ops::attach::DEFAULT_SHUTDOWN_TIMEOUT.as_secs_f64(), value_parser = positive_seconds)]
    pub shutdown_timeout: f64,

    /// Seconds to wait for XAPI to list the ready Coral (its USB scan is asynchronous).
    #[arg(long, value_name = "SECS", default_value_t = coral::ops::attach::DEFAULT_SCAN_TIMEOUT.as_secs_f64(), value_parser = positive_seconds)]
    pub scan_timeout: f64,

    /// Seconds to wait for xapi while it is down or still starting (boot,
    /// toolstack restart); other XAPI errors are never retried.
    #[arg(long, value_name = "SECS", default_value_t = coral::xe::client::DEFAULT_XAPI_WAIT.as_secs_f64(), value_parser = seconds_or_zero)]
    pub xapi_timeout: f64,
}

/// Options of `coral attach`.
#[derive(Debug, Args, Clone, Default)]
#[command(mut_arg("vm", |a| a.required(true)))]
pub struct AttachArgs {
    #[command(flatten)]
    pub vm: VmArgs,

    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Options of `coral detach`.
#[derive(Debug, Args, Clone, Default)]
pub struct DetachArgs {
    /// The VM: its uuid or its exact name-label.
    #[arg(long, value_name = "UUID|NAME", value_parser = VmReference)]
    pub vm: String,

    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Options of `coral status`.
#[derive(Debug, Args, Clone, Default)]
pub struct StatusArgs {
    /// Print JSON (schema in README.md) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Options of `coral up`.
#[derive(Debug, Args, Clone, Default)]
pub struct UpArgs {
    #[command(flatten)]
    pub vm: VmArgs,

    #[command(flatten)]
    pub device: DeviceArgs,

    #[command(flatten)]
    pub firmware: FirmwareArgs,

    #[command(flatten)]
    pub replug: ReplugArgs,

    /// Seconds to wait for a Coral to appear on the USB bus (it may enumerate late at boot).
    #[arg(long, value_name = "SECS", default_value_t = coral::ops::init::DEFAULT_UP_WAIT_DEVICE.as_secs_f64(), value_parser = seconds_or_zero)]
    pub wait_device: f64,
}

/// The help heading of the options every subcommand accepts.
const GLOBAL: &str = "Global options";

/// Serializing runs.
#[derive(Debug, Args, Clone, Default)]
pub struct LockArgs {
    /// Lock file that serializes coral runs.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        value_name = "FILE",
        env = "CORAL_LOCK",
        default_value = coral::lock::DEFAULT_LOCK_FILE
    )]
    pub lock_file: PathBuf,

    /// Fail at once if another coral run holds the lock.
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub no_wait: bool,

    /// Seconds to wait for another coral run to finish (0: do not wait).
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "SECS", default_value_t = coral::lock::DEFAULT_LOCK_TIMEOUT.as_secs_f64(), value_parser = seconds_or_zero)]
    pub lock_timeout: f64,
}

/// `coral firmware …`
#[derive(Debug, Subcommand)]
pub enum FirmwareCommand {
    /// Which image would be used, from where, and its checksum.
    Show(FirmwareArgs),
    /// Verify FILE against the manifest and install it (as --dir/<name>).
    Install {
        /// The image to install.
        file: PathBuf,
        /// Install an image whose SHA-256 is not in the manifest.
        #[arg(long)]
        allow_unknown_firmware: bool,
        /// Install under this directory.
        #[arg(
            long,
            value_name = "DIR",
            env = "CORAL_FIRMWARE_DIR",
            default_value = coral::DATA_DIR
        )]
        dir: PathBuf,
    },
    /// Download the pinned image with curl, verify it and install it.
    Fetch {
        /// Install under this directory.
        #[arg(
            long,
            value_name = "DIR",
            env = "CORAL_FIRMWARE_DIR",
            default_value = coral::DATA_DIR
        )]
        dir: PathBuf,
    },
}

/// `coral service …`
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Add or update the VM's entry in /etc/coral/coral.toml, write and enable coral-up.service (boot) and coral-watch.service (watcher), then restart the watcher.
    Install(ServiceInstallArgs),
    /// Print the unit install writes and the config (as install would leave it, with --vm).
    Show(ServiceShowArgs),
    /// Remove the VM's entry (--vm), or every entry, the config and the unit.
    Uninstall(ServiceUninstallArgs),
}

/// Options of `coral service show`.
#[derive(Debug, Args, Clone, Default)]
pub struct ServiceShowArgs {
    /// Show the config as `service install --vm VM` would leave it.
    #[arg(long, value_name = "UUID|NAME")]
    pub vm: Option<String>,

    /// As for install.
    #[arg(long, requires = "vm")]
    pub start: bool,

    /// As for install.
    #[arg(long, requires = "vm")]
    pub restart: bool,

    /// As for install.
    #[arg(long, value_name = "PATH", requires = "vm")]
    pub device: Option<String>,

    /// As for install.
    #[arg(long, requires = "device")]
    pub replace: bool,

    #[command(flatten)]
    pub root: ServiceRootArgs,
}

/// Options of `coral service uninstall`.
#[derive(Debug, Args, Clone, Default)]
pub struct ServiceUninstallArgs {
    /// Remove only this VM's entry (uuid or the name recorded in the config).
    #[arg(long, value_name = "UUID|NAME")]
    pub vm: Option<String>,

    #[command(flatten)]
    pub root: ServiceRootArgs,
}

/// Where the unit goes.
#[derive(Debug, Args, Clone, Default)]
pub struct ServiceRootArgs {
    /// Treat DIR as the root directory (for tests and image building); skips systemctl.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
}

/// Options of `coral service install`.
#[derive(Debug, Args, Clone, Default)]
#[command(mut_arg("vm", |a| a.required(true).help("The VM the services hand the Coral to: its uuid or exact name-label (its entry in the config is added or updated)")))]
#[command(mut_arg("start", |a| a.help("Setting for boot and recovery: start the VM if it is halted (kept in the entry)")))]
#[command(mut_arg("restart", |a| a.help("Setting for boot and recovery: if the VM runs without the Coral, shut it down cleanly and start it again (kept in the entry)")))]
#[command(mut_arg("force_shutdown", |a| a.hide(true)))]
pub struct ServiceInstallArgs {
    /// The VM the service hands the Coral to, its policy and deadlines (kept
    /// in its config entry; at boot each deadline is capped by the boot budget).
    #[command(flatten)]
    pub vm: VmArgs,

    #[command(flatten)]
    pub device: DeviceArgs,

    /// Move the VM to the Coral at --device: replaces the VM's entries for
    /// other Corals (without it, a new --device adds a second Coral).
    #[arg(long, requires = "device")]
    pub replace: bool,

    #[command(flatten)]
    pub replug: ReplugArgs,

    #[command(flatten)]
    pub root: ServiceRootArgs,
}

/// Options of `coral watch`.
#[derive(Debug, Args, Clone, Default)]
#[command(mut_arg("force_shutdown", |a| a.hide(true)))]
pub struct WatchArgs {
    /// The VM (without it: every entry of the config), its policy and deadlines.
    /// The watcher never hard-stops a VM: --force-shutdown is refused.
    #[command(flatten)]
    pub vm: VmArgs,

    #[command(flatten)]
    pub device: DeviceArgs,

    #[command(flatten)]
    pub firmware: FirmwareArgs,

    /// With --restart: at most this many restarts per VM per hour.
    #[arg(long, value_name = "N", default_value_t = coral::ops::watch::DEFAULT_MAX_RESTARTS_PER_HOUR)]
    pub max_restarts_per_hour: u32,

    /// Seconds between XAPI health checks (USB changes are noticed at once).
    #[arg(long, value_name = "SECS", default_value_t = coral::ops::watch::DEFAULT_XAPI_CHECK.as_secs_f64(), value_parser = positive_seconds)]
    pub xapi_check: f64,

    #[command(flatten)]
    pub replug: ReplugArgs,
}

/// Every environment variable `coral` reads, with what it does (for `--help`
/// and the man page's ENVIRONMENT section).
pub const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "CORAL_FIRMWARE",
        "firmware image to upload when --firmware is not given",
    ),
    (
        "CORAL_FIRMWARE_DIR",
        concat!(
            "where installed firmware images live (default ",
            coral::data_dir!(),
            ")"
        ),
    ),
    (
        "CORAL_FIRMWARE_URL_BASE",
        "where `coral firmware fetch` downloads from (default: Google's libedgetpu)",
    ),
    (
        "CORAL_LOCK",
        "the lock file, as --lock-file (default /run/coral.lock)",
    ),
    (
        "CORAL_XE",
        "the `xe` to run (default: xe on PATH, then /opt/xensource/bin/xe)",
    ),
    (
        "CORAL_INVENTORY",
        "where this host's uuid is read (default /etc/xensource-inventory)",
    ),
    (
        "CORAL_CONFIG",
        "the Coral -> VM config (default /etc/coral/coral.toml)",
    ),
    (
        "CORAL_STATE_DIR",
        concat!(
            "where each mapping's state is kept, mappings.json (default ",
            coral::data_dir!(),
            ")"
        ),
    ),
    (
        "CORAL_SIM_STATE",
        "the --simulate state file (its root: the private directory FILE.root/)",
    ),
    (
        "CORAL_USB_POLICY",
        "the usb-policy file `coral doctor` reads (default /etc/xensource/usb-policy.conf)",
    ),
    (
        "CORAL_QEMU_ROOT",
        "QEMU's chroots, for the lost-Coral check (default /var/xen/qemu)",
    ),
    (
        "CORAL_CGROUP_DEVICES",
        "the devices cgroup hierarchy, same check (default /sys/fs/cgroup/devices)",
    ),
    (
        "CORAL_PASSWD",
        "where the qemu_base account is read, same check (default /etc/passwd)",
    ),
    (
        "XDG_RUNTIME_DIR",
        "holds --simulate's private directory coral-sim/ when CORAL_SIM_STATE is not set",
    ),
    (
        "TMPDIR",
        "without XDG_RUNTIME_DIR: holds coral-sim-<uid>/ (default /tmp)",
    ),
    (
        "PATH",
        "searched for `xe`, and for `curl` by `coral firmware fetch`",
    ),
    (
        "JOURNAL_STREAM",
        "set by systemd: when it names stderr, log lines carry journald priorities",
    ),
];

/// The "Environment:" block at the end of `--help`.
pub fn environment_help() -> String {
    let width = ENVIRONMENT
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0);
    let mut text = String::from("Environment:\n");
    for (name, what) in ENVIRONMENT {
        text.push_str(&format!("  {name:<width$}  {what}\n"));
    }
    text.push_str("\nExit codes: 0 done, 1 other, 2 usage, 3 no Coral, 4 firmware, 5 USB/DFU, 6 deadline, 7 xe, 8 VM, 9 lock.");
    text
}

/// A number of seconds that must be more than 0 (a deadline of 0 could
/// never be met), at most [`coral::clock::MAX_WAIT`].
pub fn positive_seconds(text: &str) -> Result<f64, String> {
    seconds_flag(text, false)
}

/// A number of seconds, 0 or more, at most [`coral::clock::MAX_WAIT`].
pub fn seconds_or_zero(text: &str) -> Result<f64, String> {
    seconds_flag(text, true)
}

/// Every duration flag's parser: a number, then [`coral::clock::checked_seconds`]
/// (a rejected value is a usage error, exit 2).
fn seconds_flag(text: &str, zero_ok: bool) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| "give a number of seconds, e.g. 30 or 2.5".to_string())?;
    coral::clock::checked_seconds(value, zero_ok)?;
    Ok(value)
}

/// A VM reference: its uuid or exact name-label. Empty, blank or holding
/// control characters is refused before anything runs (it cannot name a VM
/// a person typed, and would garble logs and the unit file).
pub fn vm_reference(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("give the VM's uuid or exact name-label (it is empty)".to_string());
    }
    if text.chars().any(char::is_control) {
        return Err("a VM name-label cannot hold control characters".to_string());
    }
    Ok(text.to_string())
}

/// clap parser for `--vm`: [`vm_reference`], with the rejected value shown
/// escaped (clap's own message would echo control characters to the terminal).
#[derive(Clone, Copy, Debug)]
pub struct VmReference;

impl clap::builder::TypedValueParser for VmReference {
    type Value = String;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        let flag = arg
            .and_then(|a| a.get_long())
            .map_or_else(|| "--vm".to_string(), |l| format!("--{l}"));
        let invalid = |why: &str| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value {value:?} for '{flag}': {why}\n"),
            )
        };
        let text = value.to_str().ok_or_else(|| invalid("not valid UTF-8"))?;
        vm_reference(text).map_err(|why| invalid(&why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn seconds_are_checked() {
        assert!(positive_seconds("0").is_err());
        assert!(positive_seconds("-1").is_err());
        assert!(positive_seconds("nan").is_err());
        assert!(positive_seconds("inf").is_err());
        assert_eq!(positive_seconds("2.5"), Ok(2.5));
        assert_eq!(seconds_or_zero("0"), Ok(0.0));
        assert!(seconds_or_zero("18446744073709549568").is_err());
        assert!(seconds_or_zero("nan").is_err());
        assert!(seconds_or_zero("-0.5").is_err());
    }

    #[test]
    fn vm_references_are_checked() {
        assert!(vm_reference("").is_err());
        assert!(vm_reference("  ").is_err());
        assert!(vm_reference("frigate\n").is_err());
        assert!(vm_reference("a\u{1b}[2Jb").is_err());
        assert_eq!(
            vm_reference("my \"cam\" vm $x 100%").as_deref(),
            Ok("my \"cam\" vm $x 100%")
        );
    }
}
