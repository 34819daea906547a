//! `coral`: bring a Google Coral USB Accelerator back to life after a power
//! loss (USB DFU firmware upload from dom0) and hand it to an XCP-ng VM
//! through XAPI.
//!
//! Layers, bottom up:
//! - [`usb`]: finding Corals (port paths) and the narrow transport trait;
//!   [`usb::rusb_backend`] is the one file that talks to libusb.
//! - [`dfu`]: the DFU 1.1 download protocol over that trait.
//! - [`firmware`]: the manifest of known images, loading and verification.
//! - [`xe`]: the one place that starts `xe`, typed calls on top.
//! - [`ops`]: `init`, `attach`, `detach`, `status`, `up`, `service`: each
//!   reads like the procedure it automates.
//! - [`simulate`]: the `--simulate` host, a Coral and an XCP-ng pool strict
//!   as the real ones, without fault injection (the adversarial simulators
//!   live in the dev-only `coral-testkit`).
//! - [`atomic_file`], [`lock`], [`mapping_state`]: durable, symlink-safe
//!   files, the run lock and what coral remembers between runs.

/// coral's own directory, spelled once: installed firmware images
/// (`$CORAL_FIRMWARE_DIR`) and the mappings' state (`$CORAL_STATE_DIR`)
/// default to it. A macro for help texts built with `concat!`.
#[macro_export]
macro_rules! data_dir {
    () => {
        "/var/lib/coral"
    };
}

/// coral's own directory ([`data_dir!`]): installed firmware images and the
/// mappings' state, unless `$CORAL_FIRMWARE_DIR` / `$CORAL_STATE_DIR` say otherwise.
pub const DATA_DIR: &str = data_dir!();

pub mod atomic_file;
pub mod clock;
pub mod config;
pub mod dfu;
pub mod error;
pub mod firmware;
pub mod lock;
pub mod mapping_state;
pub mod ops;
pub mod simulate;
pub mod usb;
pub mod xe;
