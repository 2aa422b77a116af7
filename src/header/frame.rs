//! The 32-byte frame prefix (see the module docs of `header` for the layout).
use super::MAX_BYTES;
use crate::error::{Error, Result};

pub const FRAME_MAGIC: [u8; 4] = *b"TSLF";
/// Bumped when the value stream changes incompatibly (new tags are compatible).
pub const FORMAT_VERSION: u16 = 1;
pub const PREFIX_LEN: usize = 32;
/// Payloads start on this boundary (cache lines; SIMD loads never straddle two).
pub const PAYLOAD_ALIGN: usize = 64;
/// Frame flag: the value stream holds a pickle (refused by `loads` unless allowed).
pub const FLAG_PICKLE: u16 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub flags: u16,
    pub header_len: u32,
    pub array_count: u32,
    pub payload_offset: u64,
    pub frame_len: u64,
}

/// Rounds a payload offset up to [`PAYLOAD_ALIGN`]; `None` on overflow.
pub fn align_payload(offset: usize) -> Option<usize> {
    offset.checked_next_multiple_of(PAYLOAD_ALIGN)
}

impl FrameHeader {
    /// A frame for a value stream of `header_len` bytes and `payload_len` bytes of payload
    /// area. `None` when the sizes do not fit the format (a stream or array count past
    /// `u32`), or the frame would be larger than [`MAX_BYTES`], more than any block or
    /// `bytes` object can hold.
    pub fn new(
        flags: u16,
        header_len: usize,
        array_count: usize,
        payload_len: usize,
    ) -> Option<FrameHeader> {
        let payload_offset = align_payload(PREFIX_LEN.checked_add(header_len)?)?;
        let frame_len = payload_offset.checked_add(payload_len)?;
        if frame_len > MAX_BYTES {
            return None;
        }
        Some(FrameHeader {
            flags,
            header_len: u32::try_from(header_len).ok()?,
            array_count: u32::try_from(array_count).ok()?,
            payload_offset: payload_offset as u64,
            frame_len: frame_len as u64,
        })
    }

    pub fn to_bytes(&self) -> [u8; PREFIX_LEN] {
        let mut out = [0u8; PREFIX_LEN];
        out[0..4].copy_from_slice(&FRAME_MAGIC);
        out[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..12].copy_from_slice(&self.header_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.array_count.to_le_bytes());
        out[16..24].copy_from_slice(&self.payload_offset.to_le_bytes());
        out[24..32].copy_from_slice(&self.frame_len.to_le_bytes());
        out
    }

    /// Parses and checks the prefix of `frame` (all of the frame's bytes).
    pub fn read(frame: &[u8]) -> Result<FrameHeader> {
        let prefix = frame
            .first_chunk::<PREFIX_LEN>()
            .ok_or_else(|| too_short(frame.len()))?;
        FrameHeader::parse(prefix, frame.len())
    }

    /// Reads the frame of `len` bytes at `frame`, in memory that other processes may write
    /// to while this runs: checks its prefix and copies its value stream to private memory
    /// (the bytes at `PREFIX_LEN..PREFIX_LEN + header_len`), each byte read exactly once.
    /// Decoding that copy, a process writing into the frame meanwhile (a corrupt peer, or
    /// any holder of a writable view) cannot make the decoder read one field as two values
    /// or see a length change after it was checked. The payload area is not copied:
    /// payloads are located through the checked copy and are only ever copied or viewed.
    ///
    /// # Safety
    /// `frame` must be valid for reads of `len` bytes for the duration of the call.
    pub unsafe fn copy_from_shared(frame: *const u8, len: usize) -> Result<(FrameHeader, Vec<u8>)> {
        if len < PREFIX_LEN {
            return Err(too_short(len));
        }
        let mut prefix = [0u8; PREFIX_LEN];
        // SAFETY: the caller guarantees `len` >= PREFIX_LEN readable bytes at `frame`.
        unsafe { std::ptr::copy_nonoverlapping(frame, prefix.as_mut_ptr(), PREFIX_LEN) };
        let header = FrameHeader::parse(&prefix, len)?;
        // `parse` checked PREFIX_LEN + header_len <= payload_offset <= len.
        let stream_len = header.header_len as usize;
        let mut stream = vec![0u8; stream_len];
        // SAFETY: `PREFIX_LEN + stream_len <= len` bytes are readable at `frame` (above);
        // `stream` is a fresh private buffer of `stream_len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(frame.add(PREFIX_LEN), stream.as_mut_ptr(), stream_len)
        };
        Ok((header, stream))
    }

    /// Checks the prefix of a frame of `frame_len` bytes.
    fn parse(prefix: &[u8; PREFIX_LEN], frame_len: usize) -> Result<FrameHeader> {
        let bad = |what: &str| Error::Decode(format!("not a tensorslab frame: {what}"));
        if prefix[0..4] != FRAME_MAGIC {
            return Err(bad("wrong magic"));
        }
        let u16_at = |at: usize| u16::from_le_bytes([prefix[at], prefix[at + 1]]);
        let u32_at =
            |at: usize| u32::from_le_bytes(prefix[at..at + 4].try_into().expect("4 bytes"));
        let u64_at =
            |at: usize| u64::from_le_bytes(prefix[at..at + 8].try_into().expect("8 bytes"));
        let version = u16_at(4);
        if version != FORMAT_VERSION {
            return Err(Error::Decode(format!(
                "frame format version {version} is not supported (this tensorslab reads version {FORMAT_VERSION})"
            )));
        }
        let header = FrameHeader {
            flags: u16_at(6),
            header_len: u32_at(8),
            array_count: u32_at(12),
            payload_offset: u64_at(16),
            frame_len: u64_at(24),
        };
        let stream_end = PREFIX_LEN as u64 + u64::from(header.header_len);
        if header.frame_len != frame_len as u64 {
            return Err(bad(&format!(
                "frame says {} bytes but {frame_len} were given (truncated?)",
                header.frame_len
            )));
        }
        if header.payload_offset < stream_end
            || header.payload_offset > header.frame_len
            || header.payload_offset % PAYLOAD_ALIGN as u64 != 0
        {
            return Err(bad("payload area out of bounds"));
        }
        Ok(header)
    }

    /// The value stream inside `frame` (already checked by `read`).
    pub fn stream<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        &frame[PREFIX_LEN..PREFIX_LEN + self.header_len as usize]
    }

    pub fn payload_len(&self) -> u64 {
        self.frame_len - self.payload_offset
    }
}

fn too_short(len: usize) -> Error {
    Error::Decode(format!(
        "not a tensorslab frame: {len} bytes is shorter than the {PREFIX_LEN}-byte prefix"
    ))
}
