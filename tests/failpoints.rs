//! Crash consistency by fault injection: every failpoint of the core, in every role
//! (producer, consumer, the process that reaps a dead peer), SIGKILLs a real process there;
//! the survivor then checks the invariants:
//!
//! - every message whose `publish` returned is delivered exactly once, or at most once if
//!   the consumer that took it died; none is delivered twice; none is partial or corrupt
//!   (frame payload and the `alloc` buffer it references both carry the sequence number);
//! - once every message is released, the slab holds nothing (`used_bytes`, `used_blocks`);
//! - the open handle counts match the processes alive; no call blocks past its timeout;
//!   the channel still carries a message afterwards.
//!
//! Run with `cargo test --features failpoints --test failpoints` (a harness of its own:
//! the same binary is re-executed as the child processes). It prints the matrix.
use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tensorslab::channel::{Channel, ChannelOptions, Ticket};
use tensorslab::header::FrameHeader;
use tensorslab::procs::Side;
use tensorslab::Result;

mod failpoint_harness;
use failpoint_harness::{
    deadline, fill_byte, finish, hex_decode, no_interrupt, numbers, reap_all, run_matrix,
    spawn_child, uvarint, Scenario, TIMEOUT,
};

const MESSAGES: u32 = 12;
const PAYLOAD: usize = 4096;
/// Large enough that a dozen of them make the 1 MiB first segment grow.
const BUFFER: usize = 160 << 10;

const PRODUCER_POINTS: &[&str] = &[
    "put.allocated",
    "allocate.taken",
    "grow.creating",
    "segment.populating",
    "grow.created",
    "grow.published",
    "commit_message.counting",
    "publish.before_push",
    "publish.after_push",
    "drop_creator.dropping",
    "lock.acquired",
];
const CONSUMER_POINTS: &[&str] = &[
    "pop.owned_before_head_moves",
    "pop.after_head_moved",
    "attach.mapped",
    "release.before",
    "free_message.dropping",
    "free_message.freeing",
    "lock.acquired",
];
/// Points where a consumer stalls (alive, just slow) on every hit while the producer sends:
/// nobody may take it for dead and break its locks.
const STALLED_POINTS: &[&str] = &[
    "lock.acquired",
    "pop.owned_before_head_moves",
    "free_message.freeing",
];
const REAPER_POINTS: &[&str] = &[
    "reap.claimed",
    "reclaim.after_ring_snapshot",
    "free_message.dropping",
    "free_message.freeing",
    "reclaim.after_block",
    "reap.reclaimed",
    "lock.acquired",
];

/// Puts message `seq`: an `alloc` buffer filled in place, referenced by a frame whose
/// payload carries the sequence number too. The creator then lets go of the buffer.
fn put_message(channel: &Channel, seq: u32) -> Result<()> {
    let buffer = channel.allocate_buffer(BUFFER, deadline(), &mut no_interrupt())?;
    // SAFETY: the buffer has `BUFFER` bytes of capacity and is ours until published.
    unsafe { std::ptr::write_bytes(buffer.address, fill_byte(seq, 1), BUFFER) };
    let mut stream = vec![];
    uvarint(1, &mut stream);
    uvarint(buffer.block.link(), &mut stream);
    let header = FrameHeader::new(0, stream.len(), 0, PAYLOAD).expect("small frame");
    let mut frame = header.to_bytes().to_vec();
    frame.extend_from_slice(&stream);
    frame.resize(header.payload_offset as usize, 0);
    frame.extend(std::iter::repeat_n(fill_byte(seq, 2), PAYLOAD));
    frame[header.payload_offset as usize..][..4].copy_from_slice(&seq.to_le_bytes());
    let allocation = channel.begin_put(frame.len(), true, deadline(), &mut no_interrupt())?;
    // SAFETY: the block holds at least `frame.len()` bytes and is ours until published.
    unsafe { std::ptr::copy_nonoverlapping(frame.as_ptr(), allocation.address, frame.len()) };
    let published = channel.publish(
        &allocation,
        &[buffer.block],
        true,
        deadline(),
        &mut no_interrupt(),
    );
    if published.is_err() {
        channel.abort_put(&allocation);
    }
    channel.release_buffer(buffer.block);
    published
}

/// A received message's sequence number, if it is intact (frame and buffer).
fn check_message(
    channel: &Channel,
    address: *const u8,
    len: usize,
) -> std::result::Result<u32, String> {
    // SAFETY: `receive` checked `len` bytes at `address` lie in a block we hold.
    let frame = unsafe { std::slice::from_raw_parts(address, len) };
    let header = FrameHeader::read(frame).map_err(|e| e.to_string())?;
    let payload = &frame[header.payload_offset as usize..];
    let seq = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes"));
    if payload.len() != PAYLOAD || payload[4..].iter().any(|&b| b != fill_byte(seq, 2)) {
        return Err(format!("message {seq}: payload corrupt"));
    }
    let buffers = tensorslab::header::frame_buffers(frame).map_err(|e| e.to_string())?;
    let [buffer] = buffers[..] else {
        return Err(format!("message {seq}: {} buffers", buffers.len()));
    };
    let (_, data, capacity) = channel.slab().content(buffer).map_err(|e| e.to_string())?;
    if capacity < BUFFER {
        return Err(format!("message {seq}: buffer of {capacity} bytes"));
    }
    // SAFETY: `content` checked the block's `capacity` bytes lie in its segment.
    let data = unsafe { std::slice::from_raw_parts(data, BUFFER) };
    if data.iter().any(|&b| b != fill_byte(seq, 1)) {
        return Err(format!("message {seq}: alloc buffer overwritten"));
    }
    Ok(seq)
}

/// Takes one message: its sequence number (or corruption), released before returning.
fn take(channel: &Channel, block: bool) -> Result<std::result::Result<u32, String>> {
    let received = channel.receive(block, deadline(), &mut no_interrupt())?;
    let checked = check_message(channel, received.address, received.len);
    channel.release_message(received.block);
    Ok(checked)
}

// ---- the child processes ----

fn child_main(role: &str) {
    let ticket = Ticket::from_bytes(&hex_decode(&std::env::var("TSL_FP_TICKET").unwrap())).unwrap();
    let channel = Channel::attach(&ticket).unwrap();
    channel.redeem(&ticket);
    match role {
        "producer" => {
            for seq in 0..MESSAGES {
                put_message(&channel, seq).unwrap();
                println!("published {seq}");
            }
        }
        "consumer" => {
            for _ in 0..MESSAGES {
                match take(&channel, true).unwrap() {
                    Ok(seq) => println!("received {seq}"),
                    Err(corrupt) => println!("corrupt {corrupt}"),
                }
            }
        }
        "holder" => {
            let held: Vec<_> = (0..3)
                .map(|_| {
                    channel
                        .receive(true, deadline(), &mut no_interrupt())
                        .unwrap()
                })
                .collect();
            for received in &held {
                let seq = check_message(&channel, received.address, received.len).unwrap();
                println!("held {seq}");
            }
            println!("ready");
            std::thread::sleep(Duration::from_secs(60));
        }
        "reaper" => {
            let started = Instant::now();
            while channel.reap_now() == 0 && started.elapsed() < TIMEOUT {
                std::thread::sleep(Duration::from_millis(5));
            }
            println!("reaped");
        }
        other => panic!("unknown role {other}"),
    }
    channel.close_handle(ticket.side);
}

fn spawn(channel: &Channel, role: &str, side: Side, failpoint: Option<&str>) -> Child {
    spawn_child(channel, role, side, failpoint, &[])
}

// ---- the scenarios ----

fn new_channel() -> Arc<Channel> {
    Channel::create(&ChannelOptions {
        capacity: 64,
        slab_bytes: Some(1 << 20),
        max_slab_bytes: Some(64 << 20),
        strict: false,
        ..Default::default()
    })
    .unwrap()
}

/// A channel holding every message, with this process's sender (and a receiver, to be
/// closed once a consumer has its ticket) open.
fn filled_channel() -> std::result::Result<Arc<Channel>, String> {
    let channel = new_channel();
    channel.open_handle(Side::Sender);
    channel.open_handle(Side::Receiver);
    for seq in 0..MESSAGES {
        put_message(&channel, seq).map_err(|e| format!("put {seq}: {e}"))?;
    }
    Ok(channel)
}

/// Receives in this process until the channel is empty (or closed): the sequence numbers.
fn drain(channel: &Channel) -> std::result::Result<Vec<u32>, String> {
    let mut seqs = vec![];
    loop {
        match take(channel, false) {
            Ok(Ok(seq)) => seqs.push(seq),
            Ok(Err(corrupt)) => return Err(corrupt),
            Err(
                tensorslab::Error::Empty(_)
                | tensorslab::Error::Closed(_)
                | tensorslab::Error::PeerGone(_),
            ) => return Ok(seqs),
            Err(error) => return Err(format!("drain: {error}")),
        }
    }
}

/// The invariants every scenario ends with. `delivered` are all deliveries seen;
/// `must` the messages that must have arrived; `may_lose` how many of the others may be
/// missing (held by a consumer that died).
fn check_end(
    channel: &Channel,
    delivered: &[u32],
    must: &[u32],
    may_lose: usize,
) -> std::result::Result<(), String> {
    let mut sorted = delivered.to_vec();
    sorted.sort_unstable();
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(format!("message {} delivered twice", pair[0]));
    }
    if let Some(missing) = must.iter().find(|seq| !sorted.contains(seq)) {
        return Err(format!("published message {missing} never delivered"));
    }
    let lost = MESSAGES as usize - sorted.len();
    if must.len() == MESSAGES as usize && lost > may_lose {
        return Err(format!("{lost} messages lost (at most {may_lose} may be)"));
    }
    let stats = channel.shared_stats();
    if stats.used_blocks != 0 || stats.used_bytes != 0 {
        return Err(format!(
            "slab not empty after every release: {} blocks, {} bytes",
            stats.used_blocks, stats.used_bytes
        ));
    }
    // Still usable, by this process on both sides.
    channel.open_handle(Side::Sender);
    channel.open_handle(Side::Receiver);
    let (senders, receivers) = (
        channel.open_count(Side::Sender),
        channel.open_count(Side::Receiver),
    );
    let round_trip = put_message(channel, 7)
        .map_err(|e| format!("put afterwards: {e}"))
        .and_then(|()| take(channel, true).map_err(|e| format!("get afterwards: {e}")))
        .and_then(|checked| checked);
    channel.close_handle(Side::Sender);
    channel.close_handle(Side::Receiver);
    if (senders, receivers) != (1, 1) {
        let control = channel.control();
        let pending: Vec<String> = control
            .handles
            .pending
            .iter()
            .map(|cell| cell.load(std::sync::atomic::Ordering::Relaxed))
            .filter(|&entry| entry != 0)
            .map(|entry| format!("{entry:#x}"))
            .collect();
        let slots: Vec<String> = control.processes[..8]
            .iter()
            .map(|slot| {
                format!(
                    "{:#x}:{}/{}",
                    slot.state.load(std::sync::atomic::Ordering::Relaxed),
                    slot.senders.load(std::sync::atomic::Ordering::Relaxed),
                    slot.receivers.load(std::sync::atomic::Ordering::Relaxed)
                )
            })
            .collect();
        return Err(format!(
            "handle counts {senders}/{receivers} with one process left (slots {slots:?}, pending {pending:?})"
        ));
    }
    match round_trip {
        Ok(7) if channel.shared_stats().used_blocks == 0 => Ok(()),
        Ok(seq) => Err(format!("round trip gave {seq} or left memory in use")),
        Err(error) => Err(error),
    }
}

fn producer_scenario(point: &str) -> std::result::Result<bool, String> {
    let channel = new_channel();
    channel.open_handle(Side::Receiver);
    let child = spawn(
        &channel,
        "producer",
        Side::Sender,
        Some(&format!("{point}=kill@3")),
    );
    let (lines, killed) = finish(child);
    reap_all(&channel)?;
    let delivered = drain(&channel)?;
    channel.close_handle(Side::Receiver);
    check_end(
        &channel,
        &delivered,
        &numbers(&lines, "published"),
        MESSAGES as usize,
    )?;
    Ok(killed)
}

fn consumer_scenario(point: &str) -> std::result::Result<bool, String> {
    let channel = filled_channel()?;
    let child = spawn(
        &channel,
        "consumer",
        Side::Receiver,
        Some(&format!("{point}=kill@3")),
    );
    channel.close_handle(Side::Receiver);
    let (lines, killed) = finish(child);
    channel.close_handle(Side::Sender);
    if let Some(corrupt) = lines.iter().find(|line| line.starts_with("corrupt")) {
        return Err(format!("consumer saw {corrupt}"));
    }
    reap_all(&channel)?;
    let mut delivered = numbers(&lines, "received");
    delivered.extend(drain(&channel)?);
    let all: Vec<u32> = (0..MESSAGES).collect();
    // The consumer may die holding the message it took (delivered at most once).
    check_end(&channel, &delivered, &[], 1).and_then(|()| {
        let lost = all.iter().filter(|seq| !delivered.contains(seq)).count();
        (lost <= 1)
            .then_some(())
            .ok_or(format!("{lost} messages lost"))
    })?;
    Ok(killed)
}

fn stalled_consumer_scenario(point: &str) -> std::result::Result<bool, String> {
    let channel = new_channel();
    channel.open_handle(Side::Sender);
    channel.open_handle(Side::Receiver);
    let child = spawn(
        &channel,
        "consumer",
        Side::Receiver,
        Some(&format!("{point}=stall:30")),
    );
    channel.close_handle(Side::Receiver);
    let put = (0..MESSAGES).try_for_each(|seq| {
        put_message(&channel, seq).map_err(|e| format!("put {seq} beside a slow consumer: {e}"))
    });
    let (lines, killed) = finish(child);
    put?;
    channel.close_handle(Side::Sender);
    if killed {
        return Err("the stalled consumer was killed".into());
    }
    if let Some(corrupt) = lines.iter().find(|line| line.starts_with("corrupt")) {
        return Err(format!("consumer saw {corrupt}"));
    }
    reap_all(&channel)?;
    let all: Vec<u32> = (0..MESSAGES).collect();
    check_end(&channel, &numbers(&lines, "received"), &all, 0)?;
    if lines
        .iter()
        .any(|line| line.starts_with("tensorslab failpoint"))
    {
        Ok(true)
    } else {
        Err(format!(
            "never stalled: {:?}",
            &lines[lines.len().saturating_sub(3)..]
        ))
    }
}

fn reaper_scenario(point: &str) -> std::result::Result<bool, String> {
    let channel = filled_channel()?;
    // A consumer that takes three messages, holds them, and is killed.
    let mut holder = spawn(&channel, "holder", Side::Receiver, None);
    channel.close_handle(Side::Receiver);
    let stdout = holder.stdout.take().unwrap();
    let mut held = vec![];
    for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
        if line == "ready" {
            break;
        }
        held.extend(numbers(&[line], "held"));
    }
    holder.kill().unwrap();
    holder.wait().unwrap();
    let reaper = spawn(
        &channel,
        "reaper",
        Side::Receiver,
        Some(&format!("{point}=kill")),
    );
    let (_, killed) = finish(reaper);
    channel.close_handle(Side::Sender);
    reap_all(&channel)?;
    let delivered = drain(&channel)?;
    let expected: Vec<u32> = (0..MESSAGES).filter(|seq| !held.contains(seq)).collect();
    if held.len() != 3 {
        return Err(format!("the holder took {held:?}"));
    }
    check_end(&channel, &delivered, &expected, 3)?;
    Ok(killed)
}

fn main() {
    if let Ok(role) = std::env::var("TSL_FP_ROLE") {
        child_main(&role);
        return;
    }
    let roles: [(&str, &[&str], Scenario); 4] = [
        ("producer", PRODUCER_POINTS, producer_scenario),
        ("consumer", CONSUMER_POINTS, consumer_scenario),
        ("slow consumer", STALLED_POINTS, stalled_consumer_scenario),
        ("reaper", REAPER_POINTS, reaper_scenario),
    ];
    run_matrix(
        "failpoint matrix (SIGKILL at the point, or a 30 ms stall at every hit for the slow \
         consumer; pass = invariants hold afterwards)",
        &roles,
    );
}
