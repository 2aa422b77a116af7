use super::*;
use crate::layout::control_len;
use crate::shm::ProcessId;
use grow::{segment_len, PAGE};
use proptest::prelude::*;

/// Owner word of a message being filled (by slot 0, generation 0).
const MESSAGE: u64 = block::OWNER_SENDER << 48;

fn slab(max: u64, first_segment: u64) -> Slab {
    let control = Segment::create(&Backing::Memfd, "tensorslab-slab-test", control_len(4)).unwrap();
    // SAFETY: a fresh zeroed segment large enough for the control block.
    let block = unsafe { &*control.base().cast::<ControlBlock>() };
    block.max_slab_bytes.store(max, Ordering::Relaxed);
    block
        .heap
        .next_segment_len
        .store(first_segment, Ordering::Relaxed);
    let me = ProcessId::current().unwrap();
    let slot = block.claim_slot(me, -1).unwrap();
    Slab::new(
        Arc::new(control),
        Backing::Memfd,
        1,
        slot,
        crate::header::frame_buffer_refs,
    )
}

/// Every free block, walked through the segments: (segment, offset, size).
fn free_blocks(slab: &Slab) -> Vec<(usize, usize, usize)> {
    let mut found = vec![];
    for index in 0..slab.heap().segment_count.load(Ordering::Relaxed) as usize {
        let len = slab.segment(index).unwrap().len();
        let mut offset = 0;
        while offset < len {
            let (size, state) = unpack(
                slab.header(SlabRef::new(index, offset))
                    .unwrap()
                    .size_state
                    .load(Ordering::Relaxed),
            );
            if state == STATE_FREE {
                found.push((index, offset, size));
            }
            offset += size;
        }
    }
    found
}

#[test]
fn everything_released_coalesces_to_whole_segments() {
    let slab = slab(64 << 20, 4 << 20);
    let blocks: Vec<_> = (0..200)
        .map(|i| slab.allocate(100 + i * 977, MESSAGE).unwrap().unwrap())
        .collect();
    for (i, allocation) in blocks.iter().enumerate() {
        assert!(allocation.capacity >= 100 + i * 977);
        assert_eq!(allocation.address as usize % 64, 0);
    }
    for allocation in blocks
        .iter()
        .rev()
        .step_by(2)
        .chain(blocks.iter().step_by(2))
    {
        let _ = slab.free_message(allocation.block);
    }
    assert_eq!(slab.usage().1, 0);
    let segments = slab.heap().segment_count.load(Ordering::Relaxed) as usize;
    let free = free_blocks(&slab);
    assert_eq!(free.len(), segments, "{free:?}");
}

#[test]
fn refuses_more_than_max_and_reports_full() {
    let slab = slab(8 << 20, 2 << 20);
    let error = slab.allocate(9 << 20, MESSAGE).unwrap_err();
    assert!(error.to_string().contains("max_slab_bytes"), "{error}");
    let a = slab.allocate(5 << 20, MESSAGE).unwrap().unwrap();
    assert!(slab.allocate(5 << 20, MESSAGE).unwrap().is_none());
    assert!(!slab.has_space(5 << 20));
    slab.free_message(a.block).unwrap();
    assert!(slab.has_space(5 << 20));
}

#[test]
fn rejects_bad_references() {
    let slab = slab(8 << 20, 2 << 20);
    let a = slab.allocate(1000, MESSAGE).unwrap().unwrap();
    assert!(slab
        .content(SlabRef::new(0, a.block.offset() + 64))
        .is_err());
    assert!(slab.content(SlabRef::new(0, 1 << 30)).is_err());
    assert!(slab.content(SlabRef::new(5, 0)).is_err());
    slab.free_message(a.block).unwrap();
    assert!(
        slab.content(a.block).is_err(),
        "a freed block must not read as used"
    );
}

#[test]
fn rebuild_after_a_lost_lock_holder_matches() {
    let slab = slab(32 << 20, 4 << 20);
    let blocks: Vec<_> = (0..50)
        .map(|i| slab.allocate(4096 * (i % 7 + 1), MESSAGE).unwrap().unwrap())
        .collect();
    for allocation in blocks.iter().step_by(3) {
        slab.free_message(allocation.block).unwrap();
    }
    let before = (free_blocks(&slab), slab.usage());
    slab.rebuild_free_lists();
    assert_eq!((free_blocks(&slab), slab.usage()), before);
    for allocation in blocks
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(_, a)| a)
    {
        slab.free_message(allocation.block).unwrap();
    }
    assert_eq!(slab.usage().1, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn random_alloc_free_keeps_blocks_disjoint(ops in prop::collection::vec((0usize..200_000, any::<bool>()), 1..200)) {
        let slab = slab(64 << 20, 1 << 20);
        let mut live: Vec<Allocation> = vec![];
        for (size, free_one) in ops {
            if free_one && !live.is_empty() {
                let victim = live.swap_remove(size % live.len());
                slab.free_message(victim.block).unwrap();
            } else if let Some(allocation) = slab.allocate(size, MESSAGE).unwrap() {
                // SAFETY: the allocation is `capacity` bytes of mapped memory.
                unsafe { std::ptr::write_bytes(allocation.address, 0xab, allocation.capacity) };
                live.push(allocation);
            }
            let mut ranges: Vec<_> = live.iter().map(|a| (a.address as usize, a.address as usize + a.capacity)).collect();
            ranges.sort();
            for pair in ranges.windows(2) {
                prop_assert!(pair[0].1 <= pair[1].0);
            }
        }
        for allocation in live {
            slab.free_message(allocation.block).unwrap();
        }
        prop_assert_eq!(slab.usage().1, 0);
        let segments = slab.heap().segment_count.load(Ordering::Relaxed) as usize;
        prop_assert_eq!(free_blocks(&slab).len(), segments);
    }
}

#[test]
fn segments_hold_whole_blocks_and_grow_by_a_quarter() {
    let block = Slab::block_size(8 << 20).unwrap(); // an 8 MiB message and its header
                                                    // The first segment follows slab_bytes but always fits the block that needed it.
    assert_eq!(
        segment_len(block, 0, 4 << 20, 0, 1 << 30),
        block.next_multiple_of(PAGE)
    );
    // Later: about a quarter of what is mapped, in whole blocks, so equal messages pack.
    let len = segment_len(block, 3, 4 << 20, 200 << 20, 1 << 30);
    assert_eq!(len % PAGE, 0);
    assert_eq!(len / block, (50usize << 20).div_ceil(block));
    assert!(len >= 50 << 20 && len < (50 << 20) + block + PAGE);
    // Never more than the room max_slab_bytes leaves.
    assert!(segment_len(block, 3, 4 << 20, 200 << 20, 20 << 20) <= 20 << 20);
}

#[test]
fn equal_messages_fill_the_limit_with_no_tail_wasted() {
    // Eight 8 MiB messages fit a 65 MiB limit: whole-block segments leave no gaps.
    let slab = slab(65 << 20, 4 << 20);
    let held: Vec<_> = (0..7)
        .map(|_| slab.allocate(8 << 20, MESSAGE).unwrap().unwrap())
        .collect();
    assert!(
        slab.allocate(8 << 20, MESSAGE).unwrap().is_some(),
        "mapped {}",
        slab.usage().0
    );
    drop(held);
}
