//! Crash consistency of broadcast channels and mailboxes by fault injection: a real
//! process is SIGKILLed at each failpoint of the fan-out code (and of the allocator and
//! locks it uses) in each role, and the survivor checks:
//!
//! - every message a subscriber gets is intact and in order, none twice; a subscriber that
//!   outlives the kill gets every message whose publish returned (or counts it as missed
//!   under `drop_oldest`);
//! - once every view is dropped and everything read, the slab holds nothing but what is
//!   still retained (a mailbox keeps its newest version);
//! - the dead process's subscriber stops counting, and the channel still carries a
//!   message afterwards.
//!
//! Run with `cargo test --features failpoints --test failpoints_fanout` (its own harness:
//! the binary is re-executed as the child processes). It prints the matrix.
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tensorslab::channel::{Channel, ChannelOptions, Kind, SubscriberId, Ticket};
use tensorslab::header::FrameHeader;
use tensorslab::layout::SHARED_PREFIX_LEN;
use tensorslab::procs::Side;
use tensorslab::Result;

mod failpoint_harness;
use failpoint_harness::{
    deadline, fill_byte, finish, hex_decode, no_interrupt, numbers, reap_all, run_matrix,
    spawn_child, uvarint, Scenario, TIMEOUT,
};

const MESSAGES: u32 = 12;
/// Large enough that a dozen of them make the 1 MiB first segment grow.
const PAYLOAD: usize = 160 << 10;

const PUBLISHER_POINTS: &[&str] = &[
    "put.allocated",
    "allocate.taken",
    "grow.creating",
    "grow.created",
    "grow.published",
    "fanout.shared_before_push",
    "lock.acquired",
];
/// Points of a publisher that evicts (`drop_oldest`, depth 4).
const EVICTING_POINTS: &[&str] = &["fanout.evicted", "fanout.freeing", "free_message.freeing"];
const SUBSCRIBER_POINTS: &[&str] = &[
    "attach.mapped",
    "fanout.held_before_cursor",
    "fanout.evicted",
    "release.before",
    "fanout.freeing",
    "free_message.freeing",
    "lock.acquired",
];
const REAPER_POINTS: &[&str] = &[
    "reap.claimed",
    "fanout.reclaim_block",
    "fanout.freeing",
    "free_message.freeing",
    "reap.reclaimed",
    "lock.acquired",
];
const WRITER_POINTS: &[&str] = &[
    "put.allocated",
    "fanout.shared_before_push",
    "fanout.pushed_before_retiring",
    "fanout.evicted",
    "fanout.freeing",
    "lock.acquired",
];

fn new_channel(kind: Kind, depth: usize) -> Arc<Channel> {
    Channel::create(&ChannelOptions {
        capacity: depth,
        slab_bytes: Some(1 << 20),
        max_slab_bytes: Some(64 << 20),
        strict: false,
        kind,
        ..Default::default()
    })
    .unwrap()
}

const BLOCKING: Kind = Kind::Broadcast { drop_oldest: false };

/// Publishes message `seq`: a frame whose payload carries the sequence number.
fn publish(channel: &Channel, seq: u32) -> Result<()> {
    let mut stream = vec![];
    uvarint(0, &mut stream);
    let header = FrameHeader::new(0, stream.len(), 0, PAYLOAD).expect("small frame");
    let mut frame = header.to_bytes().to_vec();
    frame.extend_from_slice(&stream);
    frame.resize(header.payload_offset as usize, 0);
    frame.extend(std::iter::repeat_n(fill_byte(seq, 2), PAYLOAD));
    frame[header.payload_offset as usize..][..4].copy_from_slice(&seq.to_le_bytes());
    let allocation = channel.begin_publish(frame.len(), true, deadline(), &mut no_interrupt())?;
    // SAFETY: the block holds the prefix plus `frame.len()` bytes and is ours until
    // published.
    unsafe {
        std::ptr::copy_nonoverlapping(
            frame.as_ptr(),
            allocation.address.add(SHARED_PREFIX_LEN),
            frame.len(),
        )
    };
    let published = channel.publish_shared(&allocation, true, deadline(), &mut no_interrupt());
    if published.is_err() {
        channel.abort_put(&allocation);
    }
    published.map(drop)
}

/// A received message's sequence number, if it is intact.
fn check(address: *const u8, len: usize) -> std::result::Result<u32, String> {
    // SAFETY: `receive_*` checked `len` bytes at `address` lie in a block we hold.
    let frame = unsafe { std::slice::from_raw_parts(address, len) };
    let header = FrameHeader::read(frame).map_err(|e| e.to_string())?;
    let payload = &frame[header.payload_offset as usize..];
    let seq = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes"));
    if payload.len() != PAYLOAD || payload[4..].iter().any(|&b| b != fill_byte(seq, 2)) {
        return Err(format!("message {seq}: payload corrupt"));
    }
    Ok(seq)
}

/// Takes subscriber `id`'s next message without waiting: its sequence number (or
/// corruption), released before returning.
fn take(channel: &Channel, id: SubscriberId) -> Result<std::result::Result<u32, String>> {
    let received = channel.receive_subscriber(id, false, deadline(), &mut no_interrupt())?;
    let checked = check(received.address, received.len);
    channel.release_message(received.block);
    Ok(checked)
}

/// Everything subscriber `id` has left to read.
fn drain(channel: &Channel, id: SubscriberId) -> std::result::Result<Vec<u32>, String> {
    let mut seqs = vec![];
    loop {
        match take(channel, id) {
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

fn subscriber_from_env() -> SubscriberId {
    SubscriberId {
        index: std::env::var("TSL_FP_SUB_INDEX").unwrap().parse().unwrap(),
        generation: std::env::var("TSL_FP_SUB_GEN").unwrap().parse().unwrap(),
    }
}

fn subscriber_env(id: SubscriberId) -> [(&'static str, String); 2] {
    [
        ("TSL_FP_SUB_INDEX", id.index.to_string()),
        ("TSL_FP_SUB_GEN", id.generation.to_string()),
    ]
}

// ---- the child processes ----

fn child_main(role: &str) {
    let ticket = Ticket::from_bytes(&hex_decode(&std::env::var("TSL_FP_TICKET").unwrap())).unwrap();
    let channel = Channel::attach(&ticket).unwrap();
    channel.redeem(&ticket);
    match role {
        "publisher" => {
            for seq in 0..MESSAGES {
                publish(&channel, seq).unwrap();
                println!("published {seq}");
            }
        }
        "subscriber" | "holder" => {
            let id = subscriber_from_env();
            channel.open_subscriber(id).unwrap();
            println!("opened");
            let mut held = vec![];
            for _ in 0..MESSAGES {
                let received = channel
                    .receive_subscriber(id, true, deadline(), &mut no_interrupt())
                    .unwrap();
                match check(received.address, received.len) {
                    Ok(seq) => println!("received {seq}"),
                    Err(corrupt) => println!("corrupt {corrupt}"),
                }
                if role == "holder" {
                    held.push(received.block);
                    if held.len() == 3 {
                        println!("ready");
                        std::thread::sleep(Duration::from_secs(60));
                    }
                } else {
                    channel.release_message(received.block);
                }
            }
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

// ---- the scenarios ----

/// The invariants every scenario ends with: order and uniqueness of what `id` got, the
/// slab empty once `id` read everything (but `retained` blocks), and a round trip.
fn check_end(
    channel: &Channel,
    id: SubscriberId,
    delivered: &[u32],
    must: &[u32],
) -> std::result::Result<(), String> {
    if delivered.windows(2).any(|pair| pair[0] >= pair[1]) {
        return Err(format!("delivered out of order or twice: {delivered:?}"));
    }
    if let Some(missing) = must.iter().find(|seq| !delivered.contains(seq)) {
        return Err(format!("published message {missing} never delivered"));
    }
    let stats = channel.shared_stats();
    if stats.used_blocks != 0 || stats.used_bytes != 0 {
        return Err(format!(
            "slab not empty after everything was read and released: {} blocks, {} bytes",
            stats.used_blocks, stats.used_bytes
        ));
    }
    channel.open_handle(Side::Sender);
    channel.open_handle(Side::Receiver);
    let round_trip = publish(channel, 7)
        .map_err(|e| format!("publish afterwards: {e}"))
        .and_then(|()| take(channel, id).map_err(|e| format!("get afterwards: {e}")))
        .and_then(|checked| checked);
    channel.close_handle(Side::Sender);
    channel.close_handle(Side::Receiver);
    match round_trip {
        Ok(7) if channel.shared_stats().used_blocks == 0 => Ok(()),
        Ok(seq) => Err(format!("round trip gave {seq} or left memory in use")),
        Err(error) => Err(error),
    }
}

fn publisher_with(kind: Kind, depth: usize, point: &str) -> std::result::Result<bool, String> {
    let channel = new_channel(kind, depth);
    channel.open_handle(Side::Receiver);
    let id = channel.subscribe().map_err(|e| e.to_string())?;
    let child = spawn_child(
        &channel,
        "publisher",
        Side::Sender,
        Some(&format!("{point}=kill@3")),
        &[],
    );
    let (lines, killed) = finish(child);
    reap_all(&channel)?;
    let delivered = drain(&channel, id)?;
    let published = numbers(&lines, "published");
    let must: Vec<u32> = match kind {
        BLOCKING => published,
        // The newest `depth` are retained, less the one a publish killed after evicting
        // made room for; the others are counted as missed.
        _ => published.into_iter().rev().take(depth - 1).collect(),
    };
    let missed = channel.missed(id) as usize;
    if kind != BLOCKING && missed + delivered.len() < must.len() {
        return Err(format!("{missed} missed + {delivered:?} delivered"));
    }
    check_end(&channel, id, &delivered, &must)?;
    Ok(killed)
}

fn publisher_scenario(point: &str) -> std::result::Result<bool, String> {
    publisher_with(BLOCKING, 16, point)
}

fn evicting_publisher_scenario(point: &str) -> std::result::Result<bool, String> {
    publisher_with(Kind::Broadcast { drop_oldest: true }, 4, point)
}

/// A channel holding every message, read and released by this process's subscriber
/// (returned), and a second subscriber handed to a child in `role` once it opened it.
fn read_channel(
    role: &str,
    point: Option<&str>,
) -> std::result::Result<(Arc<Channel>, SubscriberId, std::process::Child), String> {
    let channel = new_channel(BLOCKING, 16);
    channel.open_handle(Side::Sender);
    channel.open_handle(Side::Receiver);
    let mine = channel.subscribe().map_err(|e| e.to_string())?;
    let theirs = channel.subscribe().map_err(|e| e.to_string())?;
    for seq in 0..MESSAGES {
        publish(&channel, seq).map_err(|e| format!("publish {seq}: {e}"))?;
    }
    let delivered = drain(&channel, mine)?;
    if delivered != (0..MESSAGES).collect::<Vec<_>>() {
        return Err(format!("this process's subscriber got {delivered:?}"));
    }
    let spec = point.map(|point| format!("{point}=kill@3"));
    let mut child = spawn_child(
        &channel,
        role,
        Side::Receiver,
        spec.as_deref(),
        &subscriber_env(theirs),
    );
    // Once the child holds its subscriber, only the child does.
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines().map_while(|l| l.ok());
    if !lines.any(|line| line == "opened") {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("the {role} never opened its subscriber"));
    }
    channel.close_subscriber(theirs);
    channel.close_handle(Side::Sender);
    channel.close_handle(Side::Receiver);
    // Keep reading its output (the pipe must not fill), hand the rest back.
    let rest: Vec<String> = if role == "holder" {
        lines.take_while(|line| line != "ready").collect()
    } else {
        lines.collect()
    };
    if let Some(corrupt) = rest.iter().find(|line| line.starts_with("corrupt")) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("the {role} saw {corrupt}"));
    }
    Ok((channel, mine, child))
}

fn subscriber_scenario(point: &str) -> std::result::Result<bool, String> {
    let (channel, mine, child) = read_channel("subscriber", Some(point))?;
    let (_, killed) = finish(child);
    reap_all(&channel)?;
    check_end(&channel, mine, &[], &[])?;
    Ok(killed)
}

fn reaper_scenario(point: &str) -> std::result::Result<bool, String> {
    let (channel, mine, mut holder) = read_channel("holder", None)?;
    holder.kill().unwrap();
    holder.wait().unwrap();
    let reaper = spawn_child(
        &channel,
        "reaper",
        Side::Receiver,
        Some(&format!("{point}=kill")),
        &[],
    );
    let (_, killed) = finish(reaper);
    reap_all(&channel)?;
    check_end(&channel, mine, &[], &[])?;
    Ok(killed)
}

/// A mailbox whose writer is killed while this process holds version 1: afterwards the
/// newest version is intact and the only one left once version 1 is dropped.
fn writer_scenario(point: &str) -> std::result::Result<bool, String> {
    let channel = new_channel(Kind::Latest, 1);
    channel.open_handle(Side::Sender);
    channel.open_handle(Side::Receiver);
    publish(&channel, 0).map_err(|e| format!("publish: {e}"))?;
    let (_, first) = channel
        .receive_latest(0, deadline(), &mut no_interrupt())
        .map_err(|e| e.to_string())?;
    let child = spawn_child(
        &channel,
        "publisher",
        Side::Sender,
        Some(&format!("{point}=kill@3")),
        &[],
    );
    channel.close_handle(Side::Sender);
    let (lines, killed) = finish(child);
    reap_all(&channel)?;
    channel.release_message(first.block);
    let published = numbers(&lines, "published");
    let (version, newest) = channel
        .receive_latest(0, deadline(), &mut no_interrupt())
        .map_err(|e| e.to_string())?;
    let seq = check(newest.address, newest.len)?;
    channel.release_message(newest.block);
    // The newest is the last publish that returned, or the one the kill interrupted
    // after it was pushed.
    let last = published.last().copied().unwrap_or(0);
    if seq != last && seq != last + 1 && !(published.is_empty() && seq <= 1) {
        return Err(format!(
            "newest is message {seq} (version {version}), last published {last}"
        ));
    }
    let used = channel.shared_stats().used_blocks;
    if used != 1 {
        return Err(format!(
            "{used} blocks in use with only the newest version retained"
        ));
    }
    Ok(killed)
}

fn main() {
    if let Ok(role) = std::env::var("TSL_FP_ROLE") {
        child_main(&role);
        return;
    }
    let roles: [(&str, &[&str], Scenario); 5] = [
        ("publisher", PUBLISHER_POINTS, publisher_scenario),
        ("evicting pub", EVICTING_POINTS, evicting_publisher_scenario),
        ("subscriber", SUBSCRIBER_POINTS, subscriber_scenario),
        ("reaper", REAPER_POINTS, reaper_scenario),
        ("mailbox writer", WRITER_POINTS, writer_scenario),
    ];
    run_matrix(
        "fan-out failpoint matrix (broadcast and mailbox; SIGKILL at the point; pass = \
         invariants hold afterwards)",
        &roles,
    );
}
