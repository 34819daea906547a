//! The command line, as clap derive types. Doc comments are the help text.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Wake a Google Coral USB Accelerator after a power loss and hand it to an
/// XCP-ng VM. Run as root in dom0.
#[derive(Debug, Parser)]
#[command(name = "coral", version, about, long_about = None)]
pub struct Cli {
    /// Run against the built-in simulated Coral and XCP-ng host (no hardware needed).
    #[arg(long, global = true)]
    pub simulate: bool,

    /// Read everything, change nothing: print each mutating `xe` command as it would run.
    #[arg(long, global = true)]
    pub dry_run: bool,

    /// More detail (-v: debug, -vv: every USB request and xe call).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Only errors.
    #[arg(short, long, global = true)]
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
    /// The boot-time systemd service that runs `coral up`.
    #[command(subcommand)]
    Service(ServiceCommand),
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
    /// Firmware image to upload (default: $CORAL_FIRMWARE, /var/lib/coral/, or the embedded one).
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

    /// Seconds to wait for the Coral to come back as 18d1:9302 after the reset.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub timeout: f64,
}

/// Which VM, and how its power may be touched.
#[derive(Debug, Args, Clone, Default)]
pub struct VmArgs {
    /// The VM: its uuid or its exact name-label.
    #[arg(long, value_name = "UUID|NAME")]
    pub vm: String,

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
    #[arg(long, value_name = "SECS", default_value_t = 180.0)]
    pub shutdown_timeout: f64,

    /// Seconds to wait for XAPI to list the ready Coral (its USB scan is asynchronous).
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub scan_timeout: f64,

    /// Seconds to wait for xapi while it is down or still starting (boot,
    /// toolstack restart); other XAPI errors are never retried.
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    pub xapi_timeout: f64,
}

/// Options of `coral attach`.
#[derive(Debug, Args, Clone, Default)]
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
    #[arg(long, value_name = "UUID|NAME")]
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

    /// Seconds to wait for the Coral to come back as 18d1:9302 after the reset.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub timeout: f64,
}

/// Serializing runs.
#[derive(Debug, Args, Clone, Default)]
pub struct LockArgs {
    /// Lock file that serializes coral runs.
    #[arg(
        long,
        value_name = "FILE",
        env = "CORAL_LOCK",
        default_value = "/run/coral.lock"
    )]
    pub lock_file: PathBuf,

    /// Fail at once if another coral run holds the lock.
    #[arg(long)]
    pub no_wait: bool,

    /// Seconds to wait for another coral run to finish.
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    pub lock_timeout: f64,
}

/// `coral firmware …`
#[derive(Debug, Subcommand)]
pub enum FirmwareCommand {
    /// Which image would be used, from where, and its checksum.
    Show(FirmwareArgs),
    /// Verify FILE against the manifest and install it as /var/lib/coral/<name>.
    Install {
        /// The image to install.
        file: PathBuf,
        /// Install an image whose SHA-256 is not in the manifest.
        #[arg(long)]
        allow_unknown_firmware: bool,
        /// Install under this directory instead of /var/lib/coral.
        #[arg(
            long,
            value_name = "DIR",
            env = "CORAL_FIRMWARE_DIR",
            default_value = "/var/lib/coral"
        )]
        dir: PathBuf,
    },
    /// Download the pinned image with curl, verify it and install it.
    Fetch {
        /// Install under this directory instead of /var/lib/coral.
        #[arg(
            long,
            value_name = "DIR",
            env = "CORAL_FIRMWARE_DIR",
            default_value = "/var/lib/coral"
        )]
        dir: PathBuf,
    },
}

/// `coral service …`
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Write, enable and reload the coral-up.service unit.
    Install(ServiceInstallArgs),
    /// Print the installed unit (or the one install would write, with --vm).
    Show(ServiceRootArgs),
    /// Disable and remove the unit.
    Uninstall(ServiceRootArgs),
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
pub struct ServiceInstallArgs {
    /// The VM the service hands the Coral to (uuid or exact name-label).
    #[arg(long, value_name = "UUID|NAME")]
    pub vm: String,

    /// Pass --start to `coral up` (start the VM if halted; see README about auto_poweron).
    #[arg(long)]
    pub start: bool,

    /// Pass --restart to `coral up` (restart the VM if it runs without the Coral).
    #[arg(long)]
    pub restart: bool,

    /// Pass --device to `coral up`.
    #[arg(long, value_name = "PATH")]
    pub device: Option<String>,

    /// Pass --firmware to `coral up`.
    #[arg(long, value_name = "FILE")]
    pub firmware: Option<PathBuf>,

    #[command(flatten)]
    pub root: ServiceRootArgs,
}
