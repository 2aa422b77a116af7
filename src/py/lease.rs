//! Who keeps slab memory alive in Python.
//!
//! A received message's block (and through it the `alloc` blocks it references) is held by one
//! [`MessageLease`], shared by every array and tensor decoded from it: NumPy arrays hold a
//! [`Lease`] object as their `base`, torch tensors hold the lease through their DLPack
//! context. Slices, views and `torch.as_tensor` results keep those bases, so the memory is
//! released exactly when the last view of the message dies.
//!
//! A `Sender.alloc` buffer is held by an [`AllocLease`], registered by address so `put`
//! can recognise an array living in it and send it without copying.
//!
//! Both remember the process that created them: a fork child inherits the objects but must
//! never release the parent's memory (the parent still holds it).
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;

use crate::channel::Channel;
use crate::shm::current_pid;
use crate::slab::SlabRef;

/// The block of one received message (releasing it releases the `alloc` buffers it
/// references too, in one step: see `slab::refs`).
pub struct MessageLease {
    channel: Arc<Channel>,
    block: SlabRef,
    pid: u32,
}

impl MessageLease {
    pub fn new(channel: Arc<Channel>, block: SlabRef) -> MessageLease {
        MessageLease {
            channel,
            block,
            pid: current_pid(),
        }
    }
}

impl Drop for MessageLease {
    fn drop(&mut self) {
        if self.pid != current_pid() {
            return;
        }
        self.channel.release_message(self.block);
    }
}

/// An `alloc` buffer: one reference to its block, held by the sender's array or tensor.
pub struct AllocLease {
    channel: Arc<Channel>,
    block: SlabRef,
    start: usize,
    pid: u32,
}

impl Drop for AllocLease {
    fn drop(&mut self) {
        unregister(self.start);
        if self.pid == current_pid() {
            self.channel.release_buffer(self.block);
        }
    }
}

/// What keeps a NumPy array's memory alive (its `base`) or a tensor's (its DLPack context).
/// Held for its `Drop`, never read.
#[allow(dead_code)]
pub enum Keeper {
    Message(Arc<MessageLease>),
    Alloc(Arc<AllocLease>),
    /// A `tensorslab.share` segment (`crate::shared`), never recycled.
    Shared(Arc<crate::shared::Shared>),
    /// A private copy (`get(copy=True)`, `loads`), 64-byte aligned.
    Owned(Vec<Aligned>),
}

/// 64 bytes aligned to 64: the unit of private copies, so they are aligned like the slab.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct Aligned(#[allow(dead_code)] [u8; 64]);

impl Keeper {
    /// Zeroed, 64-byte aligned private memory of at least `len` bytes, and its address.
    pub fn owned(len: usize) -> (Keeper, *mut u8) {
        let mut chunks = vec![Aligned([0; 64]); len.div_ceil(64).max(1)];
        let address = chunks.as_mut_ptr().cast::<u8>();
        (Keeper::Owned(chunks), address)
    }
}

/// The `base` of arrays that view slab memory; opaque to users.
#[pyclass(frozen, module = "tensorslab._tensorslab")]
pub struct Lease {
    _keeper: Keeper,
}

impl Lease {
    pub fn new(keeper: Keeper) -> Lease {
        Lease { _keeper: keeper }
    }
}

// ---- the alloc registry ----

struct Registered {
    end: usize,
    channel_id: u64,
    lease: std::sync::Weak<AllocLease>,
}

static ALLOCS: Mutex<BTreeMap<usize, Registered>> = Mutex::new(BTreeMap::new());

fn allocs() -> std::sync::MutexGuard<'static, BTreeMap<usize, Registered>> {
    ALLOCS.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Creates and registers the lease of a fresh `alloc` buffer at `start..start + len`.
pub fn register_alloc(
    channel: Arc<Channel>,
    block: SlabRef,
    start: usize,
    len: usize,
) -> Arc<AllocLease> {
    let channel_id = channel.id();
    let lease = Arc::new(AllocLease {
        channel,
        block,
        start,
        pid: current_pid(),
    });
    allocs().insert(
        start,
        Registered {
            end: start + len,
            channel_id,
            lease: Arc::downgrade(&lease),
        },
    );
    lease
}

fn unregister(start: usize) {
    allocs().remove(&start);
}

/// The `alloc` buffer of channel `channel_id` that holds `address..address + len`, with the
/// offset of `address` in it.
pub fn find_alloc(channel_id: u64, address: usize, len: usize) -> Option<(Arc<AllocLease>, usize)> {
    let registry = allocs();
    let (start, entry) = registry.range(..=address).next_back()?;
    if entry.channel_id != channel_id || address.checked_add(len)? > entry.end {
        return None;
    }
    let lease = entry.lease.upgrade()?;
    Some((lease, address - start))
}

impl AllocLease {
    pub fn block(&self) -> SlabRef {
        self.block
    }
}
