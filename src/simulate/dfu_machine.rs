//! The Coral's DFU 1.1 boot loader (1a6e:089a) as a strict state machine,
//! keyed on (request, state) as DFU 1.1 appendix A has it: a request the
//! current state does not allow stalls and leaves it in dfuERROR
//! (errSTALLEDPKT). Writing a block or manifesting takes no time here (no
//! bwPollTimeout): GETSTATUS moves dfuDNLOAD-SYNC to dfuDNLOAD-IDLE and
//! dfuMANIFEST-SYNC to dfuIDLE at once.
//!
//! Both simulated Corals run on it: the `--simulate` host's
//! ([`super::bootloader`]) as it is, and the test kit's adversarial one,
//! which layers its faults (busy states, errors, vanishing, corrupt
//! read-back) around these transitions. No fault knobs live here.

use crate::dfu::{self, state, status};
use crate::usb::UsbError;

/// A class OUT request the machine's current state accepts (DFU 1.1
/// appendix A); the caller carries it out with the methods named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutRequest {
    /// DNLOAD in dfuIDLE or dfuDNLOAD-IDLE: check it with
    /// [`DfuMachine::check_dnload`].
    Dnload,
    /// CLRSTATUS in dfuERROR: back to dfuIDLE ([`DfuMachine::clear_status`]).
    ClrStatus,
    /// ABORT in dfuIDLE, dfuDNLOAD-IDLE or dfuUPLOAD-IDLE ([`DfuMachine::abort`]).
    Abort,
}

/// A well-formed class IN request; the caller answers it with the methods
/// named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InRequest {
    /// GETSTATUS with a 6-byte buffer ([`DfuMachine::sync`], then
    /// [`DfuMachine::status_reply`]).
    GetStatus,
    /// GETSTATE with a 1-byte buffer: reply the `state` field.
    GetState,
    /// UPLOAD: check and answer it with [`DfuMachine::upload`].
    Upload,
}

/// What a DNLOAD the machine accepted carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnloadBlock {
    /// A block of the image, to be stored with [`DfuMachine::store_block`].
    Data,
    /// The zero-length block that ends the download: the machine is now in
    /// dfuMANIFEST-SYNC.
    End,
}

/// The boot loader's DFU state.
#[derive(Clone, Debug)]
pub struct DfuMachine {
    /// bState: one of [`crate::dfu::state`].
    pub state: u8,
    /// bStatus: one of [`crate::dfu::status`].
    pub status: u8,
    transfer_size: u16,
    next_block: u16,
    received: Vec<u8>,
    manifested: bool,
    upload_block: u16,
}

impl DfuMachine {
    /// A boot loader in dfuIDLE, status OK, whose functional descriptor
    /// gives wTransferSize `transfer_size`.
    pub fn idle(transfer_size: u16) -> Self {
        DfuMachine {
            state: state::IDLE,
            status: status::OK,
            transfer_size,
            next_block: 0,
            received: Vec::new(),
            manifested: false,
            upload_block: 0,
        }
    }

    /// Whether a complete download has manifested (a reset now brings up
    /// the ready device).
    pub fn manifested(&self) -> bool {
        self.manifested
    }

    /// Stall: the request is invalid in this state (dfuERROR, errSTALLEDPKT).
    pub fn stall(&mut self) -> UsbError {
        self.fail(status::ERR_STALLEDPKT);
        UsbError::Stall
    }

    /// Enter dfuERROR with bStatus `status`.
    pub fn fail(&mut self, status: u8) {
        self.state = state::ERROR;
        self.status = status;
    }

    /// A class OUT request `request` with `data_len` bytes of data, if the
    /// current state accepts it; otherwise it stalls.
    pub fn accept_out(&mut self, request: u8, data_len: usize) -> Result<OutRequest, UsbError> {
        match (request, self.state) {
            (dfu::DFU_DNLOAD, state::IDLE | state::DNLOAD_IDLE) => Ok(OutRequest::Dnload),
            (dfu::DFU_CLRSTATUS, state::ERROR) if data_len == 0 => Ok(OutRequest::ClrStatus),
            (dfu::DFU_ABORT, state::IDLE | state::DNLOAD_IDLE | state::UPLOAD_IDLE)
                if data_len == 0 =>
            {
                Ok(OutRequest::Abort)
            }
            _ => Err(self.stall()),
        }
    }

    /// A class IN request `request` into a buffer of `buf_len` bytes, if it
    /// is well formed; otherwise it stalls. UPLOAD's state is checked by
    /// [`DfuMachine::upload`].
    pub fn accept_in(&mut self, request: u8, buf_len: usize) -> Result<InRequest, UsbError> {
        match request {
            dfu::DFU_GETSTATUS if buf_len == 6 => Ok(InRequest::GetStatus),
            dfu::DFU_GETSTATE if buf_len == 1 => Ok(InRequest::GetState),
            dfu::DFU_UPLOAD => Ok(InRequest::Upload),
            _ => Err(self.stall()),
        }
    }

    /// DNLOAD of block `block` with `len` bytes: it stalls when the block is
    /// larger than wTransferSize, out of sequence, or a zero-length block
    /// comes before any data; the zero-length block moves to
    /// dfuMANIFEST-SYNC.
    pub fn check_dnload(&mut self, block: u16, len: usize) -> Result<DnloadBlock, UsbError> {
        if len > self.transfer_size as usize || block != self.next_block {
            return Err(self.stall());
        }
        if len == 0 {
            if self.state != state::DNLOAD_IDLE {
                return Err(self.stall());
            }
            self.state = state::MANIFEST_SYNC;
            return Ok(DnloadBlock::End);
        }
        Ok(DnloadBlock::Data)
    }

    /// Store `bytes` as block `block` (checked by
    /// [`DfuMachine::check_dnload`]): a download started in dfuIDLE starts
    /// the image afresh; the machine is then in dfuDNLOAD-SYNC.
    pub fn store_block(&mut self, block: u16, bytes: &[u8]) {
        if self.state == state::IDLE {
            self.received.clear();
        }
        self.received.extend_from_slice(bytes);
        self.next_block = block.wrapping_add(1);
        self.state = state::DNLOAD_SYNC;
    }

    /// DNLOAD of block `block` carrying `data`, taken whole.
    pub fn dnload(&mut self, block: u16, data: &[u8]) -> Result<usize, UsbError> {
        match self.check_dnload(block, data.len())? {
            DnloadBlock::End => Ok(0),
            DnloadBlock::Data => {
                self.store_block(block, data);
                Ok(data.len())
            }
        }
    }

    /// CLRSTATUS: back to dfuIDLE, status OK; a new download starts at block 0.
    pub fn clear_status(&mut self) {
        *self = DfuMachine::idle(self.transfer_size);
    }

    /// ABORT: back to dfuIDLE; an image that manifested stays manifested.
    pub fn abort(&mut self) {
        let manifested = self.manifested;
        self.clear_status();
        self.manifested = manifested;
    }

    /// GETSTATUS's transition: a written block (dfuDNLOAD-SYNC →
    /// dfuDNLOAD-IDLE) or the image manifesting (dfuMANIFEST-SYNC →
    /// dfuIDLE). Returns the image when it has just manifested.
    pub fn sync(&mut self) -> Option<Vec<u8>> {
        match self.state {
            state::DNLOAD_SYNC => {
                self.state = state::DNLOAD_IDLE;
                None
            }
            state::MANIFEST_SYNC => {
                self.state = state::IDLE;
                self.manifested = true;
                self.next_block = 0;
                Some(self.received.clone())
            }
            _ => None,
        }
    }

    /// The six bytes of a GETSTATUS reply: bStatus, bwPollTimeout
    /// (`poll_timeout_ms`, 24 bits), bState, iString 0.
    pub fn status_reply(&self, poll_timeout_ms: u32) -> [u8; 6] {
        let poll = poll_timeout_ms.to_le_bytes();
        [self.status, poll[0], poll[1], poll[2], self.state, 0]
    }

    /// UPLOAD of block `block` into `buf`: it stalls unless it starts a
    /// read-back (block 0 in dfuIDLE) or continues one (the next block in
    /// dfuUPLOAD-IDLE) with at most wTransferSize bytes. `read(offset, buf)`
    /// fills `buf` with the memory at `offset` and says how many bytes it
    /// filled; a short block ends the read-back.
    pub fn upload(
        &mut self,
        block: u16,
        buf: &mut [u8],
        read: impl FnOnce(usize, &mut [u8]) -> Result<usize, UsbError>,
    ) -> Result<usize, UsbError> {
        let starting = self.state == state::IDLE && block == 0;
        let continuing = self.state == state::UPLOAD_IDLE && block == self.upload_block;
        if buf.len() > self.transfer_size as usize || !(starting || continuing) {
            return Err(self.stall());
        }
        let n = read(block as usize * buf.len(), buf)?;
        if n < buf.len() {
            self.state = state::IDLE;
            self.upload_block = 0;
        } else {
            self.state = state::UPLOAD_IDLE;
            self.upload_block = block.wrapping_add(1);
        }
        Ok(n)
    }
}

/// Fill `buf` from `memory` at `offset`, as far as `memory` goes; returns
/// the bytes filled.
pub fn read_memory(memory: &[u8], offset: usize, buf: &mut [u8]) -> usize {
    let start = offset.min(memory.len());
    let n = buf.len().min(memory.len() - start);
    buf[..n].copy_from_slice(&memory[start..start + n]);
    n
}
