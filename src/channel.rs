//! A channel in pure Rust: creating and attaching its shared memory, the handles that keep
//! it open, and the blocking put/get protocol. The binding only converts values.
//!
//! A message's life: `begin_put` allocates one slab block (waiting for memory if needed),
//! the caller writes the frame into it, `publish` pushes its reference onto the ring,
//! `receive` pops it (exactly one consumer), and `release_message` frees the block when the
//! receiver's last view is gone, counting the acknowledgement for the sender.
//!
//! Sending is in `send.rs`, receiving in `receive.rs`, crash recovery in `recovery.rs`,
//! error texts and statistics in `report.rs`.

mod fanout;
#[cfg(not(loom))]
mod readiness;
mod receive;
mod recovery;
mod registry;
mod report;
mod send;
mod ticket;
mod watcher;

pub use fanout::{Kind, SubscriberId};
#[cfg(not(loom))]
pub use readiness::{Direction, Readiness};
pub use registry::{after_fork_in_child, after_fork_in_parent, before_fork};
pub use ticket::Ticket;

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::layout::{self, Cell, ControlBlock, ABI_VERSION, FLAG_STRICT, MAGIC};
use crate::procs::Side;
use crate::ring::{Entry, Ring};
pub(crate) use crate::shm::random_u64;
use crate::shm::{current_pid, format_bytes, Backing, FileIdentity, ProcessId, Segment};
use crate::slab::block::{owner_word, OWNER_ALLOC, OWNER_QUEUED, OWNER_RECEIVER, OWNER_SENDER};
use crate::slab::{origin_word, Allocation, Slab, SlabRef};
use crate::sync::{AtomicU32, AtomicU64, Ordering};
use crate::wait::{call_scope, futex_wait, futex_wake, Deadline, Interrupt, TimeoutKind};
use std::sync::atomic::AtomicBool;

/// Most messages a ring may queue.
const MAX_CAPACITY: usize = 1 << 20;
/// Smallest slab segment created when the user gives no `slab_bytes`.
const DEFAULT_FIRST_SEGMENT: u64 = 4 << 20;
/// Share of the available memory a channel may map when `max_slab_bytes` is not given.
const DEFAULT_MAX_SHARE: f64 = 0.5;
/// How often the channel's processes, between them, sweep for peers that died (see
/// `recovery`).
const REAP_INTERVAL: Duration = Duration::from_millis(100);
/// Longest wait for a peer to map a segment this process just created (see
/// `Channel::wait_until_held_elsewhere`).
const HELD_ELSEWHERE_WAIT: Duration = Duration::from_secs(2);
/// How long a consumer spins on an empty ring, or a producer on a full one, before sleeping
/// (latency against CPU; see `Channel::spin`).
pub const SPIN: Duration = Duration::from_micros(20);
/// The longest spin a channel may ask for (`spin_us=`): a second.
pub const MAX_SPIN: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct ChannelOptions {
    pub capacity: usize,
    pub slab_bytes: Option<u64>,
    pub max_slab_bytes: Option<u64>,
    pub strict: bool,
    pub kind: Kind,
    /// How long a blocked get or put spins before sleeping (see `Channel::spin`).
    pub spin: Duration,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        ChannelOptions {
            capacity: 64,
            slab_bytes: None,
            max_slab_bytes: None,
            strict: false,
            kind: Kind::Channel,
            spin: SPIN,
        }
    }
}

/// One process's attachment to a channel, shared by all its handles and views.
pub struct Channel {
    slab: Slab,
    id: u64,
    control_len: usize,
    /// Ring cells, read once when attaching and checked against the control segment's
    /// length (see `validate`): the word in shared memory is never used to index again.
    capacity: usize,
    /// Handles open in this process, per side (what a fork child inherits).
    local: [AtomicU32; 2],
    /// The process this attachment belongs to; a fork child re-registers and updates it.
    pid: AtomicU32,
    /// Pending entry created for a fork in progress (see `registry`).
    fork_pending: AtomicU64,
    /// In a fork child: whether every inherited handle counts here (a bare `os.fork`), or
    /// only those handed to the new process and those it uses (see `registry`).
    counts_inherited: AtomicBool,
    /// Set when a reap this process runs could not finish (a lock wait reached its call's
    /// deadline): its next chance to sweep resumes it, claimed or not (see `recovery`).
    reap_unfinished: AtomicBool,
    /// The due time this process set when it last claimed the channel's sweep: while the
    /// shared due time still reads it, this process is the sweeper (see `recovery`).
    claimed_due: AtomicU64,
    /// Per segment: seen mapped by another live process (see `wait_until_held_elsewhere`).
    held_elsewhere: Vec<AtomicBool>,
    /// How long a blocked call spins before sleeping (`ControlBlock::spin_ns`).
    spin: Duration,
    /// Releases that found the heap lock taken (see `receive::Deferred`).
    deferred: std::sync::Mutex<Vec<receive::Deferred>>,
    /// This process's holds on broadcast and mailbox messages and subscribers.
    holds: fanout::HoldsLock,
}

/// A message taken from the ring.
pub struct Received {
    pub block: SlabRef,
    pub address: *mut u8,
    pub len: usize,
}

// SAFETY: the address points into shared memory that stays mapped while the channel
// lives; `Received` is only a description of it.
unsafe impl Send for Received {}

/// What `stats()` reports about the shared state.
#[derive(Clone, Debug, Default)]
pub struct SharedStats {
    pub mapped_bytes: u64,
    pub used_bytes: u64,
    pub used_blocks: u64,
    pub queued: u64,
    pub capacity: u64,
    pub max_slab_bytes: u64,
    pub segments: u32,
    pub senders: u32,
    pub receivers: u32,
    pub outstanding: u64,
    /// Pids of the processes attached now (dead ones until they are reaped).
    pub processes: Vec<u32>,
    /// Periodic sweeps for dead peers so far, by every process of the channel.
    pub liveness_sweeps: u64,
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Sender => 0,
        Side::Receiver => 1,
    }
}

impl Channel {
    /// Creates a channel; this process is its first member.
    pub fn create(options: &ChannelOptions) -> Result<Arc<Channel>> {
        if options.capacity == 0 || options.capacity > MAX_CAPACITY {
            return Err(Error::InvalidArgument(format!(
                "capacity must be between 1 and {MAX_CAPACITY}, got {}",
                options.capacity
            )));
        }
        let backing = Backing::from_env();
        let max = match options.max_slab_bytes {
            Some(0) => {
                return Err(Error::InvalidArgument(
                    "max_slab_bytes must be positive".into(),
                ))
            }
            Some(max) => max.next_multiple_of(4096),
            None => ((backing.available_bytes() as f64 * DEFAULT_MAX_SHARE) as u64).max(64 << 20),
        };
        let first = options.slab_bytes.unwrap_or(DEFAULT_FIRST_SEGMENT).min(max);
        if options.slab_bytes.is_some_and(|bytes| bytes > max) {
            return Err(Error::InvalidArgument(format!(
                "slab_bytes ({}) exceeds max_slab_bytes ({})",
                format_bytes(options.slab_bytes.unwrap_or(0)),
                format_bytes(max)
            )));
        }
        let id = random_u64();
        // A mailbox pushes its new version before retiring the previous one.
        let capacity = match options.kind {
            Kind::Latest => 2,
            _ => options.capacity,
        };
        let control_len = layout::control_len(capacity);
        let control = Segment::create(
            &backing,
            &format!("tensorslab-{id:016x}-control"),
            control_len,
        )?;
        // SAFETY: a fresh, zero-filled mapping of `control_len` >= size_of::<ControlBlock>()
        // bytes; all-zero is a valid ControlBlock (every field is an atomic integer).
        let block = unsafe { &*control.base().cast::<ControlBlock>() };
        block.header_size.store(
            std::mem::size_of::<ControlBlock>() as u32,
            Ordering::Relaxed,
        );
        block.channel_id.store(id, Ordering::Relaxed);
        block.capacity.store(capacity as u32, Ordering::Relaxed);
        let spin = options.spin.min(MAX_SPIN).as_nanos() as u32;
        block.spin_ns.store(spin, Ordering::Relaxed);
        let strict = if options.strict { FLAG_STRICT } else { 0 };
        block
            .flags
            .store(strict | options.kind.flags(), Ordering::Relaxed);
        block.max_slab_bytes.store(max, Ordering::Relaxed);
        block
            .control_len
            .store(control_len as u64, Ordering::Relaxed);
        block.heap.next_segment_len.store(first, Ordering::Relaxed);
        block.abi_version.store(ABI_VERSION, Ordering::Relaxed);
        // Release: identity fields are complete before the magic marks the block valid
        // (pairs with the Acquire load in `validate`).
        block.magic.store(MAGIC, Ordering::Release);
        let channel = Channel::join(control, backing, id, control_len, capacity, None)?;
        if options.slab_bytes.is_some() {
            // Map the first segment now, so the first put does not pay for it.
            if let Some(allocation) = channel
                .slab
                .allocate(0, owner_word(OWNER_SENDER, channel.slab.slot_id()))?
            {
                channel.slab.free_message(allocation.block)?;
            }
        }
        Ok(channel)
    }

    /// Attaches this process to the channel a ticket describes (reusing an existing
    /// attachment of the same channel in this process).
    pub fn attach(ticket: &Ticket) -> Result<Arc<Channel>> {
        if let Some(channel) = registry::find(ticket.channel_id) {
            return Ok(channel);
        }
        let identity = FileIdentity {
            device: ticket.device,
            inode: ticket.inode,
        };
        let mut last_error = None;
        for &(pid, fd) in &ticket.candidates {
            match Segment::attach(pid, fd, ticket.control_len as usize, identity) {
                Ok(control) => {
                    let capacity = validate(&control, ticket.channel_id)?;
                    return Channel::join(
                        control,
                        Backing::from_env(),
                        ticket.channel_id,
                        ticket.control_len as usize,
                        capacity,
                        Some(ticket.pending),
                    );
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(Error::Closed(format!(
            "cannot attach channel {:016x}: every process that held it has exited{}",
            ticket.channel_id,
            last_error
                .map(|e| format!(" (last attempt: {e})"))
                .unwrap_or_default()
        )))
    }

    /// Claims a slot in the channel and starts this process's watcher. `pending`: the
    /// ticket being redeemed, adopted before anything can go wrong (see `adopt_pending`).
    fn join(
        control: Segment,
        backing: Backing,
        id: u64,
        control_len: usize,
        capacity: usize,
        pending: Option<u64>,
    ) -> Result<Arc<Channel>> {
        let control_fd = control.raw_fd();
        let control = Arc::new(control);
        // SAFETY: validated (or just initialised) control block inside a live mapping.
        let block = unsafe { &*control.base().cast::<ControlBlock>() };
        let slot = block.claim_slot(current_process()?, control_fd)?;
        if let Some(pending) = pending {
            block.adopt_pending(pending, slot);
        }
        // Read once and capped: a peer that corrupts it later changes nothing here.
        let spin =
            Duration::from_nanos(u64::from(block.spin_ns.load(Ordering::Relaxed))).min(MAX_SPIN);
        let channel = Arc::new(Channel {
            spin,
            slab: Slab::new(control, backing, id, slot, crate::header::frame_buffer_refs),
            id,
            control_len,
            capacity,
            local: [AtomicU32::new(0), AtomicU32::new(0)],
            pid: AtomicU32::new(current_pid()),
            fork_pending: AtomicU64::new(0),
            counts_inherited: AtomicBool::new(false),
            reap_unfinished: AtomicBool::new(false),
            claimed_due: AtomicU64::new(0),
            held_elsewhere: (0..layout::MAX_SEGMENTS)
                .map(|_| AtomicBool::new(false))
                .collect(),
            deferred: std::sync::Mutex::new(Vec::new()),
            holds: fanout::HoldsLock::default(),
        });
        registry::insert(&channel);
        watcher::start(&channel);
        Ok(channel)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn control(&self) -> &ControlBlock {
        self.slab.control()
    }

    pub fn slab(&self) -> &Slab {
        &self.slab
    }

    pub fn slot(&self) -> u16 {
        self.slab.slot()
    }

    pub fn strict(&self) -> bool {
        self.control().flags.load(Ordering::Relaxed) & FLAG_STRICT != 0
    }

    /// True in the process that owns this attachment (false in a fork child that has not
    /// re-registered, which must never release the parent's memory).
    pub fn owned_here(&self) -> bool {
        self.pid.load(Ordering::Relaxed) == current_pid()
    }

    fn ring(&self) -> Ring<'_> {
        let control = self.slab.control();
        // SAFETY: the cells follow the control block (`layout::ring_offset`) inside the
        // control segment, which holds `control_len(self.capacity)` bytes (sized so by
        // `create`, checked by `validate` on attach); they are atomics.
        let cells = unsafe {
            let base = (control as *const ControlBlock)
                .cast::<u8>()
                .add(layout::ring_offset());
            std::slice::from_raw_parts(base.cast::<Cell>(), self.capacity)
        };
        Ring {
            state: &control.ring,
            cells,
        }
    }

    // ---- handles ----

    /// Counts a new handle of this process on `side`.
    pub fn open_handle(&self, side: Side) {
        self.local[side_index(side)].fetch_add(1, Ordering::Relaxed);
        self.control().add_handles(self.slot(), side, 1);
    }

    /// The process this attachment belongs to (a fork child's own pid once registered).
    /// How long a blocked call spins before sleeping (`spin_us=`), as this process read it.
    pub fn spin_time(&self) -> Duration {
        self.spin
    }

    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// True when handles inherited through fork count as open in this process without
    /// being used (see `registry::after_fork_in_child`).
    pub fn counts_inherited(&self) -> bool {
        self.counts_inherited.load(Ordering::Relaxed)
    }

    /// Uncounts a handle of this process on `side`.
    pub fn close_handle(&self, side: Side) {
        if !self.owned_here() {
            return;
        }
        let _ =
            self.local[side_index(side)].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
        self.control().remove_handles(self.slot(), side, 1);
    }

    /// A ticket another process can attach with; the handle it carries counts as open
    /// (pending) until redeemed by `redeem`, or until this process exits.
    pub fn ticket(&self, side: Side) -> Result<Ticket> {
        let control = self.control();
        let (senders, receivers) = match side {
            Side::Sender => (1, 0),
            Side::Receiver => (0, 1),
        };
        let pending =
            control.add_pending(self.slab.slot_id(), senders, receivers, random_u64() as u32)?;
        let mut candidates = vec![];
        let me = usize::from(self.slot());
        let own = &control.processes[me];
        candidates.push((current_pid(), own.control_fd.load(Ordering::Relaxed)));
        for (index, slot) in control.processes.iter().enumerate() {
            let fd = slot.control_fd.load(Ordering::Relaxed);
            if let (true, Some(pid), true) = (index != me, slot.pid(), fd >= 0) {
                candidates.push((pid, fd));
            }
        }
        let identity = self.slab_control_identity();
        Ok(Ticket {
            channel_id: self.id,
            control_len: self.control_len as u64,
            device: identity.device,
            inode: identity.inode,
            side,
            pending,
            candidates,
        })
    }

    fn slab_control_identity(&self) -> FileIdentity {
        self.slab.control_segment().identity()
    }

    /// This process's attachment of channel `id`, if it has one.
    pub fn find_attached(id: u64) -> Option<Arc<Channel>> {
        registry::find(id)
    }

    /// Withdraws a ticket this process issued that will never be redeemed. False if it was
    /// redeemed (or withdrawn) already.
    pub fn cancel_ticket(&self, ticket: &Ticket) -> bool {
        self.control().withdraw_pending(ticket.pending)
    }

    /// Redeems a ticket without opening the handle it carries (what it names is gone).
    pub fn discard_ticket(&self, ticket: &Ticket) {
        self.control()
            .redeem_pending(ticket.pending, self.slab.slot_id(), || {});
    }

    /// Opens the handle a ticket carries in this process and redeems its pending entry.
    pub fn redeem(&self, ticket: &Ticket) {
        self.control()
            .redeem_pending(ticket.pending, self.slab.slot_id(), || {
                self.open_handle(ticket.side)
            });
    }

    /// Open handles on `side`, over every process (pending ones included).
    pub fn open_count(&self, side: Side) -> u32 {
        self.control().open(side)
    }

    /// True when any handle on `side` is open (cheaper than `open_count`).
    pub fn any_open(&self, side: Side) -> bool {
        self.control().any_open(side)
    }

    // ---- waiting ----

    /// Runs `attempt` until it yields a value, sleeping on `word` between tries. Returns
    /// `Ok(None)` when the deadline passes. Every wake-up (at least every 50 ms) that finds
    /// nothing runs `interrupt` and, when the channel's sweep is due, a sweep for dead peers.
    fn wait_until<T>(
        &self,
        word: &AtomicU32,
        waiters: &AtomicU32,
        deadline: Deadline,
        interrupt: Interrupt,
        mut attempt: impl FnMut() -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        let mut woken = false;
        loop {
            let seen = word.load(Ordering::SeqCst);
            if let Some(value) = attempt()? {
                return Ok(Some(value));
            }
            if std::mem::take(&mut woken) {
                // A wake-up that brought nothing: look at signals and dead peers, then try
                // again at once. Not before the attempt: a consumer woken for a message
                // takes it without first taking the GIL to check for signals.
                interrupt()?;
                let _ = self.reap_if_due();
                continue;
            }
            let Some(remaining) = deadline.remaining() else {
                return Ok(None);
            };
            // SeqCst registration, then re-check of `word`: pairs with the SeqCst bump +
            // waiter load on the waking side, so either we see the bump or they see us.
            waiters.fetch_add(1, Ordering::SeqCst);
            if word.load(Ordering::SeqCst) == seen {
                futex_wait(word, seen, remaining);
            }
            waiters.fetch_sub(1, Ordering::SeqCst);
            woken = true;
        }
    }
}

/// This process's identity, to claim a slot with.
fn current_process() -> Result<ProcessId> {
    ProcessId::current().map_err(|error| {
        Error::os(
            format!(
                "cannot read this process's start time from /proc/{}/stat (needed to join a channel)",
                current_pid()
            ),
            error,
        )
    })
}

impl Channel {
    /// The error for a side with no handle left: `PeerGone` when the last of them died
    /// without closing, `Closed` otherwise.
    pub(crate) fn side_gone(&self, side: Side) -> Error {
        let (who, rest) = match (self.kind(), side) {
            (Kind::Channel, Side::Sender) => ("sender", ", and no message is left"),
            (Kind::Channel, Side::Receiver) => ("receiver", ""),
            (Kind::Broadcast { .. }, Side::Sender) => ("publisher", ", and no message is left"),
            (Kind::Broadcast { .. }, Side::Receiver) => ("subscriber", ""),
            (Kind::Latest, Side::Sender) => ("writer", ", and no newer version is left"),
            (Kind::Latest, Side::Receiver) => ("reader", ""),
        };
        match self.control().died_last(side) {
            Some(pid) => Error::PeerGone(format!(
                "every {who} of this channel is gone{rest}; the last ones died without closing (pid {pid})"
            )),
            None => Error::Closed(format!(
                "every {who} of this channel has closed or exited{rest}"
            )),
        }
    }
}

/// Checks an attached control segment is this channel's, in this ABI, and holds the whole
/// ring its capacity says; returns that capacity.
fn validate(control: &Segment, expected_id: u64) -> Result<usize> {
    if control.len() < std::mem::size_of::<ControlBlock>() {
        return Err(Error::Incompatible(
            "channel control segment is too small".into(),
        ));
    }
    // SAFETY: the mapping is at least as long as a ControlBlock (checked above) and every
    // field is an atomic integer, valid for any bit pattern.
    let block = unsafe { &*control.base().cast::<ControlBlock>() };
    // Acquire: pairs with the Release store of `magic` in `create`.
    let magic = block.magic.load(Ordering::Acquire);
    let version = block.abi_version.load(Ordering::Relaxed);
    if magic != MAGIC {
        return Err(Error::Incompatible(format!(
            "not a tensorslab channel (magic {magic:#018x})"
        )));
    }
    if version != ABI_VERSION {
        return Err(Error::Incompatible(format!(
            "channel was created by a tensorslab with shared-memory ABI version {version}, this one speaks version {ABI_VERSION}; use the same tensorslab version in every process"
        )));
    }
    // Offsets are never read from the header: the same ABI version means the same layout
    // (see `layout::ABI_VERSION`), which the recorded size double-checks.
    let header_size = block.header_size.load(Ordering::Relaxed) as usize;
    if header_size != std::mem::size_of::<ControlBlock>() {
        return Err(Error::Incompatible(format!(
            "channel control block is {header_size} bytes, this tensorslab's is {} with the same ABI version {ABI_VERSION}: corrupt, or built from a modified layout",
            std::mem::size_of::<ControlBlock>()
        )));
    }
    if block.channel_id.load(Ordering::Relaxed) != expected_id {
        return Err(Error::Incompatible(
            "attached segment belongs to another channel".into(),
        ));
    }
    let capacity = block.capacity.load(Ordering::Relaxed) as usize;
    if capacity == 0 || capacity > MAX_CAPACITY || layout::control_len(capacity) > control.len() {
        return Err(Error::Incompatible(format!(
            "channel control segment of {} cannot hold a ring of capacity {capacity} \
             (corrupt shared memory?)",
            format_bytes(control.len() as u64)
        )));
    }
    Ok(capacity)
}

impl Drop for Channel {
    fn drop(&mut self) {
        registry::remove(self.id);
        // Bounded: a lock a live process never lets go (stopped, or a corrupt word) must not
        // hang this process's exit; what is left is reclaimed by its reaper.
        let _scope = call_scope(
            Deadline::after(Some(Duration::from_secs(1))),
            TimeoutKind::Full,
        );
        self.run_deferred();
        if self.owned_here() {
            self.control().release_slot(self.slab.slot_id());
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
