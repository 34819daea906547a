//! The command line's words for what the library refers to as data: its
//! [`Flag`]s and the [`NextStep`] of a failure. The one place that spells
//! `coral` commands in a message; installed by `main` before anything runs.

use coral::error::{Flag, NextStep, Wording};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether this run is `--simulate`: next steps then name what the
/// simulated host has, not commands it lacks (`xe`).
static SIMULATED: AtomicBool = AtomicBool::new(false);

/// Word the next steps for the simulated host (`--simulate`), once parsed.
pub fn set_simulated(simulated: bool) {
    SIMULATED.store(simulated, Ordering::Relaxed);
}

fn simulated() -> bool {
    SIMULATED.load(Ordering::Relaxed)
}

/// The `coral` command line's wording.
pub struct CliWording;

impl Wording for CliWording {
    fn flag(&self, flag: Flag) -> String {
        match flag {
            Flag::Vm => "--vm",
            Flag::Device => "--device",
            Flag::Start => "--start",
            Flag::Restart => "--restart",
            Flag::ForceShutdown => "--force-shutdown",
            Flag::ShutdownTimeout => "--shutdown-timeout",
            Flag::LockFile => "--lock-file",
            Flag::NoWait => "--no-wait",
            Flag::LockTimeout => "--lock-timeout",
            Flag::Firmware => "--firmware",
            Flag::AllowUnknownFirmware => "--allow-unknown-firmware",
        }
        .to_string()
    }

    fn step(&self, step: &NextStep) -> String {
        match step {
            NextStep::Detach { vm } => format!("run `coral detach --vm {vm}` first"),
            NextStep::FindHolderAndDetach => {
                "see `coral status`, then `coral detach --vm <vm>`".into()
            }
            NextStep::LongerShutdownOrForce => {
                "retry with a longer --shutdown-timeout, or --force-shutdown".into()
            }
            NextStep::ForceOffNow { vm } => format!(
                "`coral attach --vm {vm} --restart --force-shutdown` powers it off now instead"
            ),
            NextStep::FinishRestart { vm } => format!(
                "`coral attach --vm {vm} --start` finishes it now (it starts the VM if it is halted)"
            ),
            NextStep::RestorePassthrough { vm } => format!(
                "once the cause is fixed, restore the passthrough: `coral attach --vm {vm} --restart`"
            ),
            NextStep::ResumeMapping { vm } => format!("`coral attach --vm {vm}` resumes it"),
            NextStep::DeviceForMapping { vm } => {
                format!("`coral service install --vm {vm} --device PATH`")
            }
            NextStep::AttachToVm => "`coral attach --vm <vm>`".into(),
            NextStep::RestartNow { vm } => {
                format!("restart now: `coral attach --vm {vm} --restart`")
            }
            NextStep::UpAfterFixing { vm } => format!("after fixing, run `coral up --vm {vm}`"),
            NextStep::Up => "run `coral up`".into(),
            NextStep::CheckXapiThenUp => {
                "check `systemctl status xapi`, then run `coral up`".into()
            }
            NextStep::AddEntry => "add one with `coral service install --vm VM`".into(),
            NextStep::FixConfig => {
                "fix the file, or rewrite it with `coral service install --vm VM`".into()
            }
            NextStep::UninstallFirst { vm } => {
                format!("run `coral service uninstall --vm {vm}` first")
            }
            NextStep::MoveEntry { vm, device } => {
                format!("`coral service install --vm {vm} --device {device} --replace`")
            }
            NextStep::DeviceForEach => "pass --device for each Coral".into(),
            NextStep::StatusShowsPaths => "`coral status` shows the paths".into(),
            NextStep::PassOneOfThose => "pass one of those to --device".into(),
            NextStep::ChooseDevice => "choose one with --device PATH".into(),
            NextStep::PassVmUuid => "pass the uuid of the one you mean with --vm".into(),
            NextStep::InitFirst => "run `coral init` (or `coral up --vm …`) first".into(),
            NextStep::ReplugThenInit => "unplug and replug it, then rerun `coral init`".into(),
            NextStep::InitForceOrReplug => "rerun `coral init --force`, or replug it".into(),
            NextStep::RetryInit => {
                "rerun `coral init` (replug the Coral if it keeps failing)".into()
            }
            NextStep::RerunVerbose => "rerun with -vv for every USB request".into(),
            NextStep::GetFirmware { dir } => format!("get one with `coral firmware fetch` (downloads the pinned image into {dir}), or bring a copy of apex_latest_single_ep.bin and run `coral firmware install FILE` (copies it into {dir}), or pass it with --firmware FILE"),
            NextStep::FetchOrNameCopy => "get the image with `coral firmware fetch`, or pass the path of a copy of apex_latest_single_ep.bin with --firmware".into(),
            NextStep::NameRealImage => "pass apex_latest_single_ep.bin (10783 bytes; `coral firmware fetch` downloads it)".into(),
            NextStep::RetryFetchOrElsewhere { url } => format!("rerun `coral firmware fetch`; if it fails again, download {url} elsewhere and run `coral firmware install FILE`"),
            NextStep::RootOrOtherDir => "run as root, or choose another directory with --dir".into(),
            NextStep::RebuildWithManifest => "rebuild coral from an unmodified firmware/manifest.txt".into(),
            NextStep::ListVms if simulated() => format!(
                "the simulated pool has {} (`coral --simulate status` shows it)",
                coral::simulate::SIMULATED_VMS
                    .iter()
                    .map(|name| format!("VM '{name}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            NextStep::ListVms => "`xe vm-list params=uuid,name-label` shows the names (exact match, templates and snapshots excluded)".into(),
            NextStep::KnownFirmwareOrAllow => "use libedgetpu's apex_latest_single_ep.bin (`coral firmware fetch`) or pass --allow-unknown-firmware".into(),
            NextStep::DownloadElsewhere { url, dir } => format!(
                "download {url} on a machine that can, then `coral firmware install FILE --dir {dir}` (or copy it into {dir})"
            ),
            NextStep::RootOrLockFile => "run as root or set --lock-file".into(),
            NextStep::RerunLater { waited: false } => "rerun later or without --no-wait".into(),
            NextStep::RerunLater { waited: true } => "rerun later or raise --lock-timeout".into(),
            NextStep::RemoveUnsafe { path } => format!(
                "remove it (`rm -r {path}`) and rerun: coral creates it again, private to its user"
            ),
            NextStep::RedoPausesThenDelete { aside } => format!(
                "run `coral detach --vm VM` again for any VM that must stay detached, then delete {aside}"
            ),
        }
    }
}
