//! Typed XAPI calls on top of an [`XeRunner`], scoped to this host. Each
//! is one `xe` invocation with `params=` or `--minimal`, filtered by uuid
//! wherever one is known; names travel as one argument, never through a shell.

use super::parse::{minimal_list, records, Record};
use super::{display_args, XeError, XeRunner};
use crate::error::{fail, FailureKind};
use std::cell::RefCell;
use std::time::Duration;

/// Deadline of a read or a quick write.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of `vm-start` (a VM boot with its devices).
pub const START_TIMEOUT: Duration = Duration::from_secs(300);

/// The ready Coral as XAPI lists it on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PusbInfo {
    /// PUSB uuid.
    pub uuid: String,
    /// Its USB group.
    pub group: String,
    /// sysfs port path.
    pub path: String,
    /// passthrough-enabled.
    pub passthrough: bool,
}

/// A VUSB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VusbInfo {
    /// VUSB uuid.
    pub uuid: String,
    /// Its VM.
    pub vm_uuid: String,
    /// The VM's name-label.
    pub vm_name: String,
    /// currently-attached.
    pub attached: bool,
}

/// A VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmInfo {
    /// uuid.
    pub uuid: String,
    /// name-label.
    pub name: String,
    /// power-state (`halted`, `running`, `paused`, `suspended`).
    pub power_state: String,
    /// ha-restart-priority.
    pub ha_restart_priority: String,
}

const VM_PARAMS: &str =
    "params=uuid,name-label,power-state,is-a-template,is-a-snapshot,is-control-domain,ha-restart-priority";

/// Typed `xe` calls for this host. In dry-run mode mutating calls are not
/// run but recorded (and logged) exactly as they would run.
pub struct XeClient<'a> {
    runner: &'a dyn XeRunner,
    host_uuid: String,
    dry_run: bool,
    planned: RefCell<Vec<String>>,
}

impl<'a> XeClient<'a> {
    /// A client for the host with `host_uuid`.
    pub fn new(runner: &'a dyn XeRunner, host_uuid: String, dry_run: bool) -> Self {
        XeClient {
            runner,
            host_uuid,
            dry_run,
            planned: RefCell::new(Vec::new()),
        }
    }

    /// This host's uuid.
    pub fn host_uuid(&self) -> &str {
        &self.host_uuid
    }

    /// True in dry-run mode.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// In dry-run mode: the mutating commands that would have run, each as
    /// `xe <args>` quoted for a shell user.
    pub fn planned_commands(&self) -> Vec<String> {
        self.planned.borrow().clone()
    }

    // -- reads --------------------------------------------------------------

    /// Every ready Coral (18d1:9302) XAPI lists on this host.
    pub fn ready_pusbs(&self) -> anyhow::Result<Vec<PusbInfo>> {
        let out = self.read(
            &[
                "pusb-list".into(),
                format!("host-uuid={}", self.host_uuid),
                "vendor-id=18d1".into(),
                "product-id=9302".into(),
                "params=uuid,usb-group-uuid,path,passthrough-enabled".into(),
            ],
            "listing this host's Corals in XAPI",
        )?;
        Ok(records(&out)
            .iter()
            .map(|r| PusbInfo {
                uuid: get(r, "uuid"),
                group: get(r, "usb-group-uuid"),
                path: get(r, "path"),
                passthrough: get(r, "passthrough-enabled") == "true",
            })
            .collect())
    }

    /// The VUSBs on a USB group (XAPI allows at most one).
    pub fn vusbs_of_group(&self, group: &str) -> anyhow::Result<Vec<VusbInfo>> {
        let out = self.read(
            &[
                "vusb-list".into(),
                format!("usb-group-uuid={group}"),
                "params=uuid,vm-uuid,vm-name-label,currently-attached".into(),
            ],
            "listing the Coral's VUSBs",
        )?;
        Ok(records(&out)
            .iter()
            .map(|r| VusbInfo {
                uuid: get(r, "uuid"),
                vm_uuid: get(r, "vm-uuid"),
                vm_name: get(r, "vm-name-label"),
                attached: get(r, "currently-attached") == "true",
            })
            .collect())
    }

    /// How many VUSBs a VM has.
    pub fn vusb_count_of_vm(&self, vm_uuid: &str) -> anyhow::Result<usize> {
        let out = self.read(
            &[
                "vusb-list".into(),
                format!("vm-uuid={vm_uuid}"),
                "--minimal".into(),
            ],
            "counting the VM's VUSBs",
        )?;
        Ok(minimal_list(&out).len())
    }

    /// VMs (never templates, snapshots or control domains) whose uuid is
    /// `spec`, else whose name-label is exactly `spec`.
    pub fn find_vms(&self, spec: &str) -> anyhow::Result<Vec<VmInfo>> {
        if looks_like_uuid(spec) {
            let by_uuid = self.vm_list(&format!("uuid={spec}"))?;
            if !by_uuid.is_empty() {
                return Ok(by_uuid);
            }
        }
        self.vm_list(&format!("name-label={spec}"))
    }

    fn vm_list(&self, filter: &str) -> anyhow::Result<Vec<VmInfo>> {
        let out = self.read(
            &["vm-list".into(), filter.to_string(), VM_PARAMS.into()],
            "looking up the VM",
        )?;
        Ok(records(&out)
            .iter()
            .filter(|r| {
                ["is-a-template", "is-a-snapshot", "is-control-domain"]
                    .iter()
                    .all(|f| get(r, f) != "true")
            })
            .map(|r| VmInfo {
                uuid: get(r, "uuid"),
                name: get(r, "name-label"),
                power_state: get(r, "power-state"),
                ha_restart_priority: get(r, "ha-restart-priority"),
            })
            .collect())
    }

    /// A VM's power state now.
    pub fn power_state(&self, vm_uuid: &str) -> anyhow::Result<String> {
        let out = self.read(
            &[
                "vm-param-get".into(),
                format!("uuid={vm_uuid}"),
                "param-name=power-state".into(),
            ],
            "reading the VM's power state",
        )?;
        Ok(out.trim().to_string())
    }

    // -- writes -------------------------------------------------------------

    /// Ask XAPI to rescan this host's USB devices (returns at once).
    pub fn pusb_scan(&self) -> anyhow::Result<()> {
        self.write(
            &["pusb-scan".into(), format!("host-uuid={}", self.host_uuid)],
            CALL_TIMEOUT,
            "asking XAPI to scan USB",
        )
        .map(drop)
    }

    /// Enable passthrough on a PUSB.
    pub fn enable_passthrough(&self, pusb: &str) -> anyhow::Result<()> {
        self.write(
            &[
                "pusb-param-set".into(),
                format!("uuid={pusb}"),
                "passthrough-enabled=true".into(),
            ],
            CALL_TIMEOUT,
            "enabling passthrough",
        )
        .map(drop)
    }

    /// Create a VUSB; returns its uuid (a placeholder in a dry run).
    pub fn vusb_create(&self, group: &str, vm_uuid: &str) -> anyhow::Result<String> {
        let out = self.write(
            &[
                "vusb-create".into(),
                format!("usb-group-uuid={group}"),
                format!("vm-uuid={vm_uuid}"),
            ],
            CALL_TIMEOUT,
            "creating the VUSB",
        )?;
        Ok(out
            .map(|o| o.trim().to_string())
            .unwrap_or_else(|| "<new VUSB>".into()))
    }

    /// Hot-unplug a VUSB from its running VM.
    pub fn vusb_unplug(&self, vusb: &str) -> anyhow::Result<()> {
        self.write(
            &["vusb-unplug".into(), format!("uuid={vusb}")],
            CALL_TIMEOUT,
            "unplugging the VUSB",
        )
        .map(drop)
    }

    /// Destroy a VUSB.
    pub fn vusb_destroy(&self, vusb: &str) -> anyhow::Result<()> {
        self.write(
            &["vusb-destroy".into(), format!("uuid={vusb}")],
            CALL_TIMEOUT,
            "destroying the VUSB",
        )
        .map(drop)
    }

    /// Start a VM (waits until it runs).
    pub fn vm_start(&self, vm_uuid: &str) -> anyhow::Result<()> {
        self.write(
            &["vm-start".into(), format!("uuid={vm_uuid}")],
            START_TIMEOUT,
            "starting the VM",
        )
        .map(drop)
    }

    /// Shut a VM down: clean unless `force` (a hard power-off).
    pub fn vm_shutdown(
        &self,
        vm_uuid: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<(), XeError> {
        let mut args = vec!["vm-shutdown".to_string(), format!("uuid={vm_uuid}")];
        if force {
            args.push("force=true".into());
        }
        self.write_raw(&args, timeout).map(drop)
    }

    // -- plumbing -----------------------------------------------------------

    fn read(&self, args: &[String], what: &str) -> anyhow::Result<String> {
        self.runner
            .run(args, CALL_TIMEOUT)
            .map_err(|e| xapi_failure(what, e))
    }

    /// Ok(None) in a dry run.
    fn write(
        &self,
        args: &[String],
        timeout: Duration,
        what: &str,
    ) -> anyhow::Result<Option<String>> {
        self.write_raw(args, timeout)
            .map_err(|e| xapi_failure(what, e))
    }

    fn write_raw(&self, args: &[String], timeout: Duration) -> Result<Option<String>, XeError> {
        if self.dry_run {
            let line = format!("xe {}", display_args(args));
            log::info!("dry run: would run {line}");
            self.planned.borrow_mut().push(line);
            return Ok(None);
        }
        self.runner.run(args, timeout).map(Some)
    }
}

/// An `xe` failure as a classified error that keeps xe's message.
pub fn xapi_failure(what: &str, error: XeError) -> anyhow::Error {
    fail(FailureKind::Xapi, format!("{what}: {error}"))
}

fn get(record: &Record, field: &str) -> String {
    record.get(field).cloned().unwrap_or_default()
}

/// 8-4-4-4-12 hex digits.
fn looks_like_uuid(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}
