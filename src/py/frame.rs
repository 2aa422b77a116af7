//! Assembling a frame from an encoded message: prefix, the `alloc` block list, the value
//! stream, then the payloads. Shared by `put` (into a slab block) and `dumps` (into bytes).
use pyo3::prelude::*;

use super::encode::{copy_payloads, Encoded};
use crate::error::Error;
use crate::header::{FrameHeader, Writer, MAX_BYTES, PREFIX_LEN};

pub struct Frame {
    pub header: FrameHeader,
    /// The opening of the value stream: the `alloc` blocks the frame holds.
    prelude: Writer,
}

impl Frame {
    pub fn plan(encoded: &Encoded) -> PyResult<Frame> {
        let mut prelude = Writer::new();
        prelude.uvarint(encoded.buffers.len() as u64);
        for lease in &encoded.buffers {
            prelude.uvarint(lease.block().link());
        }
        // Saturating: a sum past `usize` (two vectors' lengths cannot reach it) would be
        // refused below as too long a stream.
        let stream_len = prelude.len().saturating_add(encoded.stream.len());
        let header = FrameHeader::new(
            encoded.flags,
            stream_len,
            encoded.array_count as usize,
            encoded.payload_len,
        )
        .ok_or_else(|| {
            if u32::try_from(stream_len).is_err() {
                Error::InvalidArgument(format!(
                    "message header of {stream_len} bytes is larger than the {} bytes the \
                     format allows",
                    u32::MAX
                ))
            } else {
                Error::InvalidArgument(format!(
                    "message of {stream_len} header bytes and {} bytes of payload is larger \
                     than the {MAX_BYTES} bytes one message can hold",
                    encoded.payload_len
                ))
            }
        })?;
        Ok(Frame { header, prelude })
    }

    /// At most `MAX_BYTES` (`FrameHeader::new`), so it fits in `usize` and `isize`.
    pub fn len(&self) -> usize {
        self.header.frame_len as usize
    }

    /// Writes the whole frame at `destination`, placing the payloads for that address
    /// when `placed` (shared memory), packed otherwise (`dumps`).
    ///
    /// # Safety
    /// `destination` must be writable for `self.len()` bytes and must not overlap any
    /// payload source; the payload sources must be alive.
    pub unsafe fn write(&self, encoded: &mut Encoded, destination: *mut u8, placed: bool) {
        let area = destination as usize + self.header.payload_offset as usize;
        encoded.place(placed.then_some(area));
        let prefix = self.header.to_bytes();
        let mut at = 0;
        for part in [
            &prefix[..],
            self.prelude.as_bytes(),
            encoded.stream.as_bytes(),
        ] {
            // SAFETY: prefix + stream end before `payload_offset` <= `len()` (FrameHeader::new).
            unsafe {
                std::ptr::copy_nonoverlapping(part.as_ptr(), destination.add(at), part.len())
            };
            at += part.len();
        }
        debug_assert_eq!(at, PREFIX_LEN + self.header.header_len as usize);
        // SAFETY: the payload area spans `payload_offset..len()`, as laid out by the encoder.
        unsafe {
            copy_payloads(
                &encoded.payloads,
                destination.add(self.header.payload_offset as usize),
            )
        };
    }
}
