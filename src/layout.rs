//! The control block: the `#[repr(C)]` root of a channel's shared memory.
//!
//! It sits at offset 0 of the control segment, followed by the ring's cells. Everything
//! in it is either written once before any other process can attach (identity fields) or
//! is an atomic. Only offsets and small ids are stored, never pointers: every process maps
//! the segments at its own addresses.
//!
//! Compatibility rule (as in rust-numpy's shared borrow-checking struct): `magic` and
//! `abi_version` come first and never move; a process refuses a control block whose magic
//! or ABI version differs from its own. Any change to the layout bumps the ABI version
//! (offsets are never read from the header), and `header_size` records how large the block
//! was when created: `validate` refuses a block whose size differs from its own.
use crate::sync::{AtomicI32, AtomicU32, AtomicU64};

pub const MAGIC: u64 = u64::from_le_bytes(*b"TSLBCTL\0");
/// Bumped whenever the layout or the meaning of anything in shared memory changes. Offsets
/// are never read from the header: a process only attaches a control block whose version
/// (and `header_size`) equals its own, so its own struct layout is the layout.
///
/// Version 2: slot generations in owner words, lock words and pending entries; handle
/// totals derived from the slots; `alloc` references counted under the heap lock.
/// Version 3: broadcast and latest-value channels (`FanOut`, `SharedPrefix`).
/// Version 4: `spin_ns`; `SweepState`.
pub const ABI_VERSION: u32 = 4;

/// Process slots: how many processes may use one channel at the same time.
pub const MAX_PROCESSES: usize = 256;
/// Data segments a channel's slab may grow to (sizes double, so this is plenty).
pub const MAX_SEGMENTS: usize = 48;
/// Handles pickled (or inherited through fork) and not yet attached by their new process.
pub const MAX_PENDING: usize = 128;
/// Subscribers a broadcast channel may have at the same time.
pub const MAX_SUBSCRIBERS: usize = 128;
/// Free-list bins of the slab allocator (see `slab::bins`).
pub const BIN_COUNT: usize = 160;
pub const BIN_WORDS: usize = BIN_COUNT.div_ceil(64);

/// A futex-based lock word that records its holder (see `lock.rs`).
#[repr(C)]
pub struct LockWord {
    pub state: AtomicU32,
}

/// The descriptor ring's indices and wake-up words (see `ring.rs`).
#[repr(C)]
pub struct RingState {
    /// Next cell to pop; only changed under the ring lock.
    pub head: AtomicU64,
    /// Next cell to push; only changed under the ring lock.
    pub tail: AtomicU64,
    /// Bumped on every push and on every close; consumers sleep on it.
    pub pushed: AtomicU32,
    /// Bumped on every pop and on every close; producers sleep on it when the ring is full.
    pub popped: AtomicU32,
    pub consumers_waiting: AtomicU32,
    pub producers_waiting: AtomicU32,
}

/// One ring cell: a published message.
#[repr(C)]
pub struct Cell {
    /// `SlabRef` of the message's block.
    pub block: AtomicU64,
    /// Process slot index of the sender, informational only (acknowledgements use the
    /// block header's `origin`, which carries the generation).
    pub origin: AtomicU32,
    pub _reserved: AtomicU32,
}

/// One data segment of the slab, as every process sees it.
#[repr(C)]
pub struct SegmentRecord {
    /// Length in bytes; 0 while the slot is unused. Written under the heap lock before
    /// `HeapState::segment_count` is raised (Release) past this index.
    pub len: AtomicU64,
    pub device: AtomicU64,
    pub inode: AtomicU64,
    /// 1 once no live process holds the segment any more (its creator died before anyone
    /// mapped it): never attached again, its bytes no longer count as mapped.
    pub lost: AtomicU64,
}

/// The slab allocator's shared state; all of it is guarded by the heap lock except the
/// counters documented otherwise.
#[repr(C)]
pub struct HeapState {
    pub segment_count: AtomicU32,
    /// Bumped whenever memory is freed or the slab grows; producers waiting for space sleep on it.
    pub freed: AtomicU32,
    pub space_waiters: AtomicU32,
    /// The process creating a new segment outside the heap lock (a `lock::Holder` word),
    /// 0 when none; set and cleared under the heap lock (see `Slab::allocate`).
    pub growing: AtomicU32,
    /// Set when the free lists must be rebuilt at the next taking of the heap lock (a
    /// segment was found lost by a process that may have held the lock).
    pub needs_rebuild: AtomicU32,
    pub _pad: AtomicU32,
    pub mapped_bytes: AtomicU64,
    pub used_bytes: AtomicU64,
    pub used_blocks: AtomicU64,
    /// Length of the first segment (`slab_bytes`); later ones follow `slab::segment_len`.
    pub next_segment_len: AtomicU64,
    pub bitmap: [AtomicU64; BIN_WORDS],
    pub bins: [AtomicU64; BIN_COUNT],
    pub segments: [SegmentRecord; MAX_SEGMENTS],
}

/// A process using the channel.
#[repr(C)]
pub struct ProcessSlot {
    /// `generation:32 | phase:2 | pid:30` (see `procs`); pid 0 = free. Claimed by CAS.
    pub state: AtomicU64,
    pub start_time: AtomicU64,
    pub senders: AtomicU32,
    pub receivers: AtomicU32,
    /// Messages put by this process whose memory is not yet released.
    pub outstanding: AtomicU64,
    /// Bumped when one of this process's messages is released; `wait_for_all_ack` sleeps on it.
    pub acked: AtomicU32,
    pub ack_waiters: AtomicU32,
    /// Descriptor of the control segment in this process, -1 if none.
    pub control_fd: AtomicI32,
    /// Descriptor of each data segment in this process, -1 if not attached. Others open
    /// `/proc/<pid>/fd/<n>` to attach.
    pub segment_fds: [AtomicI32; MAX_SEGMENTS],
    pub _reserved: [AtomicU64; 4],
}

/// Who holds the channel open. Open handles are counted per slot (`ProcessSlot::senders`,
/// `receivers`) and in the pending cells; totals are sums, never stored (see `procs`).
#[repr(C)]
pub struct HandleState {
    /// Bumped on every close / registration; lets waiters notice changes.
    pub changed: AtomicU32,
    /// One past the highest slot index ever claimed: scans stop there.
    pub slots_used: AtomicU32,
    /// Per side (senders, receivers): pid of the last process reaped while it held
    /// handles on that side, 0 once a handle opens on it again. A side that ends with a
    /// death is reported as `PeerGone` rather than `Closed`.
    pub last_dead: [AtomicU32; 2],
    /// Handles pickled (or inherited through fork) and not yet redeemed by their new
    /// process: `redeeming:1 | token:23 | generation:8 | senders:8 | receivers:8 | slot:16`
    /// (see `procs::pending`); 0 = empty.
    pub pending: [AtomicU64; MAX_PENDING],
}

#[repr(C)]
pub struct ControlBlock {
    pub magic: AtomicU64,
    pub abi_version: AtomicU32,
    pub header_size: AtomicU32,
    pub channel_id: AtomicU64,
    pub capacity: AtomicU32,
    pub flags: AtomicU32,
    /// How long a blocked call spins before sleeping, in nanoseconds (`spin_us=`); written
    /// once at creation, read once per attaching process (and capped there).
    pub spin_ns: AtomicU32,
    pub _reserved0: AtomicU32,
    pub max_slab_bytes: AtomicU64,
    pub control_len: AtomicU64,
    pub ring_lock: LockWord,
    pub heap_lock: LockWord,
    pub ring: RingState,
    pub heap: HeapState,
    pub handles: HandleState,
    pub processes: [ProcessSlot; MAX_PROCESSES],
    pub fan_out: FanOut,
    pub sweep: SweepState,
}

/// The liveness sweep the channel's processes share (see `channel::recovery`): one of
/// them looks for dead peers per interval, whoever claims it first, instead of each of
/// them every interval.
#[repr(C)]
pub struct SweepState {
    /// When the next sweep is due, in milliseconds of `CLOCK_MONOTONIC`; 0 = now. A process
    /// claims a sweep by moving it one interval past its own clock (CAS).
    pub due: AtomicU64,
    /// Sweeps claimed so far, by every process (for `stats()` and the tests).
    pub count: AtomicU64,
}

/// Channel flag: refuse values that would need pickling.
pub const FLAG_STRICT: u32 = 1;
/// Channel flag: a broadcast channel (every subscriber gets every message; see
/// `channel::fanout`).
pub const FLAG_BROADCAST: u32 = 2;
/// Channel flag, with `FLAG_BROADCAST`: the publisher never waits for subscribers, the
/// oldest message gives way.
pub const FLAG_DROP_OLDEST: u32 = 4;
/// Channel flag: a latest-value mailbox (readers see the newest message only).
pub const FLAG_LATEST: u32 = 8;

/// The state of broadcast and latest-value channels (unused by point-to-point ones). The
/// ring holds the *retained* messages: `head..tail` are ring positions (sequence numbers),
/// and a message stays retained until every subscriber has read it (or, with
/// `FLAG_DROP_OLDEST` and in a mailbox, until a newer one needs its cell). Everything here
/// changes under the ring lock.
#[repr(C)]
pub struct FanOut {
    /// Set (before the lock is freed again) when the ring lock was broken because its
    /// holder died: the next holder sweeps for blocks the dead one left unreferenced.
    pub needs_sweep: AtomicU32,
    /// One past the highest subscriber entry ever used: scans stop there.
    pub subscribers_used: AtomicU32,
    pub subscribers: [SubscriberEntry; MAX_SUBSCRIBERS],
    /// Per pending cell (`HandleState::pending`): the subscriber that the pickled
    /// subscriber handle in that cell keeps alive, `token:23 << 40 | generation:31 << 8 |
    /// index` (see `fanout::pin`); stale once the cell no longer holds that token.
    pub pins: [AtomicU64; MAX_PENDING],
}

/// One subscriber of a broadcast channel: its position, shared by every handle of it in
/// every process.
#[repr(C)]
pub struct SubscriberEntry {
    /// `generation:31 | active:1`; 0 (or an even word) = free. A ticket names the
    /// generation, so a reused entry is never taken for the one it was issued for.
    pub state: AtomicU32,
    pub _pad: AtomicU32,
    /// Sequence number of the next message it reads.
    pub cursor: AtomicU64,
    /// Messages it skipped because the publisher dropped them (`FLAG_DROP_OLDEST`).
    pub missed: AtomicU64,
    /// One bit per process slot that has a handle of it open.
    pub holders: [AtomicU64; 4],
}

/// The first 64 bytes of a broadcast or mailbox message's block content (its frame
/// follows): the message's sequence number and which processes hold views of it. The
/// block is freed when it is no longer retained (`seq < head`) and no bit is set.
#[repr(C)]
pub struct SharedPrefix {
    pub seq: AtomicU64,
    /// One bit per process slot holding a view.
    pub holders: [AtomicU64; 4],
    pub _reserved: [AtomicU64; 3],
}

pub const SHARED_PREFIX_LEN: usize = 64;
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<SharedPrefix>() == SHARED_PREFIX_LEN);
const _: () = assert!(MAX_PROCESSES <= 256);

/// Bytes of control segment needed for a ring of `capacity` cells.
pub fn control_len(capacity: usize) -> usize {
    let cells = std::mem::size_of::<Cell>() * capacity;
    (ring_offset() + cells).next_multiple_of(4096)
}

/// Offset of the first ring cell in the control segment.
pub fn ring_offset() -> usize {
    std::mem::size_of::<ControlBlock>().next_multiple_of(64)
}
