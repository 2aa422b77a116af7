//! Writing the value stream. Infallible: every size is known to the caller, and the
//! binding decides what is encodable before it writes.
use super::{Location, Tag};

/// Bytes of a fixed-width uvarint: enough for any `u64`.
pub const FIXED_VARINT_LEN: usize = 10;

fn fixed_varint(mut value: u64) -> [u8; FIXED_VARINT_LEN] {
    let mut out = [0x80u8; FIXED_VARINT_LEN];
    for byte in out.iter_mut() {
        *byte |= (value & 0x7f) as u8;
        value >>= 7;
    }
    out[FIXED_VARINT_LEN - 1] &= 0x7f;
    out
}

/// A growing value stream. Reused between messages (`clear`) so a steady state of `put`
/// allocates nothing here.
#[derive(Default, Debug)]
pub struct Writer {
    buffer: Vec<u8>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }

    /// An empty writer with room for `capacity` bytes (one allocation for a small message,
    /// not one per doubling).
    pub fn with_capacity(capacity: usize) -> Writer {
        Writer {
            buffer: Vec::with_capacity(capacity),
        }
    }

    pub fn clear(&mut self) {
        self.buffer.clear();
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buffer
    }

    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    /// Cuts the stream back to `len` bytes (undoing a value whose encoding failed).
    pub fn truncate(&mut self, len: usize) {
        self.buffer.truncate(len);
    }

    pub fn tag(&mut self, tag: Tag) {
        self.buffer.push(tag as u8);
    }

    pub fn u8(&mut self, value: u8) {
        self.buffer.push(value);
    }

    pub fn uvarint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.buffer.push(value as u8 | 0x80);
            value >>= 7;
        }
        self.buffer.push(value as u8);
    }

    /// A uvarint in exactly [`FIXED_VARINT_LEN`] bytes (redundant continuation bytes are
    /// valid LEB128), so it can be rewritten in place with [`Writer::patch_uvarint_fixed`]
    /// without moving what follows. Returns its position.
    pub fn uvarint_fixed(&mut self, value: u64) -> usize {
        let at = self.buffer.len();
        self.buffer.extend_from_slice(&fixed_varint(value));
        at
    }

    /// Rewrites the fixed-width uvarint written at `at`.
    pub fn patch_uvarint_fixed(&mut self, at: usize, value: u64) {
        self.buffer[at..at + FIXED_VARINT_LEN].copy_from_slice(&fixed_varint(value));
    }

    pub fn ivarint(&mut self, value: i64) {
        self.uvarint(((value << 1) ^ (value >> 63)) as u64);
    }

    pub fn f64(&mut self, value: f64) {
        self.buffer
            .extend_from_slice(&value.to_bits().to_le_bytes());
    }

    pub fn raw(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Length-prefixed bytes.
    pub fn bytes(&mut self, bytes: &[u8]) {
        self.uvarint(bytes.len() as u64);
        self.raw(bytes);
    }

    pub fn str(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }

    /// A tagged string value.
    pub fn str_value(&mut self, text: &str) {
        self.tag(Tag::Str);
        self.str(text);
    }

    pub fn location(&mut self, location: Location) {
        self.uvarint(location.block);
        self.uvarint(location.offset);
        self.uvarint(location.nbytes);
    }

    /// A `Global` value: a class or function named by module and qualified name.
    pub fn global(&mut self, module: &str, qualname: &str) {
        self.tag(Tag::Global);
        self.str(module);
        self.str(qualname);
    }
}
