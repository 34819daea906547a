//! A simulated Coral on a simulated USB bus: the DFU 1.1 boot loader
//! (1a6e:089a) as a strict state machine keyed on (request, state) — any
//! request DFU 1.1 does not allow in the current state stalls and leaves it
//! in dfuERROR (ABORT in dfuDNLOAD-SYNC or dfuMANIFEST-SYNC, anything before
//! bwPollTimeout has passed in dfuDNBUSY or dfuMANIFEST) — that
//! re-enumerates as 18d1:9302 after a complete download and a reset, at the
//! same physical port: the same path, or its peer on the controller's other
//! root hub, whose number may differ (`1-5` ↔ `2-3`, coral-dfu.md).
//! Fault knobs ([`SimFaults`]) reproduce what goes wrong in the field.

use coral::clock::Clock;
use coral::dfu::{self, state, status};
use coral::simulate::bootloader::interfaces;
use coral::usb::{
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
    /// The USB reset reports this error (I/O, pipe, timeout), yet the
    /// device leaves the bus and re-enumerates as it would have.
    pub reset_error: Option<UsbError>,
    /// Every bwPollTimeout it reports is garbled to 0xFFFFFF ms (4.6 hours);
    /// it is really busy only `poll_timeout_ms`.
    pub garbled_poll_timeout: bool,
    /// UPLOAD never ends: full blocks (the image, then 0xA5 filler) for
    /// ever. After 100,000 of them the simulated device errors out, so a
    /// host that never stops fails instead of hanging the test.
    pub endless_upload: bool,
    /// The DNLOAD of this block (0-based) takes only half of its bytes.
    pub short_write_at_block: Option<u16>,
    /// CLRSTATUS is answered, but the device falls back into dfuERROR with
    /// this status (a fault that does not clear).
    pub sticky_error: Option<u8>,
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
    /// When it first appears on the bus (a Coral behind a hub, or slow to
    /// power up, enumerates after coral has started); zero: at once.
    pub appears_at: Duration,
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
            appears_at: Duration::ZERO,
            faults: SimFaults::default(),
        }
    }

    /// A Coral whose boot loader is at `bootloader` and ready device at
    /// `ready` (the two sides of one physical port: peers when they differ).
    pub fn at(bootloader: &str, ready: &str) -> Self {
        SimCoralConfig {
            bootloader_path: bootloader.parse().expect("a port path"),
            ready_path: ready.parse().expect("a port path"),
            ..SimCoralConfig::xhci(1)
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
    manifest_until: Duration,
    manifested: bool,
    pending_error: Option<u8>,
    upload_block: u16,
    uploads: u32,
}

impl DfuMachine {
    /// A fresh boot loader, or one an interrupted run left in `start_state`
    /// (still busy with a block, or manifesting, as `faults` say).
    fn new(start_state: Option<u8>, faults: &SimFaults) -> Self {
        let state = start_state.unwrap_or(state::IDLE);
        DfuMachine {
            state,
            status: if state == state::ERROR {
                status::ERR_WRITE
            } else {
                status::OK
            },
            next_block: 0,
            received: Vec::new(),
            busy_left: if state == state::DNLOAD_SYNC {
                faults.busy_polls
            } else {
                0
            },
            busy_until: Duration::ZERO,
            manifest_left: if state == state::MANIFEST_SYNC {
                faults.manifest_polls
            } else {
                0
            },
            manifest_until: Duration::ZERO,
            manifested: false,
            pending_error: None,
            upload_block: 0,
            uploads: 0,
        }
    }

    fn fresh() -> Self {
        Self::new(None, &SimFaults::default())
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
    /// Pairs of peer ports (the two sides of one physical port).
    peers: Vec<(PortPath, PortPath)>,
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
                    coral.dfu = DfuMachine::fresh();
                    coral.detach_requested = false;
                }
            }
        }
    }

    fn peer_of(&self, path: &PortPath) -> Option<PortPath> {
        self.peers.iter().find_map(|(a, b)| {
            if a == path {
                Some(b.clone())
            } else if b == path {
                Some(a.clone())
            } else {
                None
            }
        })
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
    /// With `config.appears_at` later than now it enumerates only then.
    pub fn add_coral(&self, config: SimCoralConfig, state: CoralState) -> usize {
        let mut bus = self.state.borrow_mut();
        let address = bus.new_address();
        let dfu = DfuMachine::new(config.faults.start_state, &config.faults);
        if config.bootloader_path != config.ready_path {
            let pair = (config.bootloader_path.clone(), config.ready_path.clone());
            bus.peers.push(pair);
        }
        let late = config.appears_at > self.clock.now();
        let reappear = late.then_some((config.appears_at, state));
        bus.corals.push(SimCoral {
            config,
            identity: state,
            present: !late,
            address,
            reappear,
            dfu,
            detach_requested: false,
            flashed: Vec::new(),
        });
        bus.corals.len() - 1
    }

    /// Make `a` and `b` peers: the two sides of one physical port.
    pub fn link_peers(&self, a: &str, b: &str) {
        let pair = (
            a.parse().expect("a port path"),
            b.parse().expect("a port path"),
        );
        self.state.borrow_mut().peers.push(pair);
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
                peer: bus.peer_of(&c.path()),
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
        coral.dfu = DfuMachine::fresh();
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
            Ok(interfaces(c.identity, c.config.transfer_size))
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
            if !timers_elapsed(c, now) {
                // Asked before bwPollTimeout passed: DFU 1.1 allows nothing then.
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
            if !timers_elapsed(c, now) {
                return Err(stall(c));
            }
            // DFU 1.1, appendix A: the requests each state accepts.
            match (request, c.dfu.state) {
                (dfu::DFU_DNLOAD, state::IDLE | state::DNLOAD_IDLE) => dnload(c, value, data),
                (dfu::DFU_CLRSTATUS, state::ERROR) if data.is_empty() => {
                    // Back to dfuIDLE; a new download starts at block 0.
                    c.dfu = DfuMachine::fresh();
                    if let Some(code) = c.config.faults.sticky_error {
                        c.dfu.state = state::ERROR;
                        c.dfu.status = code;
                    }
                    Ok(0)
                }
                (dfu::DFU_ABORT, state::IDLE | state::DNLOAD_IDLE | state::UPLOAD_IDLE)
                    if data.is_empty() =>
                {
                    let flashed = c.dfu.manifested;
                    c.dfu = DfuMachine::fresh();
                    c.dfu.manifested = flashed;
                    Ok(0)
                }
                _ => Err(stall(c)),
            }
        })
    }

    fn reset(self: Box<Self>) -> Result<ResetOutcome, UsbError> {
        self.with_device(None, |c, now| {
            let back_at = now + c.config.reenumerate_after;
            let reset_error = c.config.faults.reset_error.clone();
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
                    c.dfu = DfuMachine::fresh();
                    return Ok(ResetOutcome::SameDevice);
                }
                CoralState::Ready => return Ok(ResetOutcome::SameDevice),
            };
            c.present = false;
            match reset_error {
                Some(error) => Err(error),
                None => Ok(outcome),
            }
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
    let taken = if faults.short_write_at_block == Some(block) {
        data.len() / 2
    } else {
        data.len()
    };
    c.dfu.received.extend_from_slice(&data[..taken]);
    c.dfu.next_block = block.wrapping_add(1);
    c.dfu.state = state::DNLOAD_SYNC;
    c.dfu.busy_left = faults.busy_polls;
    c.dfu.pending_error = faults
        .error_at_block
        .filter(|(b, _)| *b == block)
        .map(|(_, s)| s);
    Ok(taken)
}

/// Let dfuDNBUSY / dfuMANIFEST end when their bwPollTimeout has passed
/// (to dfuDNLOAD-SYNC / dfuMANIFEST-SYNC); false while it has not (DFU 1.1
/// allows no request in those states).
fn timers_elapsed(c: &mut SimCoral, now: Duration) -> bool {
    match c.dfu.state {
        state::DNBUSY if now < c.dfu.busy_until => false,
        state::DNBUSY => {
            c.dfu.state = state::DNLOAD_SYNC;
            true
        }
        state::MANIFEST if now < c.dfu.manifest_until => false,
        state::MANIFEST => {
            c.dfu.state = state::MANIFEST_SYNC;
            true
        }
        _ => true,
    }
}

fn get_status(c: &mut SimCoral, now: Duration, buf: &mut [u8]) -> usize {
    let poll = c.config.faults.poll_timeout_ms;
    let reported = if c.config.faults.garbled_poll_timeout {
        0x00FF_FFFF
    } else {
        poll
    };
    let mut poll_out = 0;
    match c.dfu.state {
        state::DNLOAD_SYNC => {
            if let Some(code) = c.dfu.pending_error.take() {
                c.dfu.state = state::ERROR;
                c.dfu.status = code;
            } else if c.dfu.busy_left > 0 {
                c.dfu.busy_left -= 1;
                c.dfu.state = state::DNBUSY;
                c.dfu.busy_until = now + Duration::from_millis(poll.into());
                poll_out = reported;
            } else {
                c.dfu.state = state::DNLOAD_IDLE;
            }
        }
        state::MANIFEST_SYNC => {
            if c.dfu.manifest_left > 0 {
                c.dfu.manifest_left -= 1;
                c.dfu.state = state::MANIFEST;
                c.dfu.manifest_until = now + Duration::from_millis(poll.into());
                poll_out = reported;
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
    let faults = c.config.faults.clone();
    c.dfu.uploads += 1;
    if faults.endless_upload && c.dfu.uploads > 100_000 {
        return Err(UsbError::Other(
            "simulated device: the host never stopped reading back".into(),
        ));
    }
    let mut memory = c.flashed.clone();
    memory.extend(std::iter::repeat_n(0xA5, faults.extra_readback));
    if let Some(at) = faults.corrupt_readback_at {
        if let Some(b) = memory.get_mut(at) {
            *b ^= 0xFF;
        }
    }
    let start = block as usize * buf.len();
    let n = if faults.endless_upload {
        buf.len()
    } else {
        buf.len().min(memory.len().saturating_sub(start))
    };
    for (i, byte) in buf[..n].iter_mut().enumerate() {
        *byte = memory.get(start + i).copied().unwrap_or(0xA5);
    }
    if n < buf.len() {
        c.dfu.state = state::IDLE;
        c.dfu.upload_block = 0;
    } else {
        c.dfu.state = state::UPLOAD_IDLE;
        c.dfu.upload_block = block.wrapping_add(1);
    }
    Ok(n)
}
