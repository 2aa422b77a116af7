use super::*;
use crate::procs::SlotId;
use std::time::Duration;

fn no_interrupt() -> impl FnMut() -> Result<()> {
    || Ok(())
}

fn send(channel: &Channel, bytes: &[u8]) -> Result<()> {
    let deadline = Deadline::after(Some(Duration::from_secs(5)));
    let allocation = channel.begin_put(bytes.len(), true, deadline, &mut no_interrupt())?;
    // SAFETY: the allocation has at least `bytes.len()` bytes of capacity.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), allocation.address, bytes.len()) };
    channel
        .publish(&allocation, &[], true, deadline, &mut no_interrupt())
        .inspect_err(|_| channel.abort_put(&allocation))
}

fn take(channel: &Channel) -> Result<Vec<u8>> {
    let received = channel.receive(
        true,
        Deadline::after(Some(Duration::from_secs(5))),
        &mut no_interrupt(),
    )?;
    // SAFETY: `received` describes `len` bytes inside a live block.
    let bytes = unsafe { std::slice::from_raw_parts(received.address, received.len) }.to_vec();
    channel.release_message(received.block);
    Ok(bytes)
}

fn channel(capacity: usize, max: u64) -> Arc<Channel> {
    let channel = Channel::create(&ChannelOptions {
        capacity,
        slab_bytes: Some(2 << 20),
        max_slab_bytes: Some(max),
        strict: false,
        ..Default::default()
    })
    .unwrap();
    channel.open_handle(Side::Sender);
    channel.open_handle(Side::Receiver);
    channel
}

#[test]
fn threads_move_messages_in_order_and_memory_returns() {
    let channel = channel(4, 16 << 20);
    let producer = {
        let channel = channel.clone();
        std::thread::spawn(move || {
            for i in 0..2000u32 {
                let len = 4 + (i as usize * 7919) % 100_000;
                let mut bytes = vec![(i % 251) as u8; len];
                bytes[..4].copy_from_slice(&i.to_le_bytes());
                send(&channel, &bytes).unwrap();
            }
        })
    };
    for i in 0..2000u32 {
        let bytes = take(&channel).unwrap();
        assert_eq!(bytes.len(), 4 + (i as usize * 7919) % 100_000);
        assert_eq!(u32::from_le_bytes(bytes[..4].try_into().unwrap()), i);
        assert!(bytes[4..].iter().all(|&b| b == (i % 251) as u8));
    }
    producer.join().unwrap();
    assert!(channel
        .wait_for_all_ack(
            Deadline::after(Some(Duration::from_secs(1))),
            &mut no_interrupt()
        )
        .unwrap());
    let stats = channel.shared_stats();
    assert_eq!(
        (stats.used_bytes, stats.used_blocks, stats.queued),
        (0, 0, 0)
    );
    assert!(stats.mapped_bytes <= 16 << 20);
}

#[test]
fn closing_the_last_sender_ends_the_receiver_after_draining() {
    let channel = channel(4, 16 << 20);
    send(&channel, b"last words").unwrap();
    channel.close_handle(Side::Sender);
    assert_eq!(take(&channel).unwrap(), b"last words");
    assert!(matches!(take(&channel), Err(Error::Closed(_))));
}

#[test]
fn put_without_receivers_is_closed() {
    let channel = channel(4, 16 << 20);
    channel.close_handle(Side::Receiver);
    assert!(matches!(send(&channel, b"x"), Err(Error::Closed(_))));
}

#[test]
fn full_ring_and_full_slab_time_out_with_details() {
    let channel = channel(2, 8 << 20);
    send(&channel, b"a").unwrap();
    send(&channel, b"b").unwrap();
    let allocation = channel
        .begin_put(1, true, Deadline::never(), &mut no_interrupt())
        .unwrap();
    let error = channel
        .publish(
            &allocation,
            &[],
            true,
            Deadline::after(Some(Duration::from_millis(30))),
            &mut no_interrupt(),
        )
        .unwrap_err();
    channel.abort_put(&allocation);
    assert!(error.to_string().contains("capacity 2"), "{error}");
    take(&channel).unwrap();
    take(&channel).unwrap();
    let big = channel
        .begin_put(3 << 20, true, Deadline::never(), &mut no_interrupt())
        .unwrap();
    let error = channel
        .begin_put(
            3 << 20,
            true,
            Deadline::after(Some(Duration::from_millis(30))),
            &mut no_interrupt(),
        )
        .unwrap_err();
    assert!(error.to_string().starts_with("slab exhausted"), "{error}");
    channel.abort_put(&big);
    assert_eq!(channel.shared_stats().used_blocks, 0);
}

#[test]
fn interrupt_abandons_a_blocked_receive() {
    let channel = channel(2, 4 << 20);
    let mut calls = 0;
    let result = channel.receive(true, Deadline::never(), &mut || {
        calls += 1;
        if calls == 2 {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    });
    assert!(matches!(result, Err(Error::Interrupted)));
    send(&channel, b"still usable").unwrap();
    assert_eq!(take(&channel).unwrap(), b"still usable");
}

#[test]
fn ticket_attaches_in_the_same_process_and_counts_pending() {
    let channel = channel(2, 4 << 20);
    let ticket = channel.ticket(Side::Sender).unwrap();
    assert_eq!(channel.open_count(Side::Sender), 2);
    let again = Channel::attach(&Ticket::from_bytes(&ticket.to_bytes()).unwrap()).unwrap();
    assert!(Arc::ptr_eq(&again, &channel));
    again.redeem(&ticket);
    assert_eq!(channel.open_count(Side::Sender), 2);
    again.redeem(&ticket); // a second redeem opens a handle but finds no pending entry
    assert_eq!(channel.open_count(Side::Sender), 3);
}

#[test]
fn a_message_that_can_never_fit_fails_at_once() {
    // 2 MiB first segment, 4 MiB limit: a 3 MiB block fits neither the segment nor the room
    // left for a new one, and waiting would never change that.
    let channel = channel(2, 4 << 20);
    // A bounded deadline, so a regression shows as `Full` rather than a hang.
    let deadline = Deadline::after(Some(Duration::from_secs(10)));
    let error = channel
        .begin_put(3 << 20, true, deadline, &mut no_interrupt())
        .unwrap_err();
    assert!(matches!(error, Error::InvalidArgument(_)), "{error}");
    assert!(error.to_string().contains("can never fit"), "{error}");
    send(&channel, b"still usable").unwrap();
    assert_eq!(take(&channel).unwrap(), b"still usable");
    assert_eq!(channel.shared_stats().used_blocks, 0);
}

/// A process slot for a process that has exited (as if it was SIGKILLed).
fn dead_slot(channel: &Channel, side: Side) -> SlotId {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let dead = crate::shm::ProcessId { pid, start_time: 1 };
    let slot = channel.control().claim_slot(dead, -1).unwrap();
    channel.control().add_handles(slot.index, side, 1);
    slot
}

fn set_owner(channel: &Channel, block: SlabRef, kind: u64, slot: SlotId) {
    channel
        .slab()
        .header(block)
        .unwrap()
        .owner
        .store(owner_word(kind, slot), Ordering::Relaxed);
}

#[test]
fn a_dead_processs_blocks_return_and_queued_messages_survive() {
    let channel = channel(8, 16 << 20);
    send(&channel, b"taken by the consumer that dies").unwrap();
    send(&channel, b"still queued").unwrap();
    let consumer = dead_slot(&channel, Side::Receiver);
    let producer = dead_slot(&channel, Side::Sender);
    // The consumer had taken the first message and still held views of it.
    let taken = channel
        .receive(false, Deadline::never(), &mut no_interrupt())
        .unwrap();
    set_owner(&channel, taken.block, OWNER_RECEIVER, consumer);
    // The producer died while copying a message it had not published.
    let half = channel
        .begin_put(4096, true, Deadline::never(), &mut no_interrupt())
        .unwrap();
    set_owner(&channel, half.block, OWNER_SENDER, producer);
    assert_eq!(channel.shared_stats().used_blocks, 3);
    assert_eq!(
        (
            channel.open_count(Side::Sender),
            channel.open_count(Side::Receiver)
        ),
        (2, 2)
    );

    assert_eq!(
        channel
            .control()
            .reap_dead(|process| process.liveness(), |slot| channel.reclaim(slot)),
        2
    );

    assert_eq!(
        channel.shared_stats().used_blocks,
        1,
        "only the queued message is left"
    );
    assert_eq!(
        (
            channel.open_count(Side::Sender),
            channel.open_count(Side::Receiver)
        ),
        (1, 1)
    );
    assert_eq!(take(&channel).unwrap(), b"still queued");
    assert_eq!(channel.shared_stats().used_bytes, 0);
}

#[test]
fn reclaim_skips_a_block_still_in_the_ring() {
    // A consumer killed between marking the head cell as its own and moving `head`.
    let channel = channel(8, 16 << 20);
    send(&channel, b"not yet taken").unwrap();
    let consumer = dead_slot(&channel, Side::Receiver);
    let head = channel.ring().peek().unwrap();
    set_owner(&channel, SlabRef(head.block), OWNER_RECEIVER, consumer);
    channel
        .control()
        .reap_dead(|process| process.liveness(), |slot| channel.reclaim(slot));
    assert_eq!(take(&channel).unwrap(), b"not yet taken");
    assert_eq!(channel.shared_stats().used_blocks, 0);
}

#[test]
fn another_abi_version_is_refused_with_a_clear_error() {
    let channel = channel(2, 4 << 20);
    let control = channel.slab().control_segment();
    assert!(validate(control, channel.id()).is_ok());
    channel
        .control()
        .abi_version
        .store(ABI_VERSION + 1, Ordering::Relaxed);
    let error = validate(control, channel.id()).unwrap_err();
    assert!(matches!(error, Error::Incompatible(_)), "{error}");
    assert!(
        error
            .to_string()
            .contains(&format!("version {}", ABI_VERSION + 1)),
        "{error}"
    );
    assert!(
        error.to_string().contains("same tensorslab version"),
        "{error}"
    );
    channel
        .control()
        .abi_version
        .store(ABI_VERSION, Ordering::Relaxed);
    assert!(validate(control, channel.id()).is_ok());
    // Same version, another size: refused too (offsets are never read from the header).
    let size = channel.control().header_size.load(Ordering::Relaxed);
    channel
        .control()
        .header_size
        .store(size + 64, Ordering::Relaxed);
    let error = validate(control, channel.id()).unwrap_err();
    assert!(error.to_string().contains("control block is"), "{error}");
    channel.control().header_size.store(size, Ordering::Relaxed);
}

#[test]
fn the_process_table_limit_is_a_limit_error_and_released_slots_come_back() {
    let channel = channel(2, 4 << 20);
    let control = channel.control();
    let mut claimed = vec![];
    // Claimed for this process: never reaped by this process's watcher meanwhile.
    let me = ProcessId::current().unwrap();
    let error = loop {
        match control.claim_slot(me, -1) {
            Ok(slot) => claimed.push(slot),
            Err(error) => break error,
        }
    };
    assert!(matches!(error, Error::Limit(_)), "{error}");
    assert!(error.to_string().contains("256 processes"), "{error}");
    assert_eq!(claimed.len(), layout::MAX_PROCESSES - 1);
    for slot in claimed {
        control.release_slot(slot);
    }
    // Released slots are claimed again, with the next generation.
    let again = control.claim_slot(me, -1).unwrap();
    assert_eq!(again.generation, 2);
    control.release_slot(again);
}

/// A pid that belonged to a process that has exited.
fn exited_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn a_claimant_or_reaper_that_died_does_not_keep_its_slot() {
    let channel = channel(2, 4 << 20);
    let control = channel.control();
    let me = ProcessId::current().unwrap();
    let slot = control.claim_slot(me, -1).unwrap();
    control.add_handles(slot.index, Side::Sender, 1);
    let record = &control.processes[usize::from(slot.index)];
    const CLAIMING: u64 = 1 << 30;
    const REAPING: u64 = 2 << 30;
    let generation = u64::from(slot.generation) << 32;
    // Died half-way through claiming: the slot is free again.
    record.state.store(
        generation | CLAIMING | u64::from(exited_pid()),
        Ordering::Release,
    );
    reap_until(&channel, &record.state, generation);
    // Died half-way through reaping the slot's occupant: the next reaper takes over, and
    // the occupant's handle no longer counts.
    let slot = control.claim_slot(me, -1).unwrap();
    control.add_handles(slot.index, Side::Sender, 1);
    assert_eq!(channel.open_count(Side::Sender), 2);
    let generation = u64::from(slot.generation) << 32;
    record.state.store(
        generation | REAPING | u64::from(exited_pid()),
        Ordering::Release,
    );
    assert_eq!(channel.open_count(Side::Sender), 1);
    reap_until(&channel, &record.state, generation);
    assert_eq!(channel.open_count(Side::Sender), 1);
}

/// Reaps (this thread, or this process's watcher meanwhile) until `state` reads `expected`.
fn reap_until(channel: &Channel, state: &AtomicU64, expected: u64) {
    let started = std::time::Instant::now();
    while state.load(Ordering::Acquire) != expected {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "slot state {:#x}, expected {expected:#x}",
            state.load(Ordering::Acquire)
        );
        channel.reap_now();
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_segment_nobody_holds_is_marked_lost_once_and_never_retried() {
    // As if a producer grew the slab and died before any peer mapped the new segment.
    let channel = channel(2, 64 << 20);
    send(&channel, b"before").unwrap();
    let heap = &channel.control().heap;
    let mapped = heap.mapped_bytes.load(Ordering::Relaxed);
    let index = heap.segment_count.load(Ordering::Relaxed) as usize;
    let record = &heap.segments[index];
    record.len.store(1 << 20, Ordering::Relaxed);
    record.device.store(1, Ordering::Relaxed);
    record.inode.store(1, Ordering::Relaxed);
    heap.mapped_bytes.fetch_add(1 << 20, Ordering::Relaxed);
    heap.segment_count
        .store(index as u32 + 1, Ordering::Release);

    let error = channel.slab().attach_all().unwrap_err();
    assert!(matches!(error, Error::Closed(_)), "{error}");
    assert_eq!(record.lost.load(Ordering::Relaxed), 1);
    assert_eq!(heap.mapped_bytes.load(Ordering::Relaxed), mapped);
    // Known lost: not retried, and it does not stop the channel.
    channel.slab().attach_all().unwrap();
    let error = channel.slab().segment(index).unwrap_err();
    assert!(error.to_string().contains("was lost"), "{error}");
    assert_eq!(take(&channel).unwrap(), b"before");
    send(&channel, b"after").unwrap();
    assert_eq!(take(&channel).unwrap(), b"after");
    assert_eq!(channel.shared_stats().used_blocks, 0);
}

#[test]
fn attaching_never_opens_a_descriptor_that_is_not_the_segment() {
    // A live peer whose recorded descriptor number now names something else (here a plain
    // file; a tty or a FIFO in real life, where opening has effects): attaching must look
    // at it with stat, never open it. inotify reports every open of the file.
    let path = std::env::temp_dir().join(format!("tensorslab-test-{}", current_pid()));
    std::fs::write(&path, b"not a segment").unwrap();
    let mut peer = std::process::Command::new("sleep")
        .arg("30")
        .stdin(std::fs::File::open(&path).unwrap())
        .spawn()
        .unwrap();
    // SAFETY: plain syscalls on descriptors this test owns.
    let inotify = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(inotify >= 0);
    let cpath = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid inotify descriptor and a NUL-terminated path.
    assert!(unsafe { libc::inotify_add_watch(inotify, cpath.as_ptr(), libc::IN_OPEN) } >= 0);

    let channel = channel(2, 4 << 20);
    let id = ProcessId {
        pid: peer.id(),
        start_time: crate::shm::process_start_time(peer.id()).unwrap(),
    };
    let slot = channel.control().claim_slot(id, -1).unwrap();
    let record = &channel.control().processes[usize::from(slot.index)];
    let identity = FileIdentity {
        device: 1,
        inode: 1,
    };
    let result = channel
        .slab()
        .attach_from_peers(4096, identity, |candidate| {
            if std::ptr::eq(candidate, record) {
                0 // the peer's stdin: the plain file
            } else {
                -1
            }
        });
    let Err(error) = result else {
        panic!("attached a plain file as a segment");
    };
    assert!(
        error.to_string().contains("not the expected segment"),
        "{error}"
    );
    let mut events = [0u8; 256];
    // SAFETY: reading into a live buffer of the given length.
    let read = unsafe { libc::read(inotify, events.as_mut_ptr().cast(), events.len()) };
    assert!(
        read < 0,
        "the peer's descriptor was opened ({read} bytes of inotify events)"
    );

    channel.control().release_slot(slot);
    peer.kill().unwrap();
    peer.wait().unwrap();
    // SAFETY: closing the descriptor this test opened.
    unsafe { libc::close(inotify) };
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_release_that_finds_the_heap_lock_taken_is_deferred_not_waited_for() {
    let channel = channel(4, 16 << 20);
    send(&channel, b"held while the lock is taken").unwrap();
    let received = channel
        .receive(false, Deadline::never(), &mut no_interrupt())
        .unwrap();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (released_tx, released_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let channel = channel.clone();
        std::thread::spawn(move || {
            let _guard = channel.slab().lock(&channel.control().heap_lock).unwrap();
            locked_tx.send(()).unwrap();
            // Held until the release below has returned: a release that waited for the
            // lock would never return, and this would time out.
            released_rx.recv_timeout(Duration::from_secs(10)).is_ok()
        })
    };
    locked_rx.recv().unwrap();
    channel.release_message(received.block);
    released_tx.send(()).unwrap();
    assert!(
        holder.join().unwrap(),
        "release_message waited for the heap lock"
    );
    // Run here, or by the watcher thread the deferral woke (which may still be freeing).
    channel.run_deferred();
    let started = std::time::Instant::now();
    while channel.shared_stats().used_blocks != 0 && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(channel.shared_stats().used_blocks, 0);
    send(&channel, b"usable").unwrap();
    assert_eq!(take(&channel).unwrap(), b"usable");
}

#[test]
fn a_quick_abort_leaves_a_held_heap_lock_alone_and_the_block_still_comes_back() {
    // A quick put holds the GIL: when its publish gives up (`WouldBlock`) it must give the
    // block back without waiting for another holder of the heap lock.
    use std::sync::atomic::AtomicBool;
    let channel = channel(4, 16 << 20);
    let deadline = Deadline::after(Some(Duration::from_secs(5)));
    let allocation = channel
        .begin_put(64, true, deadline, &mut no_interrupt())
        .unwrap();
    let used = || channel.shared_stats().used_blocks;
    assert_eq!(used(), 1);
    let returned = AtomicBool::new(false);
    let (locked, is_locked) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let holder = scope.spawn(|| {
            let _guard = channel.slab.lock(&channel.control().heap_lock).unwrap();
            locked.send(()).unwrap();
            // Held until the abort returns, or long enough to show that it waited.
            let until = std::time::Instant::now() + Duration::from_secs(2);
            while !returned.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            returned.load(Ordering::SeqCst)
        });
        is_locked.recv().unwrap();
        {
            let _quick = crate::wait::quick_scope(true);
            channel.abort_put(&allocation);
        }
        returned.store(true, Ordering::SeqCst);
        assert!(
            holder.join().unwrap(),
            "the quick abort waited for the heap lock"
        );
    });
    // Deferred: the next normal call (or the watcher) frees it, and counts no acknowledgement.
    channel.run_deferred();
    assert_eq!(used(), 0);
    let slot = &channel.control().processes[usize::from(channel.slot())];
    assert_eq!(slot.outstanding.load(Ordering::SeqCst), 0);
    assert_eq!(slot.acked.load(Ordering::SeqCst), 0);
}

#[test]
fn a_long_spin_ends_at_the_calls_deadline() {
    // `spin_us=` may ask for up to a second of spinning; a get whose timeout is shorter
    // (here: passed already) must not spin past it. It spun the whole second. (A bound on
    // time, with a margin of hundreds of times what the call needs.)
    let channel = Channel::create(&ChannelOptions {
        capacity: 4,
        spin: MAX_SPIN,
        ..Default::default()
    })
    .unwrap();
    channel.open_handle(Side::Sender);
    channel.open_handle(Side::Receiver);
    let started = std::time::Instant::now();
    let outcome = channel.receive(
        true,
        Deadline::after(Some(Duration::ZERO)),
        &mut no_interrupt(),
    );
    assert!(matches!(outcome, Err(Error::Empty(_))));
    assert!(
        started.elapsed() < MAX_SPIN / 2,
        "get(timeout=0) spun for {:?}",
        started.elapsed()
    );
}
