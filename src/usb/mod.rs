//! Finding Corals and talking to them: the narrow hardware boundary.
//!
//! [`UsbBus`] lists Corals and opens them; [`UsbTransport`] is exactly the
//! USB requests the DFU download needs. [`rusb_backend`] implements both over
//! libusb; `crate::sim::coral` implements both in memory.

pub mod path;
pub mod rusb_backend;

use std::fmt;

pub use path::PortPath;

/// USB id of a Coral that lost power: the DFU boot loader ("Global Unichip Corp.").
pub const UNINITIALIZED_ID: UsbId = UsbId {
    vendor: 0x1a6e,
    product: 0x089a,
};
/// USB id of a Coral running its firmware ("Google Inc."), the usable Edge TPU.
pub const READY_ID: UsbId = UsbId {
    vendor: 0x18d1,
    product: 0x9302,
};

/// A USB vendor:product pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UsbId {
    /// idVendor.
    pub vendor: u16,
    /// idProduct.
    pub product: u16,
}

impl fmt::Display for UsbId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.product)
    }
}

/// Which of its two identities a Coral shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CoralState {
    /// `1a6e:089a`, waiting for firmware.
    Uninitialized,
    /// `18d1:9302`, firmware running.
    Ready,
}

impl CoralState {
    /// The state a USB id stands for, if it is a Coral at all.
    pub fn from_id(id: UsbId) -> Option<CoralState> {
        if id == UNINITIALIZED_ID {
            Some(CoralState::Uninitialized)
        } else if id == READY_ID {
            Some(CoralState::Ready)
        } else {
            None
        }
    }

    /// The USB id of this state.
    pub fn id(self) -> UsbId {
        match self {
            CoralState::Uninitialized => UNINITIALIZED_ID,
            CoralState::Ready => READY_ID,
        }
    }

    /// Short lower-case name used in output and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            CoralState::Uninitialized => "uninitialized",
            CoralState::Ready => "ready",
        }
    }
}

impl fmt::Display for CoralState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One Coral as enumerated right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoralDevice {
    /// Port path in sysfs form, e.g. `2-1.4` (what XAPI shows as a PUSB's `path`).
    pub path: PortPath,
    /// USB device number (address) on its bus; changes on every enumeration.
    pub address: u8,
    /// Which identity it shows.
    pub state: CoralState,
}

impl fmt::Display for CoralDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} Coral at {} ({}, device {:03})",
            self.state,
            self.path,
            self.state.id(),
            self.address
        )
    }
}

/// A failed USB operation, classified so callers can tell a vanished device
/// from a refused request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsbError {
    /// The device is gone (unplugged, or re-enumerating after a reset).
    NoDevice,
    /// The device stalled the request (DFU devices stall requests invalid in their state).
    Stall,
    /// The request timed out.
    Timeout,
    /// Permission denied opening the device (not root?).
    Access,
    /// The device or interface is claimed by someone else (e.g. a VM's passthrough).
    Busy,
    /// libusb could not start, or another error; the text says which.
    Other(String),
}

impl fmt::Display for UsbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsbError::NoDevice => f.write_str("device disconnected"),
            UsbError::Stall => f.write_str("request stalled by the device"),
            UsbError::Timeout => f.write_str("USB request timed out"),
            UsbError::Access => f.write_str("permission denied"),
            UsbError::Busy => f.write_str("device busy (claimed by another driver or program)"),
            UsbError::Other(text) => f.write_str(text),
        }
    }
}

impl std::error::Error for UsbError {}

/// One interface (alternate setting) of the active configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// bInterfaceNumber.
    pub number: u8,
    /// bAlternateSetting.
    pub alt_setting: u8,
    /// bInterfaceClass.
    pub class: u8,
    /// bInterfaceSubClass.
    pub subclass: u8,
    /// bInterfaceProtocol.
    pub protocol: u8,
    /// Class-specific descriptors following the interface descriptor
    /// (for DFU: the functional descriptor, type 0x21).
    pub extra: Vec<u8>,
}

/// What a USB port reset led to. The handle is consumed either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResetOutcome {
    /// The device dropped off the bus to re-enumerate (the expected outcome
    /// after a complete firmware download: Linux reports ENODEV).
    Reenumerating,
    /// The reset completed and the device kept its descriptors.
    SameDevice,
}

/// Lists and opens Corals on this host. Each call enumerates afresh.
pub trait UsbBus {
    /// Every Coral on this host, in either state.
    fn list_corals(&self) -> Result<Vec<CoralDevice>, UsbError>;
    /// Open a Coral for control transfers.
    fn open(&self, device: &CoralDevice) -> Result<Box<dyn UsbTransport>, UsbError>;
}

/// The USB requests the DFU download needs, and nothing else.
pub trait UsbTransport {
    /// Interfaces of the active configuration, with their extra descriptors.
    fn interfaces(&self) -> Result<Vec<InterfaceInfo>, UsbError>;
    /// Claim an interface (no SET_CONFIGURATION).
    fn claim_interface(&mut self, number: u8) -> Result<(), UsbError>;
    /// A control transfer from the device; returns the bytes received.
    fn control_in(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        buf: &mut [u8],
    ) -> Result<usize, UsbError>;
    /// A control transfer to the device; returns the bytes sent.
    fn control_out(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        data: &[u8],
    ) -> Result<usize, UsbError>;
    /// USB port reset. Consumes the handle: after a reset it is dead either way.
    fn reset(self: Box<Self>) -> Result<ResetOutcome, UsbError>;
}

/// Pick the one Coral to act on from `corals` (a fresh listing).
///
/// With `device`, the Coral at exactly that port path, else the one on the
/// same port chain (the boot loader's `1-4` finds the ready `2-4`, see
/// [`PortPath::same_port_chain`]). Without it, the only Coral there is.
/// None, or several without `--device`, is a `FailureKind::NoCoral` error
/// naming the paths and the next step.
pub fn select_one(corals: &[CoralDevice], device: Option<&str>) -> anyhow::Result<CoralDevice> {
    use crate::error::{fail, FailureKind};
    let listed = || {
        corals
            .iter()
            .map(|c| format!("{} ({})", c.path, c.state))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match device {
        Some(text) => {
            let wanted: PortPath = text.parse().map_err(|e| {
                fail(
                    FailureKind::NoCoral,
                    format!("--device {text:?}: {e}; give a port path like 2-1.4 (see `coral status`)"),
                )
            })?;
            let exact = corals.iter().find(|c| c.path == wanted);
            let same_chain = || {
                let mut chain = corals.iter().filter(|c| c.path.same_port_chain(&wanted));
                match (chain.next(), chain.next()) {
                    (Some(one), None) => Some(one),
                    _ => None,
                }
            };
            match exact.or_else(same_chain) {
                Some(found) => Ok(found.clone()),
                None if corals.is_empty() => Err(fail(
                    FailureKind::NoCoral,
                    format!("no Coral at {wanted}: no Coral is plugged into this host; check `lsusb` for 1a6e:089a or 18d1:9302"),
                )),
                None => Err(fail(
                    FailureKind::NoCoral,
                    format!("no Coral at {wanted}; Corals on this host: {}; pass one of those to --device", listed()),
                )),
            }
        }
        None => match corals {
            [] => Err(fail(
                FailureKind::NoCoral,
                "no Coral found on this host's USB (neither 1a6e:089a nor 18d1:9302); is it plugged in? check `lsusb`",
            )),
            [one] => Ok(one.clone()),
            _ => Err(fail(
                FailureKind::NoCoral,
                format!("{} Corals found: {}; choose one with --device PATH", corals.len(), listed()),
            )),
        },
    }
}

#[cfg(test)]
mod select_tests {
    use super::*;

    fn coral(path: &str, state: CoralState) -> CoralDevice {
        CoralDevice {
            path: path.parse().unwrap(),
            address: 5,
            state,
        }
    }

    #[test]
    fn picks_the_only_coral_or_names_all_of_several() {
        let one = [coral("1-4", CoralState::Uninitialized)];
        assert_eq!(select_one(&one, None).unwrap().path.to_string(), "1-4");
        let two = [
            coral("1-4", CoralState::Uninitialized),
            coral("2-3", CoralState::Ready),
        ];
        let err = select_one(&two, None).unwrap_err().to_string();
        assert!(
            err.contains("1-4 (uninitialized)") && err.contains("2-3 (ready)"),
            "{err}"
        );
        assert!(select_one(&[], None)
            .unwrap_err()
            .to_string()
            .contains("lsusb"));
    }

    #[test]
    fn device_matches_exactly_then_by_port_chain() {
        let corals = [
            coral("2-4", CoralState::Ready),
            coral("1-3", CoralState::Uninitialized),
        ];
        assert_eq!(
            select_one(&corals, Some("2-4")).unwrap().path.to_string(),
            "2-4"
        );
        assert_eq!(
            select_one(&corals, Some("1-4")).unwrap().path.to_string(),
            "2-4"
        );
        let err = select_one(&corals, Some("1-9")).unwrap_err().to_string();
        assert!(
            err.contains("no Coral at 1-9") && err.contains("2-4 (ready)"),
            "{err}"
        );
        assert!(select_one(&corals, Some("x;y")).is_err());
    }
}
