//! Reading the value stream. Every read is bounds-checked and returns a decode error on
//! malformed input; nothing here can panic or allocate more than the input justifies.
use super::{Location, Tag, MAX_DEPTH};
use crate::error::{Error, Result};
use crate::slab::SlabRef;

/// A cursor over a value stream.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
    position: usize,
    depth: usize,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader {
            data,
            position: 0,
            depth: 0,
        }
    }

    pub fn position(&self) -> usize {
        self.position
    }

    pub fn is_at_end(&self) -> bool {
        self.position == self.data.len()
    }

    pub fn remaining(&self) -> usize {
        self.data.len() - self.position
    }

    pub fn error(&self, what: impl std::fmt::Display) -> Error {
        Error::Decode(format!("corrupt message at byte {}: {what}", self.position))
    }

    fn truncated(&self, wanted: usize) -> Error {
        self.error(format_args!(
            "needs {wanted} more bytes but only {} remain (truncated?)",
            self.remaining()
        ))
    }

    pub fn take(&mut self, len: usize) -> Result<&'a [u8]> {
        if len > self.remaining() {
            return Err(self.truncated(len));
        }
        let bytes = &self.data[self.position..self.position + len];
        self.position += len;
        Ok(bytes)
    }

    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    pub fn tag(&mut self) -> Result<Tag> {
        let byte = self.u8()?;
        Tag::from_byte(byte).ok_or_else(|| {
            Error::Decode(format!(
                "corrupt message at byte {}: unknown tag {byte:#04x}",
                self.position - 1
            ))
        })
    }

    /// The next tag, without consuming it.
    pub fn peek_tag(&self) -> Result<Tag> {
        self.clone().tag()
    }

    pub fn uvarint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(self.error("varint overflows 64 bits"));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.error("varint longer than 10 bytes"))
    }

    pub fn ivarint(&mut self) -> Result<i64> {
        let raw = self.uvarint()?;
        Ok((raw >> 1) as i64 ^ -((raw & 1) as i64))
    }

    /// A uvarint that must fit `usize`.
    pub fn size(&mut self) -> Result<usize> {
        let value = self.uvarint()?;
        usize::try_from(value)
            .map_err(|_| self.error(format_args!("size {value} does not fit this machine")))
    }

    /// A count of items that each take at least `min_item_len` bytes of stream: refuses
    /// counts the remaining input cannot hold, so corrupt counts cannot force huge
    /// allocations.
    pub fn count(&mut self, min_item_len: usize) -> Result<usize> {
        let count = self.size()?;
        if count.saturating_mul(min_item_len.max(1)) > self.remaining() {
            return Err(self.error(format_args!(
                "{count} items cannot fit in {} bytes",
                self.remaining()
            )));
        }
        Ok(count)
    }

    pub fn f64(&mut self) -> Result<f64> {
        let bytes = self.take(8)?;
        Ok(f64::from_bits(u64::from_le_bytes(
            bytes.try_into().expect("8 bytes"),
        )))
    }

    /// Length-prefixed bytes.
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let len = self.size()?;
        self.take(len)
    }

    pub fn str(&mut self) -> Result<&'a str> {
        let start = self.position;
        let bytes = self.bytes()?;
        std::str::from_utf8(bytes).map_err(|_| {
            Error::Decode(format!(
                "corrupt message at byte {start}: string is not UTF-8"
            ))
        })
    }

    /// A tagged `Str` value.
    pub fn str_value(&mut self) -> Result<&'a str> {
        self.expect(Tag::Str)?;
        self.str()
    }

    pub fn expect(&mut self, wanted: Tag) -> Result<()> {
        let start = self.position;
        let found = self.tag()?;
        if found != wanted {
            return Err(Error::Decode(format!(
                "corrupt message at byte {start}: expected {wanted:?}, found {found:?}"
            )));
        }
        Ok(())
    }

    /// A `Global` value: (module, qualified name).
    pub fn global(&mut self) -> Result<(&'a str, &'a str)> {
        self.expect(Tag::Global)?;
        Ok((self.str()?, self.str()?))
    }

    pub fn location(&mut self) -> Result<Location> {
        Ok(Location {
            block: self.uvarint()?,
            offset: self.uvarint()?,
            nbytes: self.uvarint()?,
        })
    }

    /// Enters a nested value; refuses nesting deeper than [`MAX_DEPTH`].
    pub fn enter(&mut self) -> Result<()> {
        if self.depth >= MAX_DEPTH {
            return Err(self.error(format_args!("values nested deeper than {MAX_DEPTH}")));
        }
        self.depth += 1;
        Ok(())
    }

    pub fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }
}

/// Checks that `location` lies inside a payload area of `area_len` bytes and returns its
/// byte range there.
pub fn payload_range(location: Location, area_len: u64) -> Result<std::ops::Range<usize>> {
    let end = location.offset.checked_add(location.nbytes);
    match end {
        Some(end) if end <= area_len => Ok(location.offset as usize..end as usize),
        _ => Err(Error::Decode(format!(
            "corrupt message: payload at offset {} of {} bytes lies outside its {area_len}-byte area",
            location.offset, location.nbytes
        ))),
    }
}

/// Reads the `alloc` block list that opens a value stream.
pub fn read_buffers(input: &mut Reader<'_>) -> Result<Vec<SlabRef>> {
    let count = input.count(1)?;
    let mut blocks = Vec::with_capacity(count);
    for _ in 0..count {
        let link = input.uvarint()?;
        blocks.push(SlabRef::from_link(link).ok_or_else(|| input.error("alloc block 0"))?);
    }
    Ok(blocks)
}

/// The `alloc` blocks a complete frame holds (what releasing it must release too).
pub fn frame_buffers(frame: &[u8]) -> Result<Vec<SlabRef>> {
    let header = super::FrameHeader::read(frame)?;
    read_buffers(&mut Reader::new(header.stream(frame)))
}

/// `frame_buffers` for the slab's recounting (`slab::BuffersOf`): bytes that are no frame
/// (corrupt, or still being written) reference nothing.
pub fn frame_buffer_refs(frame: &[u8]) -> Vec<SlabRef> {
    frame_buffers(frame).unwrap_or_default()
}
