//! A simulated Coral on a simulated USB bus: the DFU 1.1 boot loader
//! (1a6e:089a) as a strict state machine keyed on (request, state) — any
//! request the real device would reject stalls and leaves it in dfuERROR —
//! that re-enumerates as 18d1:9302 after a complete download and a reset.
//! Fault knobs ([`SimFaults`]) reproduce what goes wrong in the field.

use crate::clock::Clock;
use crate::dfu::{self, state, status};
use crate::usb::{
    CoralDevice, CoralState, InterfaceInfo, PortPath, ResetOutcome, UsbBus, UsbError, UsbTransport,
};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// What can go wrong with one simulated Coral.
#[derive(Clone, Debug, Default)]
pub struct SimFaults {
    /// STALL the DNLOAD of this block (0-based).
    pub stall_at_block: Option<u16>,
    /// Report this error status (e.g. errWRITE) after this block (0-based).
    pub error_at_block: Option<(u16, u8)>,
    /// Answer dfuDNBUSY this many times per block before dfuDNLOAD-IDLE.
    pub busy_polls: u32,
    /// bwPollTimeout reported with dfuDNBUSY / manifest states (ms).
    pub poll_timeout_ms: u32,
    /// Report dfuMANIFEST this many times after the zero-length block.
    pub manifest_polls: u32,
    /// The device drops off the bus at the DNLOAD of this block (0-based).
    pub vanish_at_block: Option<u16>,
    /// After the reset the device never comes back.
    pub never_reenumerate: bool,
    /// After the reset it comes back as 1a6e:089a again.
    pub reenumerate_as_bootloader: bool,
    /// Flip one byte of the read-back at this offset.
    pub corrupt_readback_at: Option<usize>,
    /// Return this many extra bytes after the image on read-back.
    pub extra_readback: usize,
    /// The boot loader starts in this DFU state (e.g. dfuERROR, dfuDNLOAD-IDLE).
    pub start_state: Option<u8>,
    /// Opening the device fails like this (permission, busy).
    pub open_error: Option<UsbError>,
}

/// Behaviour of one simulated Coral.
#[derive(Clone, Debug)]
pub struct SimCoralConfig {
    /// Port path of the boot loader, e.g. `1-4`.
    pub bootloader_path: PortPath,
    /// Port path of the ready device (another bus on xHCI), e.g. `2-4`.
    pub ready_path: PortPath,
    /// wTransferSize in the functional descriptor.
    pub transfer_size: u16,
    /// How long after the reset the new identity appears.
    pub reenumerate_after: Duration,
    /// Faults.
    pub faults: SimFaults,
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
            faults: SimFaults::default(),
        }
    }
}

/// One control request as the device received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimRequest {
    /// bmRequestType.
    pub request_type: u8,
    /// bRequest.
    pub request: u8,
    /// wValue.
    pub value: u16,
    /// wLength.
    pub length: u16,
}

/// DFU state of the boot loader.
#[derive(Clone, Debug)]
struct DfuMachine {
    state: u8,
    status: u8,
    next_block: u16,
    received: Vec<u8>,
    busy_left: u32,
    busy_until: Duration,
    manifest_left: u32,
    manifested: bool,
    pending_error: Option<u8>,
    upload_block: u16,
}

impl DfuMachine {
    fn new(start_state: Option<u8>) -> Self {
        DfuMachine {
            state: start_state.unwrap_or(state::IDLE),
            status: if start_state == Some(state::ERROR) {
                status::ERR_WRITE
            } else {
                status::OK
            },
            next_block: 0,
            received: Vec::new(),
            busy_left: 0,
            busy_until: Duration::ZERO,
            manifest_left: 0,
            manifested: false,
            pending_error: None,
            upload_block: 0,
        }
    }
}

struct SimCoral {
    config: SimCoralConfig,
    identity: CoralState,
    present: bool,
    address: u8,
    /// When a disconnected device appears again, and as what.
    reappear: Option<(Duration, CoralState)>,
    dfu: DfuMachine,
    detach_requested: bool,
    /// The bytes of the last completed (manifested) download.
    flashed: Vec<u8>,
}

impl SimCoral {
    fn path(&self) -> PortPath {
        match self.identity {
            CoralState::Uninitialized => self.config.bootloader_path.clone(),
            CoralState::Ready => self.config.ready_path.clone(),
        }
    }
}

#[derive(Default)]
struct BusState {
    corals: Vec<SimCoral>,
    next_address: u8,
    requests: Vec<SimRequest>,
}

impl BusState {
    fn new_address(&mut self) -> u8 {
        self.next_address = self.next_address.wrapping_add(1).max(2);
        self.next_address
    }

    /// Apply re-enumerations due by `now`.
    fn settle(&mut self, now: Duration) {
        for i in 0..self.corals.len() {
            if let Some((at, identity)) = self.corals[i].reappear {
                if at <= now {
                    let address = self.new_address();
                    let coral = &mut self.corals[i];
                    coral.reappear = None;
                    coral.present = true;
                    coral.identity = identity;
                    coral.address = address;
                    coral.dfu = DfuMachine::new(None);
                    coral.detach_requested = false;
                }
            }
        }
    }
}

/// A simulated USB bus holding simulated Corals, on a shared clock.
pub struct SimBus {
    clock: Rc<dyn Clock>,
    state: Rc<RefCell<BusState>>,
}

impl SimBus {
    /// An empty bus.
    pub fn new(clock: Rc<dyn Clock>) -> Self {
        SimBus {
            clock,
            state: Rc::new(RefCell::new(BusState {
                next_address: 3,
                ..BusState::default()
            })),
        }
    }

    /// Plug in a Coral in `state` (uninitialized: at its boot-loader path;
    /// ready: at its ready path). Returns its index for the accessors below.
    pub fn add_coral(&self, config: SimCoralConfig, state: CoralState) -> usize {
        let mut bus = self.state.borrow_mut();
        let address = bus.new_address();
        let dfu = DfuMachine::new(config.faults.start_state);
        bus.corals.push(SimCoral {
            config,
            identity: state,
            present: true,
            address,
            reappear: None,
            dfu,
            detach_requested: false,
            flashed: Vec::new(),
        });
        bus.corals.len() - 1
    }

    /// The devices present right now (re-enumerations due by `clock.now()`
    /// have happened).
    pub fn snapshot(&self) -> Vec<CoralDevice> {
        let mut bus = self.state.borrow_mut();
        bus.settle(self.clock.now());
        bus.corals
            .iter()
            .filter(|c| c.present)
            .map(|c| CoralDevice {
                path: c.path(),
                address: c.address,
                state: c.identity,
            })
            .collect()
    }

    /// Every control request received so far, in order.
    pub fn requests(&self) -> Vec<SimRequest> {
        self.state.borrow().requests.clone()
    }

    /// The bytes of coral `index`'s last complete download.
    pub fn flashed(&self, index: usize) -> Vec<u8> {
        self.state.borrow().corals[index].flashed.clone()
    }

    /// Replace coral `index`'s faults (e.g. clear them before a rerun).
    pub fn set_faults(&self, index: usize, faults: SimFaults) {
        self.state.borrow_mut().corals[index].config.faults = faults;
    }

    /// Unplug and replug coral `index`: it comes back as a fresh boot loader.
    pub fn replug(&self, index: usize) {
        let mut bus = self.state.borrow_mut();
        let address = bus.new_address();
        let coral = &mut bus.corals[index];
        coral.present = true;
        coral.reappear = None;
        coral.identity = CoralState::Uninitialized;
        coral.address = address;
        coral.dfu = DfuMachine::new(None);
    }
}

impl UsbBus for SimBus {
    fn list_corals(&self) -> Result<Vec<CoralDevice>, UsbError> {
        Ok(self.snapshot())
    }

    fn open(&self, device: &CoralDevice) -> Result<Box<dyn UsbTransport>, UsbError> {
        self.snapshot();
        let bus = self.state.borrow();
        let index = bus
            .corals
            .iter()
            .position(|c| c.present && c.address == device.address && c.path() == device.path)
            .ok_or(UsbError::NoDevice)?;
        if let Some(error) = &bus.corals[index].config.faults.open_error {
            return Err(error.clone());
        }
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
    /// The device, if it is still the one we opened.
    fn with_device<T>(
        &self,
        record: Option<SimRequest>,
        f: impl FnOnce(&mut SimCoral, Duration) -> Result<T, UsbError>,
    ) -> Result<T, UsbError> {
        let now = self.clock.now();
        let mut bus = self.state.borrow_mut();
        bus.settle(now);
        let still_there = {
            let c = &bus.corals[self.index];
            c.present && c.address == self.address
        };
        if !still_there {
            return Err(UsbError::NoDevice);
        }
        if let Some(r) = record {
            bus.requests.push(r);
        }
        f(&mut bus.corals[self.index], now)
    }
}

/// Stall: the request is invalid in this state.
fn stall(coral: &mut SimCoral) -> UsbError {
    coral.dfu.state = state::ERROR;
    coral.dfu.status = status::ERR_STALLEDPKT;
    UsbError::Stall
}

impl UsbTransport for SimTransport {
    fn interfaces(&self) -> Result<Vec<InterfaceInfo>, UsbError> {
        self.with_device(None, |c, _| {
            Ok(match c.identity {
                CoralState::Uninitialized => {
                    let size = c.config.transfer_size.to_le_bytes();
                    vec![InterfaceInfo {
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
                    }]
                }
                CoralState::Ready => vec![InterfaceInfo {
                    number: 0,
                    alt_setting: 0,
                    class: 0xFF,
                    subclass: 0xFF,
                    protocol: 0xFF,
                    extra: Vec::new(),
                }],
            })
        })
    }

    fn claim_interface(&mut self, number: u8) -> Result<(), UsbError> {
        self.with_device(None, |_, _| {
            if number == 0 {
                Ok(())
            } else {
                Err(UsbError::Other("no such interface".into()))
            }
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
        let record = SimRequest {
            request_type,
            request,
            value,
            length: buf.len() as u16,
        };
        self.with_device(Some(record), |c, now| {
            if c.identity != CoralState::Uninitialized
                || request_type != dfu::REQUEST_IN
                || index != 0
            {
                return Err(stall(c));
            }
            if c.dfu.state == state::DNBUSY && now < c.dfu.busy_until {
                // Asked again before bwPollTimeout passed: a protocol violation.
                return Err(stall(c));
            }
            match request {
                dfu::DFU_GETSTATUS if buf.len() == 6 => Ok(get_status(c, now, buf)),
                dfu::DFU_GETSTATE if buf.len() == 1 => {
                    buf[0] = c.dfu.state;
                    Ok(1)
                }
                dfu::DFU_UPLOAD => upload(c, value, buf),
                _ => Err(stall(c)),
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
        let record = SimRequest {
            request_type,
            request,
            value,
            length: data.len() as u16,
        };
        self.with_device(Some(record), |c, now| {
            if request_type != dfu::REQUEST_OUT || index != 0 {
                return Err(stall(c));
            }
            if c.identity == CoralState::Ready {
                return if request == dfu::DFU_DETACH && data.is_empty() {
                    c.detach_requested = true;
                    Ok(0)
                } else {
                    Err(UsbError::Stall)
                };
            }
            if c.dfu.state == state::DNBUSY && now < c.dfu.busy_until {
                return Err(stall(c));
            }
            match (request, c.dfu.state) {
                (dfu::DFU_DNLOAD, state::IDLE | state::DNLOAD_IDLE) => dnload(c, value, data),
                (dfu::DFU_CLRSTATUS, state::ERROR) if data.is_empty() => {
                    // Back to dfuIDLE; a new download starts at block 0.
                    c.dfu = DfuMachine::new(None);
                    Ok(0)
                }
                (
                    dfu::DFU_ABORT,
                    state::IDLE
                    | state::DNLOAD_SYNC
                    | state::DNLOAD_IDLE
                    | state::MANIFEST_SYNC
                    | state::UPLOAD_IDLE,
                ) if data.is_empty() => {
                    c.dfu = DfuMachine::new(None);
                    Ok(0)
                }
                _ => Err(stall(c)),
            }
        })
    }

    fn reset(self: Box<Self>) -> Result<ResetOutcome, UsbError> {
        self.with_device(None, |c, now| {
            let back_at = now + c.config.reenumerate_after;
            let outcome = match c.identity {
                CoralState::Uninitialized if c.dfu.manifested => {
                    let faults = &c.config.faults;
                    c.reappear = if faults.never_reenumerate {
                        None
                    } else if faults.reenumerate_as_bootloader {
                        Some((back_at, CoralState::Uninitialized))
                    } else {
                        Some((back_at, CoralState::Ready))
                    };
                    ResetOutcome::Reenumerating
                }
                CoralState::Ready if c.detach_requested => {
                    c.reappear = Some((back_at, CoralState::Uninitialized));
                    ResetOutcome::Reenumerating
                }
                CoralState::Uninitialized => {
                    // A reset before the download completed: a fresh boot loader, same address.
                    c.dfu = DfuMachine::new(None);
                    return Ok(ResetOutcome::SameDevice);
                }
                CoralState::Ready => return Ok(ResetOutcome::SameDevice),
            };
            c.present = false;
            Ok(outcome)
        })
    }
}

fn dnload(c: &mut SimCoral, block: u16, data: &[u8]) -> Result<usize, UsbError> {
    let faults = c.config.faults.clone();
    if data.len() > c.config.transfer_size as usize || block != c.dfu.next_block {
        return Err(stall(c));
    }
    if data.is_empty() {
        if c.dfu.state != state::DNLOAD_IDLE {
            return Err(stall(c));
        }
        c.dfu.state = state::MANIFEST_SYNC;
        c.dfu.manifest_left = faults.manifest_polls;
        return Ok(0);
    }
    if faults.vanish_at_block == Some(block) {
        c.present = false;
        return Err(UsbError::NoDevice);
    }
    if faults.stall_at_block == Some(block) {
        return Err(stall(c));
    }
    if c.dfu.state == state::IDLE {
        c.dfu.received.clear();
    }
    c.dfu.received.extend_from_slice(data);
    c.dfu.next_block = block.wrapping_add(1);
    c.dfu.state = state::DNLOAD_SYNC;
    c.dfu.busy_left = faults.busy_polls;
    c.dfu.pending_error = faults
        .error_at_block
        .filter(|(b, _)| *b == block)
        .map(|(_, s)| s);
    Ok(data.len())
}

fn get_status(c: &mut SimCoral, now: Duration, buf: &mut [u8]) -> usize {
    let poll = c.config.faults.poll_timeout_ms;
    let mut poll_out = 0;
    match c.dfu.state {
        state::DNLOAD_SYNC | state::DNBUSY => {
            if let Some(code) = c.dfu.pending_error.take() {
                c.dfu.state = state::ERROR;
                c.dfu.status = code;
            } else if c.dfu.busy_left > 0 {
                c.dfu.busy_left -= 1;
                c.dfu.state = state::DNBUSY;
                c.dfu.busy_until = now + Duration::from_millis(poll.into());
                poll_out = poll;
            } else {
                c.dfu.state = state::DNLOAD_IDLE;
            }
        }
        state::MANIFEST_SYNC | state::MANIFEST => {
            if c.dfu.manifest_left > 0 {
                c.dfu.manifest_left -= 1;
                c.dfu.state = state::MANIFEST;
                poll_out = poll;
            } else {
                c.dfu.state = state::IDLE;
                c.dfu.manifested = true;
                c.dfu.next_block = 0;
                c.flashed = c.dfu.received.clone();
            }
        }
        _ => {}
    }
    buf[0] = c.dfu.status;
    buf[1..4].copy_from_slice(&poll_out.to_le_bytes()[..3]);
    buf[4] = c.dfu.state;
    buf[5] = 0;
    6
}

fn upload(c: &mut SimCoral, block: u16, buf: &mut [u8]) -> Result<usize, UsbError> {
    let size = c.config.transfer_size as usize;
    let starting = c.dfu.state == state::IDLE && block == 0;
    let continuing = c.dfu.state == state::UPLOAD_IDLE && block == c.dfu.upload_block;
    if buf.len() > size || !(starting || continuing) {
        return Err(stall(c));
    }
    let faults = &c.config.faults;
    let mut memory = c.flashed.clone();
    memory.extend(std::iter::repeat_n(0xA5, faults.extra_readback));
    if let Some(at) = faults.corrupt_readback_at {
        if let Some(b) = memory.get_mut(at) {
            *b ^= 0xFF;
        }
    }
    let start = (block as usize * buf.len()).min(memory.len());
    let n = buf.len().min(memory.len() - start);
    buf[..n].copy_from_slice(&memory[start..start + n]);
    if n < buf.len() {
        c.dfu.state = state::IDLE;
        c.dfu.upload_block = 0;
    } else {
        c.dfu.state = state::UPLOAD_IDLE;
        c.dfu.upload_block = block.wrapping_add(1);
    }
    Ok(n)
}
