//! `coral status`: per Coral, its USB state and its XAPI objects.

use crate::config::Config;
use crate::error::NextStep;
use crate::mapping_state::{MappingState, MappingStates, RestartIntent, StateStore};
use crate::usb::{CoralState, NodeCheck, UsbBus};
use crate::xe::client::{PowerState, XeClient};
use crate::xe::{short, XeError};
use serde::Serialize;
use std::collections::BTreeSet;
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
    /// Each Coral -> VM mapping (config entries and what `coral watch` recorded).
    pub mappings: Vec<MappingStatus>,
    /// What is wrong with the mapping state, one line each with its next
    /// step (an unreadable file, or one kept aside: its pauses are lost).
    pub state_problems: Vec<String>,
}

/// One Coral -> VM mapping, as `coral watch` keeps it.
#[derive(Clone, Debug, Serialize)]
pub struct MappingStatus {
    /// The VM's uuid.
    pub vm_uuid: String,
    /// Its name, as the config or the last action recorded it.
    pub vm_name: String,
    /// The Coral's port from the config (null: the only Coral).
    pub device: Option<String>,
    /// Paused by `coral detach`: the watcher leaves it alone.
    pub paused: bool,
    /// What the watcher last did, one line (null: nothing yet).
    pub last_action: Option<String>,
    /// When, seconds since the Unix epoch.
    pub last_action_at: Option<u64>,
    /// Whether it succeeded.
    pub last_action_ok: Option<bool>,
    /// A restart coral began and no run has finished yet (the VM was to run
    /// again after its shutdown): the next `coral watch`, `up` or `attach`
    /// starts it if it is halted. Null when none.
    pub unfinished_restart: Option<RestartIntent>,
}

/// The mappings: every config entry, then any VM the state file knows of
/// (e.g. `coral watch --vm X` without a config) that still exists (`vms`:
/// every VM uuid XAPI has; None without XAPI: all are shown), each with its
/// recorded state.
pub fn mapping_statuses(
    config: Option<&Config>,
    states: &MappingStates,
    vms: Option<&BTreeSet<String>>,
) -> Vec<MappingStatus> {
    let mut mappings: Vec<MappingStatus> = config
        .map(|c| c.entries.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|entry| MappingStatus {
            vm_uuid: entry.vm_uuid.clone(),
            vm_name: entry.vm_name.clone(),
            device: entry.device.clone(),
            ..MappingStatus::from_state(&entry.vm_uuid, states.mappings.get(&entry.vm_uuid))
        })
        .collect();
    for (uuid, state) in &states.mappings {
        let exists = vms.is_none_or(|vms| vms.contains(uuid));
        if exists && !mappings.iter().any(|m| &m.vm_uuid == uuid) {
            mappings.push(MappingStatus::from_state(uuid, Some(state)));
        }
    }
    mappings
}

impl MappingStatus {
    fn from_state(vm_uuid: &str, state: Option<&MappingState>) -> Self {
        let state = state.cloned().unwrap_or_default();
        MappingStatus {
            vm_uuid: vm_uuid.to_string(),
            vm_name: state.vm_name,
            device: None,
            paused: state.paused,
            last_action: state.last_action,
            last_action_at: state.last_action_at,
            last_action_ok: state.last_action_ok,
            unfinished_restart: state.restart_intent,
        }
    }

    /// Two lines: the mapping, then what the watcher last did.
    fn render(&self, now_unix: u64, out: &mut String) {
        let name = if self.vm_name.is_empty() {
            short(&self.vm_uuid).to_string()
        } else {
            format!("'{}' ({})", self.vm_name, short(&self.vm_uuid))
        };
        let device = self.device.as_deref().unwrap_or("the only Coral");
        let paused = if self.paused {
            " [paused by coral detach]"
        } else {
            ""
        };
        let _ = writeln!(out, "Mapping {device} -> VM {name}{paused}");
        if let Some(intent) = &self.unfinished_restart {
            let _ = writeln!(
                out,
                "  UNFINISHED restart, begun {} ago ({}): the VM is started by the next `coral watch` check, `coral up` or `coral attach` if it is halted; {}",
                age(now_unix.saturating_sub(intent.at)),
                intent.why,
                NextStep::FinishRestart {
                    vm: self.vm_uuid.clone()
                }
            );
        }
        match (&self.last_action, self.last_action_at) {
            (Some(action), Some(at)) => {
                let verdict = if self.last_action_ok == Some(false) {
                    "failed"
                } else {
                    "ok"
                };
                let _ = writeln!(
                    out,
                    "  watch, {} ago ({verdict}): {action}",
                    age(now_unix.saturating_sub(at))
                );
            }
            _ => out.push_str("  watch: no action recorded yet\n"),
        }
    }
}

/// A duration in seconds as people say it: 42 s, 5 min, 3 h, 2 d.
fn age(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
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
    /// That VM's power state (`"running"`, `"halted"`, …, as XAPI names it).
    pub vm_power_state: Option<PowerState>,
    /// The VUSB is currently attached (the VM sees the Coral).
    pub attached: bool,
    /// The VUSB exists and the VM runs without it: it arrives at the next start.
    pub pending_restart: bool,
    /// While attached to a running VM: whether its QEMU holds the Coral at
    /// this port now (`given`), lost it when it re-enumerated (`lost`: the
    /// VM needs a restart), or nothing tells (`unknown`); null otherwise.
    pub guest_node: Option<String>,
}

impl CoralStatus {
    /// A Coral as USB shows it, with nothing from XAPI (yet).
    fn usb_only(path: String, usb_state: String, usb_id: String, device_number: u8) -> Self {
        CoralStatus {
            path,
            usb_state,
            usb_id,
            device_number,
            pusb_uuid: None,
            passthrough_enabled: None,
            group_uuid: None,
            vusb_uuid: None,
            vm_uuid: None,
            vm_name: None,
            vm_power_state: None,
            attached: false,
            pending_restart: false,
            guest_node: None,
        }
    }
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
                _ => {
                    let _ = writeln!(out, "  needs firmware: {}", NextStep::InitFirst);
                }
            }
            if let (Some(vusb), Some(vm)) = (&c.vusb_uuid, &c.vm_uuid) {
                let name = c.vm_name.as_deref().unwrap_or("?");
                let power = c.vm_power_state.map_or("?", PowerState::as_str);
                let state = if c.guest_node.as_deref() == Some("lost") {
                    "the VM lost its Coral; it needs a restart (the Coral re-enumerated after the VM started; XAPI still shows it attached)"
                } else if c.attached {
                    "attached"
                } else if c.pending_restart {
                    "pending restart"
                } else {
                    "not attached"
                };
                let _ = writeln!(
                    out,
                    "  VUSB {} -> VM '{name}' ({}, {power}): {state}",
                    short(vusb),
                    short(vm)
                );
                if c.guest_node.as_deref() == Some("lost") {
                    let _ = writeln!(out, "  {}", NextStep::RestartNow { vm: vm.clone() });
                }
            } else if c.pusb_uuid.is_some() {
                let _ = writeln!(out, "  VUSB: none ({})", NextStep::AttachToVm);
            }
        }
        let now = crate::mapping_state::unix_now();
        for mapping in &self.mappings {
            mapping.render(now, &mut out);
        }
        for problem in &self.state_problems {
            let _ = writeln!(out, "State: {problem}");
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
        mappings: Vec::new(),
        state_problems: Vec::new(),
        corals: corals
            .iter()
            .map(|coral| {
                CoralStatus::usb_only(
                    coral.path.to_string(),
                    coral.state.to_string(),
                    coral.state.id().to_string(),
                    coral.address,
                )
            })
            .collect(),
    };
    let Some(xe) = xe else {
        return Ok(report);
    };
    if !corals.iter().any(|c| c.state == CoralState::Ready) {
        return Ok(report);
    }
    match xapi_side(usb, xe, &mut report.corals) {
        Ok(()) => Ok(report),
        Err(err) if matches!(err, XeError::Unavailable { .. } | XeError::Missing { .. }) => {
            log::warn!("XAPI not available ({err}); showing USB only");
            report.xapi_available = false;
            for c in &mut report.corals {
                *c = CoralStatus::usb_only(
                    std::mem::take(&mut c.path),
                    std::mem::take(&mut c.usb_state),
                    std::mem::take(&mut c.usb_id),
                    c.device_number,
                );
            }
            Ok(report)
        }
        Err(err) => Err(crate::ops::xapi_common::xe_fail(
            "reading the Corals' XAPI records",
            err,
        )),
    }
}

fn xapi_side(usb: &dyn UsbBus, xe: &XeClient, corals: &mut [CoralStatus]) -> Result<(), XeError> {
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
            if vusb.attached && power == Some(PowerState::Running) {
                let check = super::xapi_common::guest_node(usb, xe, &vusb.vm_uuid, &status.path);
                status.guest_node = Some(
                    match check {
                        NodeCheck::Given => "given",
                        NodeCheck::Lost { .. } => "lost",
                        NodeCheck::Unknown(_) => "unknown",
                    }
                    .to_string(),
                );
            }
            status.vm_name = xe.param("vm", &vusb.vm_uuid, "name-label").ok();
            status.vusb_uuid = Some(vusb.uuid);
            status.vm_uuid = Some(vusb.vm_uuid);
            status.vm_power_state = power;
        }
    }
    Ok(())
}

/// Fill in the report's mappings ([`mapping_statuses`]) and what is wrong
/// with the mapping state (each problem also logged at error priority). No
/// ghosts: with XAPI, records of VMs it no longer has (and no config entry
/// names) are neither shown nor kept; they are pruned from the state file
/// unless it is read-only (a dry run) or unreadable.
pub fn add_mappings(
    report: &mut StatusReport,
    xe: Option<&XeClient>,
    config: Option<&Config>,
    store: &StateStore,
) {
    let states = store.load().unwrap_or_default();
    for (what, next) in store.problems() {
        log::error!("{what}");
        report.state_problems.push(format!("{what}; {next}"));
    }
    let vms = xe.and_then(|xe| match xe.vm_uuids() {
        Ok(uuids) => Some(uuids.into_iter().collect::<BTreeSet<_>>()),
        Err(err) => {
            log::warn!("cannot list the VMs ({err}); showing every recorded mapping");
            None
        }
    });
    report.mappings = mapping_statuses(config, &states, vms.as_ref());
    let configured =
        |uuid: &str| config.is_some_and(|c| c.entries.iter().any(|e| e.vm_uuid == uuid));
    let keep = |uuid: &str| vms.as_ref().is_none_or(|vms| vms.contains(uuid)) || configured(uuid);
    let ghosts = states.mappings.keys().any(|uuid| !keep(uuid));
    if !ghosts || !report.state_problems.is_empty() {
        return;
    }
    match store.prune(keep) {
        Ok(gone) if !gone.is_empty() => log::info!(
            "forgot the recorded state of VMs XAPI no longer has: {}",
            gone.join(", ")
        ),
        Ok(_) => {}
        Err(e) => log::debug!("cannot prune {}: {e}", store.path().display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_power_state_keeps_xapis_spelling_in_json() {
        let mut coral = CoralStatus::usb_only("2-4".into(), "ready".into(), "18d1:9302".into(), 6);
        let json = |c: &CoralStatus| serde_json::to_value(c).unwrap()["vm_power_state"].clone();
        assert_eq!(json(&coral), serde_json::Value::Null);
        for (state, spelled) in [
            (PowerState::Halted, "halted"),
            (PowerState::Paused, "paused"),
            (PowerState::Running, "running"),
            (PowerState::Suspended, "suspended"),
        ] {
            coral.vm_power_state = Some(state);
            assert_eq!(json(&coral), spelled);
            assert_eq!(state.as_str(), spelled, "the table says the same");
        }
    }
}
