//! Finish a restart a previous run left unfinished. Before coral begins a
//! clean shutdown it records the intent in the mapping state (write-ahead,
//! [`crate::mapping_state::RestartIntent`]); a run that is killed or crashes
//! before the VM runs again leaves it there. The next `coral watch`,
//! `coral up` or `coral attach` reads it: a VM that is now halted (and has
//! no operation in progress inside xapi) is started, with its Coral if it
//! can be, else without it ([`bring_back`]); a VM that runs, or that no
//! longer exists, only has its intent forgotten. A VM halted with no intent
//! recorded is never started here: that halt is the user's.

use super::attach::clear_intent;
use super::bring_back::{bring_back, BroughtBack};
use crate::clock::Clock;
use crate::error::NextStep;
use crate::mapping_state::StateStore;
use crate::xe::client::{PowerState, XeClient};

/// What became of one unfinished restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finished {
    /// The VM was halted and this run started it (with its USB devices).
    Started,
    /// It would not start with its Coral: started without it.
    StartedWithout,
    /// It runs already, is neither halted nor running, or is gone: forgotten.
    NothingToDo,
    /// Something still runs on it inside xapi (or xapi could not be asked):
    /// left for a later run.
    Later,
    /// It would not start at all (logged with the command); forgotten.
    Down,
}

/// True when the state records any unfinished restart (one file read).
pub fn any(state: &StateStore) -> bool {
    !state.intents().is_empty()
}

/// Finish every unfinished restart recorded in `state` (see the module
/// doc). The caller holds the lock shared by every coral run, so no other
/// run is between a shutdown and its start. A dry run only says what it
/// would do. Returns each VM's uuid and outcome.
pub fn finish_unfinished(
    xe: &XeClient,
    clock: &dyn Clock,
    state: &StateStore,
) -> Vec<(String, Finished)> {
    let mut outcomes = Vec::new();
    for (vm, recorded) in state.intents() {
        let outcome = finish_one(xe, clock, state, &vm, &recorded.vm_name);
        outcomes.push((vm, outcome));
    }
    outcomes
}

fn finish_one(
    xe: &XeClient,
    clock: &dyn Clock,
    state: &StateStore,
    vm: &str,
    name: &str,
) -> Finished {
    let label = if name.is_empty() {
        format!("VM {vm}")
    } else {
        format!("VM '{name}' ({vm})")
    };
    let info = match xe.vm(vm) {
        Ok(Some(info)) => info,
        Ok(None) => {
            log::info!("{label} no longer exists; forgot the restart a previous run recorded");
            clear_intent(state, vm);
            return Finished::NothingToDo;
        }
        Err(e) => {
            log::warn!("cannot read {label} ({e}); its unfinished restart is looked at again by the next run");
            return Finished::Later;
        }
    };
    if !info.current_operations.is_empty() {
        log::info!(
            "{label}: {} in progress inside xapi; its unfinished restart is looked at again later",
            info.current_operations.join(", ")
        );
        return Finished::Later;
    }
    if info.power_state != PowerState::Halted {
        clear_intent(state, vm);
        return Finished::NothingToDo;
    }
    if xe.dry_run() {
        log::warn!(
            "{label} is halted by a restart a previous coral run left unfinished; would start it"
        );
        return Finished::Later;
    }
    log::warn!(
        "{label} is halted by a restart a previous coral run left unfinished; coral is finishing it: starting it"
    );
    let outcome = match bring_back(xe, clock, vm) {
        Ok(BroughtBack::Running { started: true }) => {
            log::debug!("{label} started again with its USB devices");
            Finished::Started
        }
        Ok(BroughtBack::StartedWithout { removed }) => {
            log::error!(
                "{label} would not start with its Coral: started it without it (removed {} VUSB(s)); {}",
                removed.len(),
                NextStep::RestorePassthrough { vm: vm.to_string() }
            );
            Finished::StartedWithout
        }
        Ok(BroughtBack::StillBusy) => return Finished::Later,
        Ok(_) => Finished::NothingToDo,
        Err(e) => {
            log::error!("{e:#}");
            Finished::Down
        }
    };
    clear_intent(state, vm);
    outcome
}
