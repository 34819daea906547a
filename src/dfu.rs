//! The USB DFU 1.1 download as the Coral's boot loader expects it
//! (coral-dfu.md), over the narrow [`UsbTransport`] trait: no I/O of its own.

use crate::clock::Clock;
use crate::usb::{InterfaceInfo, UsbError, UsbTransport};
use std::fmt;
use std::time::Duration;

/// bInterfaceClass of a DFU interface (application specific).
pub const DFU_CLASS: u8 = 0xFE;
/// bInterfaceSubClass of a DFU interface.
pub const DFU_SUBCLASS: u8 = 0x01;
/// Descriptor type of the DFU functional descriptor.
pub const FUNCTIONAL_DESCRIPTOR: u8 = 0x21;

/// Class request: host → device, interface recipient.
pub const REQUEST_OUT: u8 = 0x21;
/// Class request: device → host, interface recipient.
pub const REQUEST_IN: u8 = 0xA1;
/// DFU_DETACH.
pub const DFU_DETACH: u8 = 0;
/// DFU_DNLOAD.
pub const DFU_DNLOAD: u8 = 1;
/// DFU_UPLOAD.
pub const DFU_UPLOAD: u8 = 2;
/// DFU_GETSTATUS.
pub const DFU_GETSTATUS: u8 = 3;
/// DFU_CLRSTATUS.
pub const DFU_CLRSTATUS: u8 = 4;
/// DFU_GETSTATE.
pub const DFU_GETSTATE: u8 = 5;
/// DFU_ABORT.
pub const DFU_ABORT: u8 = 6;

/// wValue of DFU_DETACH (ms the device waits for the reset), as Google's runtime sends it.
pub const DETACH_TIMEOUT_MS: u16 = 100;
/// At most this many GETSTATUS polls while the device is busy with one block or manifesting.
const MAX_BUSY_POLLS: u32 = 1000;
/// The longest single wait a device's `bwPollTimeout` may ask for. The field
/// is 24 bits (up to 4.6 hours): a garbled reply must not stall the host.
/// The Coral's boot loader loads into RAM and Google's runtime never waits at
/// all, so a second is far beyond any real need; a longer request is waited
/// for only this long, then GETSTATUS is asked again.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(1);
/// Default deadline of one whole download (state check, blocks, manifest,
/// read-back). A clean one takes well under a second (132 transfers).
pub const DOWNLOAD_DEADLINE: Duration = Duration::from_secs(30);

/// Counts and figures of one firmware download (for output and benchmarks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DownloadSummary {
    /// Image bytes sent.
    pub bytes: usize,
    /// DNLOAD requests incl. the zero-length one.
    pub dnload_requests: u32,
    /// GETSTATUS requests.
    pub getstatus_requests: u32,
    /// UPLOAD requests (read-back).
    pub upload_requests: u32,
    /// Any other class request (CLRSTATUS, ABORT, DETACH).
    pub other_requests: u32,
    /// Block size used (wTransferSize).
    pub transfer_size: u16,
}

/// DFU states (DFU 1.1, table 6.x).
pub mod state {
    /// appIDLE
    pub const APP_IDLE: u8 = 0;
    /// appDETACH
    pub const APP_DETACH: u8 = 1;
    /// dfuIDLE
    pub const IDLE: u8 = 2;
    /// dfuDNLOAD-SYNC
    pub const DNLOAD_SYNC: u8 = 3;
    /// dfuDNBUSY
    pub const DNBUSY: u8 = 4;
    /// dfuDNLOAD-IDLE
    pub const DNLOAD_IDLE: u8 = 5;
    /// dfuMANIFEST-SYNC
    pub const MANIFEST_SYNC: u8 = 6;
    /// dfuMANIFEST
    pub const MANIFEST: u8 = 7;
    /// dfuMANIFEST-WAIT-RESET
    pub const MANIFEST_WAIT_RESET: u8 = 8;
    /// dfuUPLOAD-IDLE
    pub const UPLOAD_IDLE: u8 = 9;
    /// dfuERROR
    pub const ERROR: u8 = 10;
}

/// DFU status codes.
pub mod status {
    /// OK
    pub const OK: u8 = 0;
    /// errWRITE
    pub const ERR_WRITE: u8 = 3;
    /// errADDRESS
    pub const ERR_ADDRESS: u8 = 8;
    /// errSTALLEDPKT
    pub const ERR_STALLEDPKT: u8 = 0x0F;
}

/// The spec's name of a state.
pub fn state_name(state: u8) -> &'static str {
    const NAMES: [&str; 11] = [
        "appIDLE",
        "appDETACH",
        "dfuIDLE",
        "dfuDNLOAD-SYNC",
        "dfuDNBUSY",
        "dfuDNLOAD-IDLE",
        "dfuMANIFEST-SYNC",
        "dfuMANIFEST",
        "dfuMANIFEST-WAIT-RESET",
        "dfuUPLOAD-IDLE",
        "dfuERROR",
    ];
    NAMES
        .get(state as usize)
        .copied()
        .unwrap_or("unknown state")
}

/// The spec's name of a status code.
pub fn status_name(status: u8) -> &'static str {
    const NAMES: [&str; 16] = [
        "OK",
        "errTARGET",
        "errFILE",
        "errWRITE",
        "errERASE",
        "errCHECK_ERASED",
        "errPROG",
        "errVERIFY",
        "errADDRESS",
        "errNOTDONE",
        "errFIRMWARE",
        "errVENDOR",
        "errUSBR",
        "errPOR",
        "errUNKNOWN",
        "errSTALLEDPKT",
    ];
    NAMES
        .get(status as usize)
        .copied()
        .unwrap_or("unknown status")
}

/// The DFU interface and the block size its functional descriptor gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DfuInterface {
    /// bInterfaceNumber.
    pub number: u8,
    /// wTransferSize: the block size.
    pub transfer_size: u16,
}

/// A DFU_GETSTATUS reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DfuStatus {
    /// bStatus.
    pub status: u8,
    /// bwPollTimeout in ms.
    pub poll_timeout_ms: u32,
    /// bState.
    pub state: u8,
}

impl DfuStatus {
    /// A GETSTATUS reply's fields; None when it is shorter than 6 bytes.
    pub fn parse(reply: &[u8]) -> Option<DfuStatus> {
        match reply {
            [status, p0, p1, p2, state, _, ..] => Some(DfuStatus {
                status: *status,
                poll_timeout_ms: u32::from_le_bytes([*p0, *p1, *p2, 0]),
                state: *state,
            }),
            _ => None,
        }
    }
}

impl fmt::Display for DfuStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "state {}, status {}",
            state_name(self.state),
            status_name(self.status)
        )
    }
}

/// A failed DFU step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DfuError {
    /// A USB request failed.
    Usb {
        /// What we were doing, e.g. "DNLOAD block 17 of 43".
        step: String,
        /// The USB failure.
        error: UsbError,
    },
    /// No interface of class FE/01 with a valid functional descriptor.
    NoDfuInterface,
    /// The device answered with an unexpected state or an error status.
    Unexpected {
        /// What we were doing.
        step: String,
        /// What it said.
        status: DfuStatus,
    },
    /// A GETSTATUS reply shorter than 6 bytes.
    ShortStatus {
        /// What we were doing.
        step: String,
    },
    /// The device stayed busy beyond [`MAX_BUSY_POLLS`] polls.
    Stuck {
        /// What we were doing.
        step: String,
    },
    /// Fewer bytes read back than were sent.
    ReadBackShort {
        /// Bytes read back.
        got: usize,
        /// Image size.
        expected: usize,
    },
    /// The read-back differs from the image.
    ReadBackMismatch {
        /// First differing offset.
        offset: usize,
    },
    /// The device took fewer bytes of an OUT request than were sent.
    ShortWrite {
        /// What we were doing.
        step: String,
        /// Bytes the device took.
        sent: usize,
        /// Bytes offered.
        expected: usize,
    },
    /// The whole download did not finish within its deadline.
    Deadline {
        /// What we were doing when it passed.
        step: String,
        /// The deadline.
        budget: Duration,
    },
}

impl fmt::Display for DfuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DfuError::Usb { step, error } => write!(f, "{step}: {error}"),
            DfuError::NoDfuInterface => f.write_str(
                "no DFU interface (class FE/01 with a functional descriptor) on the device",
            ),
            DfuError::Unexpected { step, status } => write!(f, "{step}: device reports {status}"),
            DfuError::ShortStatus { step } => {
                write!(f, "{step}: GETSTATUS reply shorter than 6 bytes")
            }
            DfuError::Stuck { step } => write!(
                f,
                "{step}: device stayed busy after {MAX_BUSY_POLLS} status polls"
            ),
            DfuError::ReadBackShort { got, expected } => write!(
                f,
                "read-back returned {got} bytes, the image has {expected}"
            ),
            DfuError::ReadBackMismatch { offset } => {
                write!(f, "read-back differs from the image at byte {offset}")
            }
            DfuError::ShortWrite {
                step,
                sent,
                expected,
            } => write!(f, "{step}: the device took only {sent} of {expected} bytes"),
            DfuError::Deadline { step, budget } => write!(
                f,
                "{step}: the download did not finish within {} s",
                budget.as_secs_f64()
            ),
        }
    }
}

impl std::error::Error for DfuError {}

/// Find the DFU interface and its block size. Depends on nothing in the
/// functional descriptor but its type, length and wTransferSize.
pub fn find_dfu_interface(interfaces: &[InterfaceInfo]) -> Result<DfuInterface, DfuError> {
    interfaces
        .iter()
        .filter(|i| i.class == DFU_CLASS && i.subclass == DFU_SUBCLASS)
        .find_map(|i| {
            functional_transfer_size(&i.extra).map(|transfer_size| DfuInterface {
                number: i.number,
                transfer_size,
            })
        })
        .ok_or(DfuError::NoDfuInterface)
}

/// wTransferSize from the functional descriptor among `extra` descriptors.
fn functional_transfer_size(extra: &[u8]) -> Option<u16> {
    let mut rest = extra;
    while rest.len() >= 2 {
        let len = rest[0] as usize;
        if len < 2 || len > rest.len() {
            return None;
        }
        if rest[1] == FUNCTIONAL_DESCRIPTOR && len >= 7 {
            let size = u16::from_le_bytes([rest[5], rest[6]]);
            return (size > 0).then_some(size);
        }
        rest = &rest[len..];
    }
    None
}

/// One firmware download over an open boot loader.
pub struct Download<'a> {
    transport: &'a mut dyn UsbTransport,
    clock: &'a dyn Clock,
    interface: DfuInterface,
    summary: DownloadSummary,
    budget: Duration,
    deadline: Duration,
}

impl<'a> Download<'a> {
    /// Read the descriptors, find the DFU interface and claim it.
    pub fn open(
        transport: &'a mut dyn UsbTransport,
        clock: &'a dyn Clock,
    ) -> Result<Self, DfuError> {
        let interfaces = transport.interfaces().map_err(|error| DfuError::Usb {
            step: "reading the configuration descriptor".into(),
            error,
        })?;
        let interface = find_dfu_interface(&interfaces)?;
        transport
            .claim_interface(interface.number)
            .map_err(|error| DfuError::Usb {
                step: format!("claiming interface {}", interface.number),
                error,
            })?;
        log::debug!(
            "DFU interface {}, block size {} bytes",
            interface.number,
            interface.transfer_size
        );
        Ok(Download {
            transport,
            clock,
            interface,
            summary: DownloadSummary {
                transfer_size: interface.transfer_size,
                ..DownloadSummary::default()
            },
            budget: DOWNLOAD_DEADLINE,
            deadline: crate::clock::deadline_after(clock, DOWNLOAD_DEADLINE),
        })
    }

    /// Use another deadline for the whole download (from now).
    pub fn with_deadline(mut self, budget: Duration) -> Self {
        self.budget = budget;
        self.deadline = crate::clock::deadline_after(self.clock, budget);
        self
    }

    /// The block size in use.
    pub fn transfer_size(&self) -> u16 {
        self.interface.transfer_size
    }

    /// The whole download: recover, blocks, manifest, read-back. Returns the figures.
    pub fn run(mut self, image: &[u8]) -> Result<DownloadSummary, DfuError> {
        self.recover()?;
        self.download(image)?;
        self.verify(image)?;
        Ok(self.summary)
    }

    /// GETSTATUS first; clear an error or abort a half-done transfer, as
    /// DFU 1.1 allows in each state, and confirm dfuIDLE before downloading.
    fn recover(&mut self) -> Result<(), DfuError> {
        let step = "checking the boot loader's state";
        for poll in 0..MAX_BUSY_POLLS {
            let status = match self.get_status(step) {
                // Asked while busy (an interrupted run left it in dfuDNBUSY
                // or dfuMANIFEST): the stall took it to dfuERROR; ask again.
                Err(DfuError::Usb {
                    error: UsbError::Stall,
                    ..
                }) if poll == 0 => {
                    log::info!("the boot loader stalled its first GETSTATUS; asking again");
                    continue;
                }
                other => other?,
            };
            match status.state {
                state::IDLE if status.status == status::OK => return Ok(()),
                state::ERROR => {
                    log::info!(
                        "boot loader was in dfuERROR ({}); clearing it",
                        status_name(status.status)
                    );
                    self.out(DFU_CLRSTATUS, 0, &[], "CLRSTATUS")?;
                    return self.confirm_idle("clearing dfuERROR (CLRSTATUS)");
                }
                state::DNLOAD_IDLE | state::UPLOAD_IDLE => {
                    log::info!(
                        "boot loader was mid-transfer ({}); aborting it",
                        state_name(status.state)
                    );
                    self.out(DFU_ABORT, 0, &[], "ABORT")?;
                    return self.confirm_idle("aborting the interrupted transfer (ABORT)");
                }
                // Busy with a block or manifesting (an interrupted run): DFU
                // 1.1 allows nothing but GETSTATUS, after bwPollTimeout.
                state::DNBUSY | state::DNLOAD_SYNC | state::MANIFEST | state::MANIFEST_SYNC => {
                    log::info!(
                        "boot loader is still in {} from an interrupted run; waiting",
                        state_name(status.state)
                    );
                    self.pause(status.poll_timeout_ms, step)?;
                }
                _ => {
                    return Err(DfuError::Unexpected {
                        step: step.into(),
                        status,
                    })
                }
            }
        }
        Err(DfuError::Stuck { step: step.into() })
    }

    /// GETSTATUS must now say dfuIDLE, status OK.
    fn confirm_idle(&mut self, step: &str) -> Result<(), DfuError> {
        let status = self.get_status(step)?;
        if status.state == state::IDLE && status.status == status::OK {
            Ok(())
        } else {
            Err(DfuError::Unexpected {
                step: step.into(),
                status,
            })
        }
    }

    /// Wait what the device asked for, capped at [`MAX_POLL_WAIT`], within the deadline.
    fn pause(&mut self, poll_timeout_ms: u32, step: &str) -> Result<(), DfuError> {
        let asked = Duration::from_millis(poll_timeout_ms.into());
        if asked > MAX_POLL_WAIT {
            log::warn!(
                "{step}: the device asks to wait {} s (bwPollTimeout); waiting {} s",
                asked.as_secs_f64(),
                MAX_POLL_WAIT.as_secs_f64()
            );
        }
        let wait = asked.min(MAX_POLL_WAIT);
        if self.clock.now().saturating_add(wait) > self.deadline {
            return Err(self.deadline_passed(step));
        }
        self.clock.sleep(wait);
        Ok(())
    }

    fn deadline_passed(&self, step: &str) -> DfuError {
        DfuError::Deadline {
            step: step.into(),
            budget: self.budget,
        }
    }

    fn check_deadline(&self, step: &str) -> Result<(), DfuError> {
        if self.clock.now() > self.deadline {
            Err(self.deadline_passed(step))
        } else {
            Ok(())
        }
    }

    fn download(&mut self, image: &[u8]) -> Result<(), DfuError> {
        let size = self.interface.transfer_size as usize;
        let blocks = image.len().div_ceil(size);
        log::info!(
            "uploading {} bytes in {blocks} blocks of {size}",
            image.len()
        );
        let mut block: u16 = 0;
        for (i, chunk) in image.chunks(size).enumerate() {
            let step = format!("DNLOAD block {} of {blocks}", i + 1);
            self.out(DFU_DNLOAD, block, chunk, &step)?;
            self.wait_until(state::DNLOAD_IDLE, &step)?;
            block = block.wrapping_add(1);
        }
        let step = "finishing the download (zero-length DNLOAD)";
        self.out(DFU_DNLOAD, block, &[], step)?;
        self.wait_until(state::IDLE, step)
    }

    /// GETSTATUS until `target`, waiting bwPollTimeout while the device is
    /// busy (dfuDNBUSY, dfuDNLOAD-SYNC, manifesting); never waits when it is idle.
    fn wait_until(&mut self, target: u8, step: &str) -> Result<(), DfuError> {
        for _ in 0..MAX_BUSY_POLLS {
            let status = self.get_status(step)?;
            if status.status != status::OK {
                return Err(DfuError::Unexpected {
                    step: step.into(),
                    status,
                });
            }
            match status.state {
                s if s == target => return Ok(()),
                state::DNBUSY | state::DNLOAD_SYNC | state::MANIFEST_SYNC | state::MANIFEST => {
                    self.pause(status.poll_timeout_ms, step)?;
                }
                _ => {
                    return Err(DfuError::Unexpected {
                        step: step.into(),
                        status,
                    })
                }
            }
        }
        Err(DfuError::Stuck { step: step.into() })
    }

    /// Read the image back with UPLOAD and compare. Reads until a short
    /// block, but at most the image length plus one block: a device that
    /// keeps answering full blocks is then sent ABORT (back to dfuIDLE).
    fn verify(&mut self, image: &[u8]) -> Result<(), DfuError> {
        let size = self.interface.transfer_size as usize;
        let max_blocks = image.len() / size + 1;
        let mut read = Vec::with_capacity(max_blocks * size);
        let mut ended = false;
        for block in 0..max_blocks {
            let block = block as u16;
            let mut buf = vec![0u8; size];
            let step = format!("UPLOAD block {block} (read-back)");
            self.check_deadline(&step)?;
            let n = receive(
                &mut *self.transport,
                DFU_UPLOAD,
                block,
                self.interface.number.into(),
                &mut buf,
            )
            .map_err(|error| DfuError::Usb { step, error })?;
            self.summary.upload_requests += 1;
            read.extend_from_slice(&buf[..n.min(size)]);
            if n < size {
                ended = true;
                break;
            }
        }
        if read.len() < image.len() {
            return Err(DfuError::ReadBackShort {
                got: read.len(),
                expected: image.len(),
            });
        }
        if let Some(offset) = image.iter().zip(&read).position(|(a, b)| a != b) {
            return Err(DfuError::ReadBackMismatch { offset });
        }
        if !ended {
            log::debug!(
                "read-back: the device still sends full blocks after {} bytes; ending the upload (ABORT)",
                read.len()
            );
            self.out(DFU_ABORT, 0, &[], "ending the read-back (ABORT)")?;
        }
        log::info!("verified: read back {} bytes, image matches", read.len());
        Ok(())
    }

    fn get_status(&mut self, step: &str) -> Result<DfuStatus, DfuError> {
        self.check_deadline(step)?;
        let mut buf = [0u8; 6];
        let n = receive(
            &mut *self.transport,
            DFU_GETSTATUS,
            0,
            self.interface.number.into(),
            &mut buf,
        )
        .map_err(|error| DfuError::Usb {
            step: format!("{step} (GETSTATUS)"),
            error,
        })?;
        self.summary.getstatus_requests += 1;
        DfuStatus::parse(&buf[..n.min(buf.len())])
            .ok_or_else(|| DfuError::ShortStatus { step: step.into() })
    }

    fn out(&mut self, request: u8, value: u16, data: &[u8], step: &str) -> Result<(), DfuError> {
        self.check_deadline(step)?;
        let sent = send(
            &mut *self.transport,
            request,
            value,
            self.interface.number.into(),
            data,
        )
        .map_err(|error| DfuError::Usb {
            step: step.to_string(),
            error,
        })?;
        if sent != data.len() {
            return Err(DfuError::ShortWrite {
                step: step.to_string(),
                sent,
                expected: data.len(),
            });
        }
        match request {
            DFU_DNLOAD => {
                self.summary.dnload_requests += 1;
                self.summary.bytes += data.len();
            }
            _ => self.summary.other_requests += 1,
        }
        Ok(())
    }
}

/// Ask a ready Coral (application mode) to go back to its boot loader:
/// DFU_DETACH on interface 0; the caller then resets it.
pub fn detach(transport: &mut dyn UsbTransport) -> Result<(), DfuError> {
    transport
        .claim_interface(0)
        .and_then(|_| send(transport, DFU_DETACH, DETACH_TIMEOUT_MS, 0, &[]))
        .map(|_| ())
        .map_err(|error| DfuError::Usb {
            step: "DFU_DETACH".into(),
            error,
        })
}

/// A DFU class request to the interface `index` (host → device), traced at
/// `-vv` as dfu-util's users read it ([`describe_out`]).
fn send(
    transport: &mut dyn UsbTransport,
    request: u8,
    value: u16,
    index: u16,
    data: &[u8],
) -> Result<usize, UsbError> {
    let result = transport.control_out(REQUEST_OUT, request, value, index, data);
    match &result {
        Ok(sent) => log::trace!("{}", describe_out(request, value, *sent)),
        Err(error) => log::trace!("{} failed: {error}", request_name(request, value)),
    }
    result
}

/// A DFU class request from the interface `index` (device → host), traced
/// at `-vv` with what the device answered ([`describe_in`]).
fn receive(
    transport: &mut dyn UsbTransport,
    request: u8,
    value: u16,
    index: u16,
    buf: &mut [u8],
) -> Result<usize, UsbError> {
    let result = transport.control_in(REQUEST_IN, request, value, index, buf);
    match &result {
        Ok(n) => log::trace!(
            "{}",
            describe_in(request, value, &buf[..(*n).min(buf.len())])
        ),
        Err(error) => log::trace!("{} failed: {error}", request_name(request, value)),
    }
    result
}

/// A DFU class request by its name in DFU 1.1 (`DNLOAD block 3`,
/// `GETSTATUS`, …); an unknown one by its number.
pub fn request_name(request: u8, value: u16) -> String {
    match request {
        DFU_DETACH => "DETACH".into(),
        DFU_DNLOAD => format!("DNLOAD block {value}"),
        DFU_UPLOAD => format!("UPLOAD block {value}"),
        DFU_GETSTATUS => "GETSTATUS".into(),
        DFU_CLRSTATUS => "CLRSTATUS".into(),
        DFU_GETSTATE => "GETSTATE".into(),
        DFU_ABORT => "ABORT".into(),
        other => format!("DFU request {other} value {value}"),
    }
}

/// The `-vv` line of a request sent: `DNLOAD block 3: 256 bytes`,
/// `DETACH (wTimeout 100 ms)`, `CLRSTATUS`, `ABORT`.
pub fn describe_out(request: u8, value: u16, sent: usize) -> String {
    match request {
        DFU_DNLOAD => format!("{}: {sent} bytes", request_name(request, value)),
        DFU_DETACH => format!("DETACH (wTimeout {value} ms)"),
        DFU_CLRSTATUS | DFU_ABORT => request_name(request, value),
        _ => format!("{}: {sent} bytes sent", request_name(request, value)),
    }
}

/// The `-vv` line of a request answered: `UPLOAD block 7: 256 bytes`,
/// `GETSTATUS → dfuDNLOAD-IDLE` (with the status when it is not OK and the
/// poll timeout when there is one), `GETSTATE → dfuIDLE`.
pub fn describe_in(request: u8, value: u16, reply: &[u8]) -> String {
    let name = request_name(request, value);
    match request {
        DFU_GETSTATUS => match DfuStatus::parse(reply) {
            Some(status) => {
                let mut line = format!("{name} → {}", state_name(status.state));
                if status.status != status::OK {
                    line.push_str(&format!(", status {}", status_name(status.status)));
                }
                if status.poll_timeout_ms > 0 {
                    line.push_str(&format!(", poll {} ms", status.poll_timeout_ms));
                }
                line
            }
            None => format!("{name}: {}-byte reply, 6 expected", reply.len()),
        },
        DFU_GETSTATE => match reply.first() {
            Some(&state) => format!("{name} → {}", state_name(state)),
            None => format!("{name}: empty reply"),
        },
        _ => format!("{name}: {} bytes", reply.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_named_as_dfu_util_users_read_them() {
        assert_eq!(
            describe_out(DFU_DNLOAD, 3, 256),
            "DNLOAD block 3: 256 bytes"
        );
        assert_eq!(describe_out(DFU_DNLOAD, 43, 0), "DNLOAD block 43: 0 bytes");
        assert_eq!(describe_out(DFU_CLRSTATUS, 0, 0), "CLRSTATUS");
        assert_eq!(describe_out(DFU_ABORT, 0, 0), "ABORT");
        assert_eq!(
            describe_out(DFU_DETACH, DETACH_TIMEOUT_MS, 0),
            "DETACH (wTimeout 100 ms)"
        );
        assert_eq!(
            describe_in(DFU_UPLOAD, 7, &[0; 256]),
            "UPLOAD block 7: 256 bytes"
        );
        assert_eq!(
            describe_in(DFU_GETSTATUS, 0, &[0, 0, 0, 0, state::DNLOAD_IDLE, 0]),
            "GETSTATUS → dfuDNLOAD-IDLE"
        );
        // The status only when it is not OK; the poll timeout only when asked for.
        assert_eq!(
            describe_in(
                DFU_GETSTATUS,
                0,
                &[status::ERR_STALLEDPKT, 0, 0, 0, state::ERROR, 0]
            ),
            "GETSTATUS → dfuERROR, status errSTALLEDPKT"
        );
        assert_eq!(
            describe_in(DFU_GETSTATUS, 0, &[0, 0x2c, 0x01, 0, state::DNBUSY, 0]),
            "GETSTATUS → dfuDNBUSY, poll 300 ms"
        );
        assert_eq!(
            describe_in(DFU_GETSTATUS, 0, &[0, 0, 0]),
            "GETSTATUS: 3-byte reply, 6 expected"
        );
        assert_eq!(
            describe_in(DFU_GETSTATE, 0, &[state::IDLE]),
            "GETSTATE → dfuIDLE"
        );
        assert_eq!(request_name(9, 1), "DFU request 9 value 1");
    }
}
