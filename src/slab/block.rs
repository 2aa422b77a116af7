//! Block headers and references into the slab.
//!
//! Every block (free or used) starts with a 64-byte [`BlockHeader`]; the frame or the
//! `alloc` buffer follows at +64, so payloads stay 64-byte aligned. The header's first word
//! holds the size and the state together, so each transition (split, merge, allocate,
//! free) is one store: a walk of the segment by sizes stays consistent even if a process
//! dies in the middle of the allocator (the free lists are derived and can be rebuilt).
use crate::layout::MAX_SEGMENTS;
use crate::procs::SlotId;
use crate::sync::{AtomicU32, AtomicU64};

pub const HEADER_LEN: usize = 64;
/// Smallest block: a header plus one cache line.
pub const MIN_BLOCK: usize = 128;
const STATE_MASK: u64 = 63;
pub const STATE_FREE: u64 = 0;
pub const STATE_USED: u64 = 1;
const OFFSET_BITS: u32 = 40;
const CHECK_SALT: u64 = 0x7e45_0a5b_5eed_c0de;

/// Owner kinds recorded in `BlockHeader::owner` (for crash recovery; see `slab::refs`).
pub const OWNER_SENDER: u64 = 1;
pub const OWNER_QUEUED: u64 = 2;
pub const OWNER_RECEIVER: u64 = 3;
pub const OWNER_ALLOC: u64 = 4;
/// An `alloc` buffer whose creator let go of it (or died): only messages still hold it.
pub const OWNER_ORPHAN: u64 = 5;
/// A broadcast or mailbox message: held by the ring while retained and by the processes
/// its `SharedPrefix` names (see `channel::fanout`); the slot is its publisher's.
pub const OWNER_SHARED: u64 = 6;

/// `kind:16 | generation:32 | slot:16`: the kind of holder and its tenure (`SlotId`), so a
/// reused slot never inherits the blocks of the process that held it before.
pub fn owner_word(kind: u64, slot: SlotId) -> u64 {
    kind << 48 | slot.pack()
}

pub fn owner_kind(word: u64) -> u64 {
    word >> 48
}

pub fn owner_slot(word: u64) -> SlotId {
    SlotId::unpack(word & ((1 << 48) - 1))
}

#[repr(C)]
pub struct BlockHeader {
    /// `size | state`; size includes this header and is a multiple of 64.
    pub size_state: AtomicU64,
    /// Size of the block physically before this one (0 for the first). Derived data.
    pub prev_size: AtomicU64,
    /// Free-list links while free: `SlabRef + 1`, 0 = none.
    pub next_free: AtomicU64,
    pub prev_free: AtomicU64,
    /// Holders of a used `alloc` block: `CREATOR` bit plus one per complete message
    /// referencing it (see `slab::refs`); 1 for a message block.
    pub refs: AtomicU32,
    /// `generation:16 | slot:16` of the process that allocated the block (acknowledgements
    /// are counted there).
    pub origin: AtomicU32,
    /// `owner_word`: who is responsible for the block now.
    pub owner: AtomicU64,
    /// `SlabRef ^ salt` while used: proves a reference read from shared memory is a block.
    pub check: AtomicU64,
    /// Bytes in use after the header (frame length, or the `alloc` buffer length).
    pub content_len: AtomicU64,
}

// Not under loom: its atomics are handles into the model, larger than the words they stand
// for, and no shared memory is laid out with them.
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<BlockHeader>() == HEADER_LEN);

pub fn pack(size: usize, state: u64) -> u64 {
    debug_assert!(size % HEADER_LEN == 0 && state <= STATE_MASK);
    size as u64 | state
}

pub fn unpack(word: u64) -> (usize, u64) {
    ((word & !STATE_MASK) as usize, word & STATE_MASK)
}

/// A block's position: `segment << 40 | offset`. Only these cross process boundaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlabRef(pub u64);

impl SlabRef {
    pub fn new(segment: usize, offset: usize) -> SlabRef {
        debug_assert!(segment < MAX_SEGMENTS && (offset as u64) < (1 << OFFSET_BITS));
        SlabRef((segment as u64) << OFFSET_BITS | offset as u64)
    }

    pub fn segment(self) -> usize {
        (self.0 >> OFFSET_BITS) as usize
    }

    pub fn offset(self) -> usize {
        (self.0 & ((1 << OFFSET_BITS) - 1)) as usize
    }

    pub fn check_word(self) -> u64 {
        self.0 ^ CHECK_SALT
    }

    /// Encoding for a free-list link, where 0 means "none".
    pub fn link(self) -> u64 {
        self.0 + 1
    }

    pub fn from_link(link: u64) -> Option<SlabRef> {
        link.checked_sub(1).map(SlabRef)
    }
}
