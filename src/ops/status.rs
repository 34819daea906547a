//! `coral status`: per Coral, its USB state and its XAPI objects.

use crate::usb::{CoralState, UsbBus};
use crate::xe::client::{PowerState, XeClient};
use crate::xe::{short, XeError};
use serde::Serialize;
use std::fmt::Write;

/// The whole status. JSON schema (version 1) documented in README.md.
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    /// Schema version, 1.
    pub schema: u32,
    /// This host's uuid (null without XAPI).
    pub host_uuid: Option<String>,
    /// Whether XAPI could be asked.
    pub xapi_available: bool,
    /// Every Coral on this host's USB.
    pub corals: Vec<CoralStatus>,
}

/// One Coral.
#[derive(Clone, Debug, Serialize)]
pub struct CoralStatus {
    /// Port path, e.g. `2-4`.
    pub path: String,
    /// `uninitialized` or `ready`.
    pub usb_state: String,
    /// `1a6e:089a` or `18d1:9302`.
    pub usb_id: String,
    /// USB device number.
    pub device_number: u8,
    /// Its PUSB on this host (ready Corals only).
    pub pusb_uuid: Option<String>,
    /// passthrough-enabled.
    pub passthrough_enabled: Option<bool>,
    /// Its USB group.
    pub group_uuid: Option<String>,
    /// The VUSB on that group.
    pub vusb_uuid: Option<String>,
    /// The VM that VUSB links.
    pub vm_uuid: Option<String>,
    /// That VM's name-label.
    pub vm_name: Option<String>,
    /// That VM's power state.
    pub vm_power_state: Option<String>,
    /// The VUSB is currently attached (the VM sees the Coral).
    pub attached: bool,
    /// The VUSB exists and the VM runs without it: it arrives at the next start.
    pub pending_restart: bool,
}

impl StatusReport {
    /// A block per Coral, readable on an 80-column terminal.
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        if self.corals.is_empty() {
            out.push_str("no Coral on this host's USB (neither 1a6e:089a nor 18d1:9302)\n");
        }
        for c in &self.corals {
            let _ = writeln!(
                out,
                "Coral {}: {} ({}, device {:03})",
                c.path, c.usb_state, c.usb_id, c.device_number
            );
            if !self.xapi_available {
                continue;
            }
            match (&c.pusb_uuid, &c.group_uuid) {
                (Some(pusb), Some(group)) => {
                    let pass = if c.passthrough_enabled == Some(true) {
                        "on"
                    } else {
                        "off"
                    };
                    let _ = writeln!(
                        out,
                        "  PUSB {}  passthrough {pass}  group {}",
                        short(pusb),
                        short(group)
                    );
                }
                _ if c.usb_state == "ready" => {
                    out.push_str("  PUSB: not listed by XAPI yet (its scan is asynchronous)\n")
                }
                _ => out.push_str("  needs firmware: `coral init` or `coral up --vm <vm>`\n"),
            }
            if let (Some(vusb), Some(vm)) = (&c.vusb_uuid, &c.vm_uuid) {
                let name = c.vm_name.as_deref().unwrap_or("?");
                let power = c.vm_power_state.as_deref().unwrap_or("?");
                let state = if c.attached {
                    "attached"
                } else if c.pending_restart {
                    "pending restart"
                } else {
                    "not attached"
                };
                let _ = writeln!(
                    out,
                    "  VUSB {} -> VM {name} ({}, {power}): {state}",
                    short(vusb),
                    short(vm)
                );
            } else if c.pusb_uuid.is_some() {
                out.push_str("  VUSB: none (`coral attach --vm <vm>`)\n");
            }
        }
        out.trim_end().to_string()
    }
}

/// Gather the status; without `xe` (not a dom0), or while xapi is down or
/// starting, only the USB side (`xapi_available: false`, with a warning).
pub fn status(usb: &dyn UsbBus, xe: Option<&XeClient>) -> anyhow::Result<StatusReport> {
    let corals = usb.list_corals().map_err(|e| {
        crate::error::fail(
            crate::error::FailureKind::Usb,
            format!("listing USB devices: {e}"),
        )
    })?;
    let mut report = StatusReport {
        schema: 1,
        host_uuid: xe.map(|x| x.host_uuid().to_string()),
        xapi_available: xe.is_some(),
        corals: corals
            .iter()
            .map(|coral| CoralStatus {
                path: coral.path.to_string(),
                usb_state: coral.state.to_string(),
                usb_id: coral.state.id().to_string(),
                device_number: coral.address,
                pusb_uuid: None,
                passthrough_enabled: None,
                group_uuid: None,
                vusb_uuid: None,
                vm_uuid: None,
                vm_name: None,
                vm_power_state: None,
                attached: false,
                pending_restart: false,
            })
            .collect(),
    };
    let Some(xe) = xe else {
        return Ok(report);
    };
    if !corals.iter().any(|c| c.state == CoralState::Ready) {
        return Ok(report);
    }
    match xapi_side(xe, &mut report.corals) {
        Ok(()) => Ok(report),
        Err(err) if matches!(err, XeError::Unavailable { .. } | XeError::Missing { .. }) => {
            log::warn!("XAPI not available ({err}); showing USB only");
            report.xapi_available = false;
            for c in &mut report.corals {
                *c = CoralStatus {
                    pusb_uuid: None,
                    passthrough_enabled: None,
                    group_uuid: None,
                    vusb_uuid: None,
                    vm_uuid: None,
                    vm_name: None,
                    vm_power_state: None,
                    attached: false,
                    pending_restart: false,
                    ..c.clone()
                };
            }
            Ok(report)
        }
        Err(err) => Err(crate::ops::xapi_common::xe_fail(
            "reading the Corals' XAPI records",
            err,
        )),
    }
}

fn xapi_side(xe: &XeClient, corals: &mut [CoralStatus]) -> Result<(), XeError> {
    let pusbs = xe.ready_pusbs()?;
    for status in corals.iter_mut() {
        let Some(pusb) = pusbs.iter().find(|p| p.path == status.path) else {
            continue;
        };
        status.pusb_uuid = Some(pusb.uuid.clone());
        status.passthrough_enabled = Some(pusb.passthrough);
        status.group_uuid = Some(pusb.group.clone());
        if let Some(vusb) = xe.vusbs_of_group(&pusb.group)?.into_iter().next() {
            let power = xe.vm(&vusb.vm_uuid)?.map(|v| v.power_state);
            status.pending_restart = !vusb.attached && power == Some(PowerState::Running);
            status.attached = vusb.attached;
            status.vm_name = xe.param("vm", &vusb.vm_uuid, "name-label").ok();
            status.vusb_uuid = Some(vusb.uuid);
            status.vm_uuid = Some(vusb.vm_uuid);
            status.vm_power_state = power.map(|p| p.to_string());
        }
    }
    Ok(())
}
