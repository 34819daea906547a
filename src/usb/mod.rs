//! Finding Corals and talking to them: the narrow hardware boundary.
//!
//! [`UsbBus`] lists Corals and opens them; [`UsbTransport`] is exactly the
//! USB requests the DFU download needs. [`rusb_backend`] implements both over
//! libusb; `crate::simulate::bootloader` implements both in memory.

pub mod path;
pub mod qemu_node;
pub mod rusb_backend;

use std::fmt;

pub use path::{BadPortPath, PortPath};
pub use qemu_node::NodeCheck;

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
    /// The peer of its port (sysfs `peer`): the other side of the same
    /// physical port on an xHCI controller's other root hub, e.g. `2-3` for
    /// `1-5`. None when the port has no peer (USB 2 only) or it is unknown.
    pub peer: Option<PortPath>,
}

impl CoralDevice {
    /// True when `path` is this device's port or its peer: the same physical port.
    pub fn at_port(&self, path: &PortPath) -> bool {
        self.path == *path || self.peer.as_ref() == Some(path)
    }

    /// True when both sit at the same physical port (the same port chain,
    /// or one's port is the other's peer), never by port numbers alone.
    pub fn same_physical_port(&self, other: &CoralDevice) -> bool {
        self.at_port(&other.path) || other.peer.as_ref() == Some(&self.path)
    }

    /// True when a config entry's `port` names this Coral's physical port:
    /// any bus of its port chain (the boot loader's `1-4` is the ready
    /// `2-4`) or its peer's (`1-5` ↔ `2-3`). The rule `doctor` and the boot
    /// path's wait for configured Corals share.
    pub fn at_configured_port(&self, port: &PortPath) -> bool {
        self.path.same_port_chain(port)
            || self.peer.as_ref().is_some_and(|p| p.same_port_chain(port))
    }

    /// True when `other` is this very enumeration (same port, address and identity).
    pub fn same_enumeration(&self, other: &CoralDevice) -> bool {
        self.path == other.path && self.address == other.address && self.state == other.state
    }
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
    /// Whether QEMU of domain `domid` holds the device now at `path`
    /// ([`qemu_node`]). A bus with no view of QEMU's nodes: unknown.
    fn qemu_node(&self, path: &str, domid: u32) -> NodeCheck {
        let _ = domid;
        NodeCheck::Unknown(format!("no view of QEMU's device nodes for {path}"))
    }
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

/// Why [`select_one`] found no single Coral. The Display names no command
/// line flag: the procedure that asked words the next step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SelectError {
    /// The requested port path is not a port path.
    BadPath(BadPortPath),
    /// No Coral on this host at all.
    NoCoral,
    /// No Coral at the requested port nor at its peer.
    NoneAt {
        /// The requested port.
        wanted: PortPath,
        /// The Corals that are there (maybe none).
        present: Vec<CoralDevice>,
    },
    /// Several Corals and no port requested.
    Several(Vec<CoralDevice>),
}

impl SelectError {
    /// True when a Coral appearing later could resolve it (none there yet).
    pub fn may_resolve_later(&self) -> bool {
        matches!(self, SelectError::NoCoral | SelectError::NoneAt { .. })
    }
}

fn listed(corals: &[CoralDevice]) -> String {
    corals
        .iter()
        .map(|c| format!("{} ({})", c.path, c.state))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for SelectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SelectError::BadPath(e) => write!(f, "{e}"),
            SelectError::NoCoral => {
                f.write_str("no Coral found on this host's USB (neither 1a6e:089a nor 18d1:9302)")
            }
            SelectError::NoneAt { wanted, present } if present.is_empty() => {
                write!(
                    f,
                    "no Coral at {wanted}: no Coral is plugged into this host"
                )
            }
            SelectError::NoneAt { wanted, present } => write!(
                f,
                "no Coral at {wanted}; Corals on this host: {}",
                listed(present)
            ),
            SelectError::Several(corals) => {
                write!(f, "{} Corals found: {}", corals.len(), listed(corals))
            }
        }
    }
}

impl std::error::Error for SelectError {}

/// Pick the one Coral to act on from `corals` (a fresh listing).
///
/// With `device`, the Coral at exactly that port path, else the one whose
/// port's peer it is (the boot loader's `1-5` finds the ready Coral at its
/// peer `2-3`, see [`CoralDevice::at_port`]). Without it, the only Coral there is.
pub fn select_one(
    corals: &[CoralDevice],
    device: Option<&str>,
) -> Result<CoralDevice, SelectError> {
    match device {
        Some(text) => {
            let wanted: PortPath = text.parse().map_err(SelectError::BadPath)?;
            let exact = corals.iter().find(|c| c.path == wanted);
            let peer = || corals.iter().find(|c| c.peer.as_ref() == Some(&wanted));
            match exact.or_else(peer) {
                Some(found) => Ok(found.clone()),
                None => Err(SelectError::NoneAt {
                    wanted,
                    present: corals.to_vec(),
                }),
            }
        }
        None => match corals {
            [] => Err(SelectError::NoCoral),
            [one] => Ok(one.clone()),
            _ => Err(SelectError::Several(corals.to_vec())),
        },
    }
}

#[cfg(test)]
mod select_tests {
    use super::*;

    fn coral(path: &str, state: CoralState, peer: Option<&str>) -> CoralDevice {
        CoralDevice {
            path: path.parse().unwrap(),
            address: 5,
            state,
            peer: peer.map(|p| p.parse().unwrap()),
        }
    }

    #[test]
    fn picks_the_only_coral_or_names_all_of_several() {
        let one = [coral("1-4", CoralState::Uninitialized, None)];
        assert_eq!(select_one(&one, None).unwrap().path.to_string(), "1-4");
        let two = [
            coral("1-4", CoralState::Uninitialized, None),
            coral("2-3", CoralState::Ready, None),
        ];
        let err = select_one(&two, None).unwrap_err();
        assert!(matches!(err, SelectError::Several(_)));
        let text = err.to_string();
        assert!(
            text.contains("1-4 (uninitialized)") && text.contains("2-3 (ready)"),
            "{text}"
        );
        assert_eq!(select_one(&[], None).unwrap_err(), SelectError::NoCoral);
    }

    #[test]
    fn device_matches_exactly_then_by_peer_never_by_numbers_alone() {
        let corals = [
            coral("2-3", CoralState::Ready, Some("1-5")),
            coral("4-4", CoralState::Ready, Some("3-4")),
            coral("1-3", CoralState::Uninitialized, Some("2-5")),
        ];
        let pick = |d: &str| select_one(&corals, Some(d)).map(|c| c.path.to_string());
        assert_eq!(pick("2-3").unwrap(), "2-3");
        assert_eq!(pick("1-5").unwrap(), "2-3", "the peer of 1-5 is 2-3");
        assert_eq!(pick("2-5").unwrap(), "1-3");
        assert!(
            matches!(
                select_one(&corals, Some("1-4")),
                Err(SelectError::NoneAt { .. })
            ),
            "4-4 is on another controller: not 1-4's Coral"
        );
        let err = select_one(&corals, Some("1-9")).unwrap_err().to_string();
        assert!(
            err.contains("no Coral at 1-9") && err.contains("2-3 (ready)"),
            "{err}"
        );
        assert!(!err.contains("--"), "no flag names below the CLI: {err}");
        assert!(matches!(
            select_one(&corals, Some("x;y")),
            Err(SelectError::BadPath(_))
        ));
    }
}
