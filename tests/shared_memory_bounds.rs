//! Nothing read from shared memory is trusted (issue 10): every length, offset and index a
//! peer could have written is checked before it addresses memory. Each test writes the
//! corrupt value itself (as a broken or hostile peer would) and checks that the core answers
//! with an error instead of reading or writing outside its mappings, panicking, or looping.
//!
//! The cross-process version of these checks, and a fuzzer, are in `test_corrupt_peer.py`.
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use tensorslab::channel::{Channel, ChannelOptions};
use tensorslab::layout::{Cell, RingState};
use tensorslab::procs::Side;
use tensorslab::ring::Ring;
use tensorslab::slab::block::{owner_word, pack, unpack, OWNER_SENDER, STATE_USED};
use tensorslab::slab::SlabRef;
use tensorslab::wait::Deadline;
use tensorslab::Error;

fn channel(capacity: usize, slab_bytes: u64, max: u64) -> Arc<Channel> {
    let channel = Channel::create(&ChannelOptions {
        capacity,
        slab_bytes: Some(slab_bytes),
        max_slab_bytes: Some(max),
        strict: false,
        ..Default::default()
    })
    .unwrap();
    channel.open_handle(Side::Sender);
    channel.open_handle(Side::Receiver);
    channel
}

/// The owner word of a block this process is filling as a message.
fn sender(channel: &Channel) -> u64 {
    owner_word(OWNER_SENDER, channel.slab().slot_id())
}

fn deadline() -> Deadline {
    Deadline::after(Some(Duration::from_secs(5)))
}

/// Puts `bytes` as a message; returns its block.
fn send(channel: &Channel, bytes: &[u8]) -> SlabRef {
    let allocation = channel
        .begin_put(bytes.len(), true, deadline(), &mut || Ok(()))
        .unwrap();
    // SAFETY: the allocation has at least `bytes.len()` bytes of capacity.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), allocation.address, bytes.len()) };
    channel
        .publish(&allocation, &[], true, deadline(), &mut || Ok(()))
        .unwrap();
    allocation.block
}

fn receive(channel: &Channel) -> tensorslab::Result<tensorslab::channel::Received> {
    channel.receive(false, deadline(), &mut || Ok(()))
}

/// Runs `work` on another thread and fails if it has not finished after a minute: a walk
/// that loops forever on corrupt sizes must fail the test, not hang it.
fn finishes<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    match result.recv_timeout(Duration::from_secs(60)) {
        Ok(value) => value,
        Err(RecvTimeoutError::Timeout) => {
            panic!("still running after a minute: a loop over shared memory never ends")
        }
        Err(RecvTimeoutError::Disconnected) => panic!("the work panicked (see above)"),
    }
}

#[test]
fn a_content_length_past_the_block_is_refused() {
    let channel = channel(4, 2 << 20, 8 << 20);
    let block = send(&channel, b"hello");
    let header = channel.slab().header(block).unwrap();
    header.content_len.store(1 << 40, Ordering::Relaxed);
    let error = receive(&channel)
        .err()
        .expect("received a message claiming 1 TiB of content in a 128-byte block");
    assert!(matches!(error, Error::Incompatible(_)), "{error}");
    assert!(error.to_string().contains("content"), "{error}");
}

#[test]
fn content_lengths_up_to_the_capacity_are_accepted() {
    let channel = channel(4, 2 << 20, 8 << 20);
    let block = send(&channel, b"hello");
    let slab = channel.slab();
    let (header, _, capacity) = slab.content(block).unwrap();
    assert_eq!(
        capacity,
        unpack(header.size_state.load(Ordering::Relaxed)).0 - 64
    );
    header
        .content_len
        .store(capacity as u64 + 1, Ordering::Relaxed);
    assert!(slab.content(block).is_err());
    header.content_len.store(capacity as u64, Ordering::Relaxed);
    assert!(slab.content(block).is_ok());
    header.content_len.store(5, Ordering::Relaxed);
    assert_eq!(receive(&channel).unwrap().len, 5);
}

#[test]
fn a_block_size_that_wraps_the_address_space_is_refused() {
    let channel = channel(4, 2 << 20, 8 << 20);
    send(&channel, b"first");
    let block = send(&channel, b"second");
    assert_ne!(block.offset(), 0);
    let header = channel.slab().header(block).unwrap();
    // offset + size wraps to 0, inside the segment: the block would reach everywhere.
    let size = (block.offset() as u64).wrapping_neg() as usize;
    header
        .size_state
        .store(pack(size, STATE_USED), Ordering::Relaxed);
    header.content_len.store(1 << 40, Ordering::Relaxed);
    assert!(channel.slab().content(block).is_err());
}

#[test]
fn walks_end_on_block_sizes_that_wrap() {
    let channel = channel(4, 2 << 20, 8 << 20);
    send(&channel, b"first");
    let block = send(&channel, b"second");
    let header = channel.slab().header(block).unwrap();
    // The walk would go from this block back to offset 0, and round again, forever.
    let size = (block.offset() as u64).wrapping_neg() as usize;
    header
        .size_state
        .store(pack(size, STATE_USED), Ordering::Relaxed);
    let walker = channel.clone();
    let used = finishes(move || walker.slab().used_blocks().unwrap());
    assert_eq!(used.len(), 1, "{used:?}");
    let walker = channel.clone();
    finishes(move || walker.slab().rebuild_free_lists());
}

#[test]
fn a_segment_count_past_the_table_is_refused() {
    let channel = channel(4, 2 << 20, 4 << 20);
    let slab = channel.slab();
    let held = slab
        .allocate(1536 << 10, sender(&channel))
        .unwrap()
        .unwrap();
    let heap = &channel.control().heap;
    heap.segment_count.store(1000, Ordering::Release);
    let walker = channel.clone();
    finishes(move || walker.slab().used_blocks().unwrap());
    // No block fits and no segment can be added: the allocator must say so, not index
    // the 48-entry segment table with 1000.
    let result = slab.allocate(1536 << 10, sender(&channel));
    heap.segment_count.store(1, Ordering::Release);
    assert!(matches!(result, Ok(None) | Err(_)));
    slab.free_message(held.block).unwrap();
}

#[test]
fn free_list_bitmap_bits_past_the_last_bin_are_ignored() {
    let channel = channel(4, 2 << 20, 16 << 20);
    let heap = &channel.control().heap;
    // 160 bins in three 64-bit words: bits 160..192 name no bin.
    heap.bitmap[2].fetch_or(1 << 63, Ordering::Relaxed);
    let allocation = channel.slab().allocate(3 << 20, sender(&channel));
    heap.bitmap[2].fetch_and(!(1 << 63), Ordering::Relaxed);
    let allocation = allocation.unwrap().expect("the slab has room to grow");
    channel.slab().free_message(allocation.block).unwrap();
}

#[test]
fn the_ring_capacity_is_read_once_at_attach() {
    let channel = channel(4, 2 << 20, 8 << 20);
    let control = channel.control();
    control.capacity.store(u32::MAX, Ordering::Relaxed);
    // The ring's cells were sized for 4; a capacity read from shared memory now would
    // index 2^32 cells of a 4-cell ring.
    assert_eq!(channel.capacity(), 4);
    control.ring.head.store(1 << 31, Ordering::Relaxed);
    control.ring.tail.store((1 << 31) + 1, Ordering::Relaxed);
    // Cell (2^31 mod 4) holds no message: an error, not a read 32 GiB past the ring.
    assert!(receive(&channel).is_err());
    control.ring.head.store(0, Ordering::Relaxed);
    control.ring.tail.store(0, Ordering::Relaxed);
    control.capacity.store(4, Ordering::Relaxed);
}

#[test]
fn queued_entries_are_bounded_by_the_capacity() {
    let state = RingState {
        head: AtomicU64::new(0),
        tail: AtomicU64::new(u64::MAX),
        pushed: AtomicU32::new(0),
        popped: AtomicU32::new(0),
        consumers_waiting: AtomicU32::new(0),
        producers_waiting: AtomicU32::new(0),
    };
    let cells: Vec<Cell> = (0..4)
        .map(|_| Cell {
            block: AtomicU64::new(0),
            origin: AtomicU32::new(0),
            _reserved: AtomicU32::new(0),
        })
        .collect();
    // Crash recovery lists what is queued under the ring lock; with tail - head = 2^64 - 1
    // that listing must stop at the ring's 4 cells instead of walking 2^64 of them.
    let queued = finishes(move || {
        Ring {
            state: &state,
            cells: &cells,
        }
        .queued()
        .count()
    });
    assert_eq!(queued, 4);
}
