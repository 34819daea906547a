//! Bring back a VM that coral's own step left halted: a restart whose start
//! failed, a clean shutdown that outlived its follow-up and halted later,
//! or a stop (SIGTERM) that came while the VM was down. Whatever is still
//! running on the VM inside xapi is followed to its end first; then the VM
//! is started, with the Coral if it can be, else without it.

use super::attach::{FOLLOW_POLL, FOLLOW_TIMEOUT};
use super::xapi_common::xe_fail;
use crate::clock::{follow_until, Clock};
use crate::xe::client::{PowerState, XeClient};
use crate::xe::{short, XeError};

/// What [`bring_back`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BroughtBack {
    /// The VM is running (it was, or it was started with its USB devices).
    Running {
        /// True when this call started it.
        started: bool,
    },
    /// It would not start with its Coral: these VUSBs were removed and it
    /// was started without them.
    StartedWithout {
        /// The VUSBs removed.
        removed: Vec<String>,
    },
    /// An operation on it is still running inside xapi after the follow-up.
    StillBusy,
    /// It is neither halted nor running (paused, suspended): not coral's to change.
    Elsewise(PowerState),
}

/// Follow `vm`'s operations to their end, then start it if it is halted
/// (with its VUSBs; if that fails twice, without its Coral's: the VUSBs on
/// a Coral's group or on a group whose device is gone). A stop does not end
/// this: it finishes what coral began.
pub fn bring_back(xe: &XeClient, clock: &dyn Clock, vm: &str) -> anyhow::Result<BroughtBack> {
    let state = match settled(xe, clock, vm)? {
        Some(state) => state,
        None => return Ok(BroughtBack::StillBusy),
    };
    match state {
        PowerState::Running => return Ok(BroughtBack::Running { started: false }),
        PowerState::Halted => {}
        other => return Ok(BroughtBack::Elsewise(other)),
    }
    let mut last = None;
    for _ in 0..2 {
        match start(xe, clock, vm)? {
            Ok(()) => return Ok(BroughtBack::Running { started: true }),
            Err(err) => {
                log::warn!("starting VM {vm} failed ({err})");
                last = Some(err);
            }
        }
    }
    let vusbs = xe
        .vusbs_of_vm(vm)
        .map_err(|e| xe_fail("listing the VM's VUSBs", e))?;
    let pusbs = xe
        .pusbs()
        .map_err(|e| xe_fail("listing the pool's USB devices", e))?;
    let corals = |group: &str| {
        let on_group: Vec<_> = pusbs.iter().filter(|p| p.group == group).collect();
        on_group.is_empty() || on_group.iter().any(|p| p.is_ready_coral())
    };
    let mut removed = Vec::new();
    for vusb in vusbs.iter().filter(|v| corals(&v.group)) {
        match xe.vusb_destroy(&vusb.uuid) {
            Ok(()) => removed.push(vusb.uuid.clone()),
            Err(err) => log::warn!("could not remove VUSB {}: {err}", short(&vusb.uuid)),
        }
    }
    match start(xe, clock, vm)? {
        Ok(()) => Ok(BroughtBack::StartedWithout { removed }),
        Err(err) => Err(crate::error::fail(
            crate::error::FailureKind::Vm,
            format!(
                "VM {vm} is DOWN: it would not start with the Coral ({}) nor without it ({err}); start it by hand: `xe vm-start uuid={vm}`",
                last.map(|e| e.to_string()).unwrap_or_default()
            ),
        )),
    }
}

/// The VM's power state once no operation runs on it (None: still busy).
fn settled(xe: &XeClient, clock: &dyn Clock, vm: &str) -> anyhow::Result<Option<PowerState>> {
    let mut state = PowerState::Halted;
    let idle = follow_until(clock, FOLLOW_TIMEOUT, FOLLOW_POLL, || {
        let info = xe.vm(vm)?;
        state = info
            .as_ref()
            .map(|i| i.power_state)
            .unwrap_or(PowerState::Halted);
        Ok::<_, XeError>(
            info.is_none_or(|i| i.current_operations.is_empty())
                .then_some(()),
        )
    })
    .map_err(|e| xe_fail("following the VM's operation in XAPI", e))?;
    Ok(idle.map(|()| state))
}

/// Start the VM; a start whose `xe` gave up is followed to its end.
fn start(xe: &XeClient, clock: &dyn Clock, vm: &str) -> anyhow::Result<Result<(), XeError>> {
    match xe.vm_start(vm) {
        Ok(()) => Ok(Ok(())),
        Err(err) if err.is_timeout() => Ok(match settled(xe, clock, vm)? {
            Some(PowerState::Running) => Ok(()),
            _ => Err(err),
        }),
        Err(err) => Ok(Err(err)),
    }
}
