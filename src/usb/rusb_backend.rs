//! The one file that talks to libusb (through rusb).
//!
//! CONTRACT (bodies to be written).

use super::{CoralDevice, UsbBus, UsbError, UsbTransport};

/// The host's real USB bus. Every call creates a fresh `rusb::Context`
/// (never the global one), so re-enumerated devices are seen.
#[derive(Debug, Default)]
pub struct RusbBus;

impl RusbBus {
    /// The real bus.
    pub fn new() -> Self {
        RusbBus
    }
}

impl UsbBus for RusbBus {
    fn list_corals(&self) -> Result<Vec<CoralDevice>, UsbError> {
        todo!("usb::rusb_backend::list_corals")
    }

    fn open(&self, device: &CoralDevice) -> Result<Box<dyn UsbTransport>, UsbError> {
        let _ = device;
        todo!("usb::rusb_backend::open")
    }
}
