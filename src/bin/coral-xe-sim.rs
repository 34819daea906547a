//! A fake `xe` for end-to-end tests: answers one command line against the
//! simulated XAPI pool kept in a JSON state file (never packaged).
//!
//! Environment:
//! - `CORAL_XE_SIM_STATE` (required): the [`SimState`] file; calls are
//!   serialized by an exclusive lock on `<state>.lock`.
//! - `CORAL_XE_SIM_USB`: a bus file (JSON array of `SimUsbDevice`) written
//!   by the USB emulator at every enumeration change; when it differs from
//!   what the host had, XAPI is told as udev would (an asynchronous scan).
//! - `CORAL_XE_SIM_HOST`: the host that bus belongs to (default: the first).
//!
//! The call's simulated duration is slept in real time after the state is
//! saved; a hanging call sleeps until it is killed.

use anyhow::Context;
use coral::sim::xapi::{SimState, SimUsbDevice};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok((stdout, stderr, status, duration)) => {
            if duration == Duration::MAX {
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            std::thread::sleep(duration);
            print!("{stdout}");
            eprint!("{stderr}");
            let _ = std::io::stdout().flush();
            ExitCode::from(status as u8)
        }
        Err(err) => {
            eprintln!("coral-xe-sim: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<(String, String, i32, Duration)> {
    let state_path = PathBuf::from(
        std::env::var_os("CORAL_XE_SIM_STATE").context("CORAL_XE_SIM_STATE is not set")?,
    );
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_path.with_extension("lock"))
        .context("cannot open the state lock")?;
    lock.lock().context("cannot lock the state")?;

    let mut state = SimState::load(&state_path)?;
    let now = state.now();
    if let Some(bus) = std::env::var_os("CORAL_XE_SIM_USB") {
        sync_bus(&mut state, Path::new(&bus), now)?;
    }
    let result = state.world.execute(args, now);
    state.save(&state_path)?;
    drop(lock);
    let out = result.output;
    Ok((out.stdout, out.stderr, out.status, result.duration))
}

/// Tell XAPI about a changed USB bus, as udev would.
fn sync_bus(state: &mut SimState, bus: &Path, now: Duration) -> anyhow::Result<()> {
    let devices: Vec<SimUsbDevice> = match std::fs::read_to_string(bus) {
        Ok(text) if text.trim().is_empty() => Vec::new(),
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("bad bus file {}", bus.display()))?,
        Err(_) => Vec::new(),
    };
    let host_uuid = match std::env::var("CORAL_XE_SIM_HOST") {
        Ok(uuid) => uuid,
        Err(_) => state
            .world
            .hosts
            .first()
            .map(|h| h.uuid.clone())
            .context("the simulated pool has no host")?,
    };
    let current = state.world.host(&host_uuid).map(|h| h.usb_devices.clone());
    if current.as_ref() != Some(&devices) {
        state.world.set_usb_devices(&host_uuid, devices, now);
    }
    Ok(())
}
