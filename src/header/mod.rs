//! The message wire format: how a Python value and its arrays are laid out in one frame.
//!
//! This module owns the byte format and nothing else: it knows tags, varints and bounds, but
//! not Python. The binding walks Python objects and drives [`Writer`]; it reads frames back
//! through [`Reader`], which checks every length against the bytes it was given and never
//! panics, whatever those bytes are (`tests.rs` feeds it random input).
//!
//! # Frame
//!
//! A message is one frame: in a slab block for a channel, or a `bytes` object for
//! `tensorslab.dumps`. All integers are little-endian.
//!
//! ```text
//! offset  size  field
//!      0     4  magic            b"TSLF"
//!      4     2  format version   FORMAT_VERSION
//!      6     2  flags            bit 0: the value stream holds a pickle
//!      8     4  header_len       bytes of value stream, starting at offset 32
//!     12     4  array_count      arrays in the value stream (sizes the back-reference table)
//!     16     8  payload_offset   start of the payload area, a multiple of 64
//!     24     8  frame_len        total length
//!     32     …  value stream     one value (see below)
//!      …     …  payload area     array and large-bytes payloads, each 64-byte aligned
//! ```
//!
//! A *location* names payload bytes: `uvarint block, uvarint offset, uvarint nbytes`.
//! `block == 0` is this frame's payload area (offset relative to `payload_offset`); any
//! other value is `SlabRef + 1` of a separate slab block holding a `Sender.alloc` buffer
//! (offset relative to that block's content). Readers bounds-check both.
//!
//! # Value stream
//!
//! The stream opens with the `alloc` blocks the frame holds one reference to each
//! (`uvarint count`, then `count` × uvarint `SlabRef + 1`), so a receiver knows every block
//! it must release before it decodes anything, even if decoding then fails. One value
//! follows: the message.
//!
//! A value is a tag byte ([`Tag`]) followed by its body. `uvarint` is unsigned LEB128;
//! `ivarint` is zigzag LEB128; `str` is `uvarint length` + UTF-8; `count` is a uvarint
//! number of items, each a value unless said otherwise.
//!
//! | tag | body |
//! |---|---|
//! | `None`, `False`, `True`, `Ellipsis` | — |
//! | `Int` | ivarint (fits `i64`) |
//! | `BigInt` | uvarint length + two's-complement little-endian bytes |
//! | `Float` | 8 bytes (`f64` bits: NaN payloads and `-0.0` kept) |
//! | `Complex` | 16 bytes (real, imaginary) |
//! | `Str` | str |
//! | `StrSurrogates` | uvarint length + UTF-8 with surrogates (`surrogatepass`) |
//! | `Bytes`, `ByteArray` | uvarint length + bytes |
//! | `BytesPayload` | u8 (0 bytes, 1 bytearray) + location |
//! | `Tuple`, `List`, `Set`, `FrozenSet` | count + items |
//! | `Dict` | count + key, value pairs (insertion order) |
//! | `OrderedDict`, `Counter` | as `Dict` |
//! | `DefaultDict` | factory value (`None` or `Global`) + as `Dict` |
//! | `Global` | str module + str qualified name (a class or function, found as pickle does) |
//! | `NamedTuple` | `Global` value + count + fields |
//! | `Dataclass` | `Global` value + count + (str name, value) pairs |
//! | `Enum` | `Global` value + str member name |
//! | `Array` | u8 kind ([`ArrayKind`]) + u8 flags (bit 0 `requires_grad`) + dtype value + uvarint ndim + ndim × uvarint dims + location; C-contiguous |
//! | `ArrayRef` | uvarint index: the same array object again (its n-th `Array`) |
//! | `NumpyDtype` | dtype value |
//! | `NumpyScalar` | dtype value + uvarint length + raw item bytes |
//! | `TorchDtype`, `TorchDevice` | str (`"bfloat16"`, `"cpu"`) |
//! | `TorchSize` | count + ivarint dims |
//! | `Slice`, `Range` | start, stop, step values |
//! | `Datetime` | ivarint year, u8 month, day, hour, minute, second, uvarint µs, u8 fold, tzinfo value |
//! | `Date` | ivarint year, u8 month, day |
//! | `Time` | u8 hour, minute, second, uvarint µs, u8 fold, tzinfo value |
//! | `Timedelta` | ivarint days, seconds, µs |
//! | `Timezone` | `Timedelta` value + name value (`None` or `Str`) |
//! | `ZoneInfo` | str key |
//! | `Decimal` | str |
//! | `Uuid` | 16 bytes |
//! | `Pickle` | u8 (0 inline: uvarint length + bytes; 1 payload: location) + count + locations of out-of-band buffers |
//!
//! A *dtype value* is a `Str` for NumPy dtypes without fields or subarrays (`dtype.str`,
//! e.g. `"<f4"`, `"<M8[ns]"`) and for torch dtypes (`"bfloat16"`); a structured dtype is
//! `Tuple("struct", names, formats, offsets, itemsize)` and a subarray dtype
//! `Tuple("sub", base, shape)`, with nested dtype values.
//!
//! # Compatibility
//!
//! Tags are never renumbered; new types get new tags. A reader meeting an unknown tag or a
//! newer [`FORMAT_VERSION`] fails with a decode error, never guesses.
mod decode;
mod encode;
mod frame;
mod sizes;
pub mod value;

pub use decode::{frame_buffer_refs, frame_buffers, payload_range, read_buffers, Reader};
pub use encode::{Writer, FIXED_VARINT_LEN};
pub use frame::{
    align_payload, FrameHeader, FLAG_PICKLE, FORMAT_VERSION, FRAME_MAGIC, PAYLOAD_ALIGN, PREFIX_LEN,
};
pub use sizes::{
    array_nbytes, byte_strides, contiguous_strides, describe_unaddressable, python_shape,
    strided_span, MAX_BYTES,
};

/// Deepest nesting accepted, in both directions: deeper input is refused, not recursed, so a
/// hostile frame cannot overflow the stack. (The encoder pickles subtrees deeper than this.)
pub const MAX_DEPTH: usize = 128;

macro_rules! tags {
    ($($name:ident = $value:literal,)*) => {
        /// What follows in the value stream. The numbers are part of the wire format.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        pub enum Tag { $($name = $value,)* }

        impl Tag {
            pub fn from_byte(byte: u8) -> Option<Tag> {
                match byte {
                    $($value => Some(Tag::$name),)*
                    _ => None,
                }
            }
        }
    };
}

tags! {
    None = 0x00,
    False = 0x01,
    True = 0x02,
    Int = 0x03,
    BigInt = 0x04,
    Float = 0x05,
    Complex = 0x06,
    Str = 0x07,
    StrSurrogates = 0x08,
    Bytes = 0x09,
    ByteArray = 0x0a,
    BytesPayload = 0x0b,
    Ellipsis = 0x0c,
    Tuple = 0x10,
    List = 0x11,
    Dict = 0x12,
    Set = 0x13,
    FrozenSet = 0x14,
    OrderedDict = 0x15,
    DefaultDict = 0x16,
    Counter = 0x17,
    Global = 0x18,
    NamedTuple = 0x19,
    Dataclass = 0x1a,
    Enum = 0x1b,
    Array = 0x20,
    ArrayRef = 0x21,
    NumpyDtype = 0x22,
    NumpyScalar = 0x23,
    TorchDtype = 0x24,
    TorchSize = 0x25,
    TorchDevice = 0x26,
    Slice = 0x28,
    Range = 0x29,
    Datetime = 0x30,
    Date = 0x31,
    Time = 0x32,
    Timedelta = 0x33,
    Timezone = 0x34,
    ZoneInfo = 0x35,
    Decimal = 0x36,
    Uuid = 0x37,
    Pickle = 0x40,
}

/// What an `Array` becomes on arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ArrayKind {
    Numpy = 0,
    Torch = 1,
    /// A `torch.nn.Parameter`.
    Parameter = 2,
}

impl ArrayKind {
    pub fn from_byte(byte: u8) -> Option<ArrayKind> {
        match byte {
            0 => Some(ArrayKind::Numpy),
            1 => Some(ArrayKind::Torch),
            2 => Some(ArrayKind::Parameter),
            _ => None,
        }
    }
}

/// `Array` flag: the tensor requires grad.
pub const ARRAY_REQUIRES_GRAD: u8 = 1;

/// Where payload bytes live (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// 0: this frame's payload area; otherwise `SlabRef + 1` of an `alloc` block.
    pub block: u64,
    pub offset: u64,
    pub nbytes: u64,
}

#[cfg(test)]
mod tests;
