//! A simulated Coral on a simulated USB bus: DFU 1.1 boot loader (1a6e:089a)
//! that re-enumerates as 18d1:9302 after a complete download and a reset.
//!
//! CONTRACT (bodies to be written).

use crate::clock::Clock;
use crate::usb::{CoralDevice, CoralState, PortPath, UsbBus, UsbError, UsbTransport};
use std::rc::Rc;
use std::time::Duration;

/// Behaviour of one simulated Coral.
#[derive(Clone, Debug)]
pub struct SimCoralConfig {
    /// Port path of the boot loader, e.g. `1-4`.
    pub bootloader_path: PortPath,
    /// Port path of the ready device (another bus on xHCI), e.g. `2-4`.
    pub ready_path: PortPath,
    /// wTransferSize in the functional descriptor.
    pub transfer_size: u16,
    /// How long after the reset the ready device appears.
    pub reenumerate_after: Duration,
}

impl SimCoralConfig {
    /// A Coral on an xHCI port: boot loader at `1-<port>`, ready at `2-<port>`,
    /// 256-byte blocks, 800 ms to re-enumerate.
    pub fn xhci(port: u8) -> Self {
        SimCoralConfig {
            bootloader_path: PortPath::new(1, vec![port]),
            ready_path: PortPath::new(2, vec![port]),
            transfer_size: 256,
            reenumerate_after: Duration::from_millis(800),
        }
    }
}

/// A simulated USB bus holding simulated Corals, on a shared clock.
pub struct SimBus {
    clock: Rc<dyn Clock>,
}

impl SimBus {
    /// An empty bus.
    pub fn new(clock: Rc<dyn Clock>) -> Self {
        SimBus { clock }
    }

    /// Plug in a Coral in `state` (uninitialized: at its boot-loader path;
    /// ready: at its ready path).
    pub fn add_coral(&self, config: SimCoralConfig, state: CoralState) {
        let _ = (config, state, &self.clock);
        todo!("sim::coral::SimBus::add_coral")
    }

    /// The devices present right now (re-enumerations due by `clock.now()`
    /// have happened).
    pub fn snapshot(&self) -> Vec<CoralDevice> {
        todo!("sim::coral::SimBus::snapshot")
    }
}

impl UsbBus for SimBus {
    fn list_corals(&self) -> Result<Vec<CoralDevice>, UsbError> {
        todo!("sim::coral::SimBus::list_corals")
    }

    fn open(&self, device: &CoralDevice) -> Result<Box<dyn UsbTransport>, UsbError> {
        let _ = device;
        todo!("sim::coral::SimBus::open")
    }
}
