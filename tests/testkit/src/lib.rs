//! `coral-testkit`: the test machinery of `coral`, a dev-only workspace
//! member (never installed, never packaged).
//!
//! - [`device`]: a Coral speaking DFU 1.1 on a simulated USB bus, strict as
//!   the fact sheet, with fault knobs for what goes wrong in the field and a
//!   record of every control request.
//! - [`xapi`]: an XCP-ng pool answering `xe` command lines as the fact sheet
//!   describes, with injected faults, outages, call records, and a serde
//!   state kept between calls of the fake `xe` (`coral-xe-sim`).
//! - [`host`]: the two wired together on a virtual clock for in-process tests.
//! - [`e2e`]: the end-to-end harness: the real binary through real libusb
//!   against the umockdev-emulated Coral (`emulator/coral_emulator.py`) and
//!   the fake `xe` on PATH.

pub mod device;
pub mod e2e;
pub mod host;
pub mod xapi;
