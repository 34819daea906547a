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
use coral::simulate::dfu_machine::{read_memory, DfuMachine, DnloadBlock, InRequest, OutRequest};
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

/// The boot loader: the product's strict DFU 1.1 machine, plus the faults
/// the test kit layers around it as they unfold.
#[derive(Clone, Debug)]
struct BootLoader {
    strict: DfuMachine,
    pending: PendingFaults,
}

/// What the faults have in store for a boot loader: busy polls and
/// bwPollTimeout timers left, an error status due, read-back blocks served.
#[derive(Clone, Debug, Default)]
struct PendingFaults {
    busy_left: u32,
    busy_until: Duration,
    manifest_left: u32,
    manifest_until: Duration,
    error: Option<u8>,
    uploads: u32,
}

impl BootLoader {
    /// A fresh boot loader in dfuIDLE.
    fn fresh(transfer_size: u16) -> Self {
        BootLoader {
            strict: DfuMachine::idle(transfer_size),
            pending: PendingFaults::default(),
        }
    }

    /// A fresh boot loader, or one an interrupted run left in `start_state`
    /// (still busy with a block, or manifesting, as `faults` say).
    fn new(transfer_size: u16, start_state: Option<u8>, faults: &SimFaults) -> Self {
        let mut loader = BootLoader::fresh(transfer_size);
        match start_state {
            Some(state::ERROR) => loader.strict.fail(status::ERR_WRITE),
            Some(state) => loader.strict.state = state,
            None => {}
        }
        match loader.strict.state {
            state::DNLOAD_SYNC => loader.pending.busy_left = faults.busy_polls,
            state::MANIFEST_SYNC => loader.pending.manifest_left = faults.manifest_polls,
            _ => {}
        }
        loader
    }
}

struct SimCoral {
    config: SimCoralConfig,
    identity: CoralState,
    present: bool,
    address: u8,
    /// When a disconnected device appears again, and as what.
    reappear: Option<(Duration, CoralState)>,
    dfu: BootLoader,
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
                    coral.dfu = BootLoader::fresh(coral.config.transfer_size);
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
        let dfu = BootLoader::new(
            config.transfer_size,
            config.faults.start_state,
            &config.faults,
        );
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

    /// A link drop (or an xHCI reset) without power loss: coral `index`
    /// leaves the bus now and is back `gap` later as itself (its firmware
    /// survives), at the same port, under a new device number.
    pub fn link_drop(&self, index: usize, gap: Duration) {
        let now = self.clock.now();
        let mut bus = self.state.borrow_mut();
        let coral = &mut bus.corals[index];
        coral.present = false;
        coral.reappear = Some((now + gap, coral.identity));
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
        coral.dfu = BootLoader::fresh(coral.config.transfer_size);
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
                return Err(c.dfu.strict.stall());
            }
            if !timers_elapsed(c, now) {
                // Asked before bwPollTimeout passed: DFU 1.1 allows nothing then.
                return Err(c.dfu.strict.stall());
            }
            match c.dfu.strict.accept_in(request, buf.len())? {
                InRequest::GetStatus => Ok(get_status(c, now, buf)),
                InRequest::GetState => {
                    buf[0] = c.dfu.strict.state;
                    Ok(1)
                }
                InRequest::Upload => upload(c, value, buf),
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
                return Err(c.dfu.strict.stall());
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
                return Err(c.dfu.strict.stall());
            }
            match c.dfu.strict.accept_out(request, data.len())? {
                OutRequest::Dnload => dnload(c, value, data),
                OutRequest::ClrStatus => {
                    // Back to dfuIDLE; a new download starts at block 0.
                    c.dfu.strict.clear_status();
                    c.dfu.pending = PendingFaults::default();
                    if let Some(code) = c.config.faults.sticky_error {
                        c.dfu.strict.fail(code);
                    }
                    Ok(0)
                }
                OutRequest::Abort => {
                    c.dfu.strict.abort();
                    c.dfu.pending = PendingFaults::default();
                    Ok(0)
                }
            }
        })
    }

    fn reset(self: Box<Self>) -> Result<ResetOutcome, UsbError> {
        self.with_device(None, |c, now| {
            let back_at = now + c.config.reenumerate_after;
            let reset_error = c.config.faults.reset_error.clone();
            let outcome = match c.identity {
                CoralState::Uninitialized if c.dfu.strict.manifested() => {
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
                    c.dfu = BootLoader::fresh(c.config.transfer_size);
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

/// DNLOAD, strict as the product's machine checks it, with the block faults
/// (vanish, stall, short write, busy polls, error status) layered around it.
fn dnload(c: &mut SimCoral, block: u16, data: &[u8]) -> Result<usize, UsbError> {
    let faults = c.config.faults.clone();
    if c.dfu.strict.check_dnload(block, data.len())? == DnloadBlock::End {
        c.dfu.pending.manifest_left = faults.manifest_polls;
        return Ok(0);
    }
    if faults.vanish_at_block == Some(block) {
        c.present = false;
        return Err(UsbError::NoDevice);
    }
    if faults.stall_at_block == Some(block) {
        return Err(c.dfu.strict.stall());
    }
    let taken = if faults.short_write_at_block == Some(block) {
        data.len() / 2
    } else {
        data.len()
    };
    c.dfu.strict.store_block(block, &data[..taken]);
    c.dfu.pending.busy_left = faults.busy_polls;
    c.dfu.pending.error = faults
        .error_at_block
        .filter(|(b, _)| *b == block)
        .map(|(_, s)| s);
    Ok(taken)
}

/// Let dfuDNBUSY / dfuMANIFEST end when their bwPollTimeout has passed
/// (to dfuDNLOAD-SYNC / dfuMANIFEST-SYNC); false while it has not (DFU 1.1
/// allows no request in those states).
fn timers_elapsed(c: &mut SimCoral, now: Duration) -> bool {
    let dfu = &mut c.dfu;
    match dfu.strict.state {
        state::DNBUSY if now < dfu.pending.busy_until => false,
        state::DNBUSY => {
            dfu.strict.state = state::DNLOAD_SYNC;
            true
        }
        state::MANIFEST if now < dfu.pending.manifest_until => false,
        state::MANIFEST => {
            dfu.strict.state = state::MANIFEST_SYNC;
            true
        }
        _ => true,
    }
}

/// GETSTATUS: a pending error status, or dfuDNBUSY / dfuMANIFEST for as
/// many polls as the faults say, before the product machine's own
/// transition (the block written, the image manifested).
fn get_status(c: &mut SimCoral, now: Duration, buf: &mut [u8]) -> usize {
    let poll = c.config.faults.poll_timeout_ms;
    let reported = if c.config.faults.garbled_poll_timeout {
        0x00FF_FFFF
    } else {
        poll
    };
    let busy_until = now + Duration::from_millis(poll.into());
    let dfu = &mut c.dfu;
    let mut poll_out = 0;
    match dfu.strict.state {
        state::DNLOAD_SYNC if dfu.pending.error.is_some() => {
            dfu.strict
                .fail(dfu.pending.error.take().unwrap_or_default());
        }
        state::DNLOAD_SYNC if dfu.pending.busy_left > 0 => {
            dfu.pending.busy_left -= 1;
            dfu.strict.state = state::DNBUSY;
            dfu.pending.busy_until = busy_until;
            poll_out = reported;
        }
        state::MANIFEST_SYNC if dfu.pending.manifest_left > 0 => {
            dfu.pending.manifest_left -= 1;
            dfu.strict.state = state::MANIFEST;
            dfu.pending.manifest_until = busy_until;
            poll_out = reported;
        }
        _ => {
            if let Some(image) = dfu.strict.sync() {
                c.flashed = image;
            }
        }
    }
    buf.copy_from_slice(&c.dfu.strict.status_reply(poll_out));
    6
}

/// UPLOAD, strict as the product's machine checks it, reading back a
/// memory the faults may corrupt, lengthen, or make endless.
fn upload(c: &mut SimCoral, block: u16, buf: &mut [u8]) -> Result<usize, UsbError> {
    let faults = c.config.faults.clone();
    let mut memory = c.flashed.clone();
    memory.extend(std::iter::repeat_n(0xA5, faults.extra_readback));
    if let Some(at) = faults.corrupt_readback_at {
        if let Some(b) = memory.get_mut(at) {
            *b ^= 0xFF;
        }
    }
    let uploads = &mut c.dfu.pending.uploads;
    c.dfu.strict.upload(block, buf, |offset, buf| {
        *uploads += 1;
        if !faults.endless_upload {
            return Ok(read_memory(&memory, offset, buf));
        }
        if *uploads > 100_000 {
            return Err(UsbError::Other(
                "simulated device: the host never stopped reading back".into(),
            ));
        }
        for (i, byte) in buf.iter_mut().enumerate() {
            *byte = memory.get(offset + i).copied().unwrap_or(0xA5);
        }
        Ok(buf.len())
    })
}
