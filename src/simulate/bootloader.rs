//! The simulated Corals of `--simulate`, on a simulated USB bus: the DFU 1.1
//! boot loader (1a6e:089a) as a strict state machine — a request DFU 1.1
//! does not allow in the current state stalls and leaves it in dfuERROR —
//! that re-enumerates as 18d1:9302 at the peer port (`1-4` → `2-4`) 800 ms
//! after a complete download and a reset. No fault knobs: the test kit's
//! Coral (`coral-testkit`) is the adversarial one.

use super::dfu_machine::{read_memory, DfuMachine, InRequest, OutRequest};
use crate::clock::Clock;
use crate::dfu;
use crate::usb::{
    CoralDevice, CoralState, InterfaceInfo, PortPath, ResetOutcome, UsbBus, UsbError, UsbTransport,
};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// wTransferSize of the boot loader.
const TRANSFER_SIZE: u16 = 256;
/// From a reset to the new identity on the bus.
pub const REENUMERATE_AFTER: Duration = Duration::from_millis(800);

/// One Coral on xHCI port `port`: boot loader at `1-<port>`, ready at `2-<port>`.
struct Coral {
    port: u8,
    identity: CoralState,
    present: bool,
    address: u8,
    /// When it appears again after a reset, and as what.
    back: Option<(Duration, CoralState)>,
    dfu: DfuMachine,
    detach_requested: bool,
    flashed: Vec<u8>,
}

impl Coral {
    fn path_of(&self, identity: CoralState) -> PortPath {
        let bus = match identity {
            CoralState::Uninitialized => 1,
            CoralState::Ready => 2,
        };
        PortPath::new(bus, vec![self.port])
    }

    fn device(&self) -> CoralDevice {
        let other = match self.identity {
            CoralState::Uninitialized => CoralState::Ready,
            CoralState::Ready => CoralState::Uninitialized,
        };
        CoralDevice {
            path: self.path_of(self.identity),
            address: self.address,
            state: self.identity,
            peer: Some(self.path_of(other)),
        }
    }
}

#[derive(Default)]
struct BusState {
    corals: Vec<Coral>,
    last_address: u8,
}

impl BusState {
    fn new_address(&mut self) -> u8 {
        self.last_address = self.last_address.wrapping_add(1).max(4);
        self.last_address
    }

    /// Apply the re-enumerations due by `now`.
    fn settle(&mut self, now: Duration) {
        for i in 0..self.corals.len() {
            if let Some((at, identity)) = self.corals[i].back {
                if at <= now {
                    let address = self.new_address();
                    let c = &mut self.corals[i];
                    c.back = None;
                    c.present = true;
                    c.identity = identity;
                    c.address = address;
                    c.dfu = DfuMachine::idle(TRANSFER_SIZE);
                    c.detach_requested = false;
                }
            }
        }
    }
}

/// The simulated USB bus, on a shared clock.
pub struct SimBus {
    clock: Rc<dyn Clock>,
    state: Rc<RefCell<BusState>>,
}

impl SimBus {
    /// A bus with one Coral per entry of `corals` (xHCI ports 4, 5, …).
    pub fn new(clock: Rc<dyn Clock>, corals: &[CoralState]) -> Self {
        let mut state = BusState::default();
        for (i, identity) in corals.iter().enumerate() {
            let address = state.new_address();
            state.corals.push(Coral {
                port: 4 + i as u8,
                identity: *identity,
                present: true,
                address,
                back: None,
                dfu: DfuMachine::idle(TRANSFER_SIZE),
                detach_requested: false,
                flashed: Vec::new(),
            });
        }
        SimBus {
            clock,
            state: Rc::new(RefCell::new(state)),
        }
    }

    /// The devices present now, re-enumerations due by now done.
    pub fn snapshot(&self) -> Vec<CoralDevice> {
        let mut bus = self.state.borrow_mut();
        bus.settle(self.clock.now());
        bus.corals
            .iter()
            .filter(|c| c.present)
            .map(Coral::device)
            .collect()
    }

    /// Each Coral's identity now (present or on its way back).
    pub fn identities(&self) -> Vec<CoralState> {
        let mut bus = self.state.borrow_mut();
        bus.settle(self.clock.now());
        let identity = |c: &Coral| c.back.map_or(c.identity, |(_, back)| back);
        bus.corals.iter().map(identity).collect()
    }

    /// Coral `index` loses power and comes back at once as a fresh boot loader.
    pub fn brownout(&self, index: usize) {
        let mut bus = self.state.borrow_mut();
        let address = bus.new_address();
        let c = &mut bus.corals[index];
        c.present = true;
        c.back = None;
        c.identity = CoralState::Uninitialized;
        c.address = address;
        c.dfu = DfuMachine::idle(TRANSFER_SIZE);
    }
}

impl UsbBus for SimBus {
    fn list_corals(&self) -> Result<Vec<CoralDevice>, UsbError> {
        Ok(self.snapshot())
    }

    fn open(&self, device: &CoralDevice) -> Result<Box<dyn UsbTransport>, UsbError> {
        self.snapshot();
        let index = self
            .state
            .borrow()
            .corals
            .iter()
            .position(|c| {
                c.present && c.address == device.address && c.device().path == device.path
            })
            .ok_or(UsbError::NoDevice)?;
        Ok(Box::new(SimTransport {
            clock: self.clock.clone(),
            state: self.state.clone(),
            index,
            address: device.address,
        }))
    }
}

/// An open handle on one simulated Coral.
struct SimTransport {
    clock: Rc<dyn Clock>,
    state: Rc<RefCell<BusState>>,
    index: usize,
    address: u8,
}

impl SimTransport {
    /// Run `f` on the device, if it is still the one that was opened.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Coral, Duration) -> Result<T, UsbError>,
    ) -> Result<T, UsbError> {
        let now = self.clock.now();
        let mut bus = self.state.borrow_mut();
        bus.settle(now);
        let c = &mut bus.corals[self.index];
        if !c.present || c.address != self.address {
            return Err(UsbError::NoDevice);
        }
        f(c, now)
    }
}

impl UsbTransport for SimTransport {
    fn interfaces(&self) -> Result<Vec<InterfaceInfo>, UsbError> {
        self.with(|c, _| Ok(interfaces(c.identity, TRANSFER_SIZE)))
    }

    fn claim_interface(&mut self, number: u8) -> Result<(), UsbError> {
        self.with(|_, _| match number {
            0 => Ok(()),
            _ => Err(UsbError::Other("no such interface".into())),
        })
    }

    fn control_in(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        buf: &mut [u8],
    ) -> Result<usize, UsbError> {
        self.with(|c, _| {
            if c.identity != CoralState::Uninitialized
                || request_type != dfu::REQUEST_IN
                || index != 0
            {
                return Err(c.dfu.stall());
            }
            match c.dfu.accept_in(request, buf.len())? {
                InRequest::GetStatus => {
                    if let Some(image) = c.dfu.sync() {
                        c.flashed = image;
                    }
                    buf.copy_from_slice(&c.dfu.status_reply(0));
                    Ok(6)
                }
                InRequest::GetState => {
                    buf[0] = c.dfu.state;
                    Ok(1)
                }
                InRequest::Upload => {
                    let flashed = &c.flashed;
                    c.dfu.upload(value, buf, |offset, buf| {
                        Ok(read_memory(flashed, offset, buf))
                    })
                }
            }
        })
    }

    fn control_out(
        &mut self,
        request_type: u8,
        request: u8,
        value: u16,
        index: u16,
        data: &[u8],
    ) -> Result<usize, UsbError> {
        self.with(|c, _| {
            if request_type != dfu::REQUEST_OUT || index != 0 {
                return Err(c.dfu.stall());
            }
            if c.identity == CoralState::Ready {
                if request == dfu::DFU_DETACH && data.is_empty() {
                    c.detach_requested = true;
                    return Ok(0);
                }
                return Err(UsbError::Stall);
            }
            match c.dfu.accept_out(request, data.len())? {
                OutRequest::Dnload => c.dfu.dnload(value, data),
                OutRequest::ClrStatus => {
                    c.dfu.clear_status();
                    Ok(0)
                }
                OutRequest::Abort => {
                    c.dfu.abort();
                    Ok(0)
                }
            }
        })
    }

    fn reset(self: Box<Self>) -> Result<ResetOutcome, UsbError> {
        self.with(|c, now| {
            let back_as = match c.identity {
                CoralState::Uninitialized if c.dfu.manifested() => CoralState::Ready,
                CoralState::Ready if c.detach_requested => CoralState::Uninitialized,
                _ => {
                    // A reset before a complete download: the same device, afresh.
                    c.dfu = DfuMachine::idle(TRANSFER_SIZE);
                    return Ok(ResetOutcome::SameDevice);
                }
            };
            c.present = false;
            c.back = Some((now + REENUMERATE_AFTER, back_as));
            Ok(ResetOutcome::Reenumerating)
        })
    }
}

/// A Coral's interface as its descriptors show it: the boot loader's DFU
/// interface (DFU 1.1 functional descriptor, wTransferSize `transfer_size`,
/// download and upload capable) or the ready device's vendor interface.
pub fn interfaces(identity: CoralState, transfer_size: u16) -> Vec<InterfaceInfo> {
    let size = transfer_size.to_le_bytes();
    vec![match identity {
        CoralState::Uninitialized => InterfaceInfo {
            number: 0,
            alt_setting: 0,
            class: dfu::DFU_CLASS,
            subclass: dfu::DFU_SUBCLASS,
            protocol: 2,
            extra: vec![
                9,
                dfu::FUNCTIONAL_DESCRIPTOR,
                0x0B,
                0xFF,
                0x00,
                size[0],
                size[1],
                0x10,
                0x01,
            ],
        },
        CoralState::Ready => InterfaceInfo {
            number: 0,
            alt_setting: 0,
            class: 0xFF,
            subclass: 0xFF,
            protocol: 0xFF,
            extra: Vec::new(),
        },
    }]
}
