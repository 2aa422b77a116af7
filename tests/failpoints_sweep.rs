//! The shared liveness sweep (see "Sharing the sweep" in `channel/recovery.rs`) when the
//! process that claimed it is SIGKILLed at each step of it: the channel's next sweep is
//! then due one interval later, and the survivors must still notice the dead peers and
//! take back what they held, by their watcher alone (nobody calls anything) and in a call
//! blocked on a dead peer. This process never calls `reap_now`: only the periodic sweep may
//! reap here.
//!
//! Run with `cargo test --features failpoints --test failpoints_sweep` (a harness of its
//! own: the same binary is re-executed as the child processes). It prints the matrix.
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
    deadline, finish, hex_decode, no_interrupt, run_matrix, spawn_child, Scenario, TIMEOUT,
};

const MESSAGES: usize = 3;
const PAYLOAD: usize = 4096;
/// Set in this process while the children are set up, so that only the sweeper sweeps.
const NO_REAP: &str = "TENSORSLAB_FAILPOINT_NO_REAP";

/// The points of one sweep, in order: the claim of the channel's sweep, then the reap of
/// the dead peer it finds.
const SWEEPER_POINTS: &[&str] = &[
    "sweep.claimed",
    "reap.claimed",
    "reclaim.after_ring_snapshot",
    "reclaim.after_block",
    "reap.reclaimed",
];

fn put(channel: &Channel) -> Result<()> {
    let header = FrameHeader::new(0, 0, 0, PAYLOAD).expect("small frame");
    let mut frame = header.to_bytes().to_vec();
    frame.resize(header.payload_offset as usize + PAYLOAD, 7);
    let allocation = channel.begin_put(frame.len(), true, deadline(), &mut no_interrupt())?;
    // SAFETY: the block holds at least `frame.len()` bytes and is ours until published.
    unsafe { std::ptr::copy_nonoverlapping(frame.as_ptr(), allocation.address, frame.len()) };
    let published = channel.publish(&allocation, &[], true, deadline(), &mut no_interrupt());
    if published.is_err() {
        channel.abort_put(&allocation);
    }
    published
}

fn child_main(role: &str) {
    let ticket = Ticket::from_bytes(&hex_decode(&std::env::var("TSL_FP_TICKET").unwrap())).unwrap();
    let channel = Channel::attach(&ticket).unwrap();
    channel.redeem(&ticket);
    match role {
        // Takes a message and holds it until killed.
        "holder" => {
            let _held = channel
                .receive(true, deadline(), &mut no_interrupt())
                .unwrap();
            println!("ready");
            std::thread::sleep(Duration::from_secs(60));
        }
        // Holds its sender handle until killed.
        "sender" => {
            println!("ready");
            std::thread::sleep(Duration::from_secs(60));
        }
        // Asks for the channel's sweep until the failpoint kills it (`spawn_child` lets
        // this role sweep).
        "reaper" => {
            let started = Instant::now();
            while started.elapsed() < TIMEOUT {
                channel.reap_if_due();
                std::thread::sleep(Duration::from_millis(5));
            }
            println!("never killed");
        }
        other => panic!("unknown role {other}"),
    }
}

fn new_channel() -> Arc<Channel> {
    Channel::create(&ChannelOptions {
        capacity: 8,
        slab_bytes: Some(1 << 20),
        max_slab_bytes: Some(8 << 20),
        ..Default::default()
    })
    .unwrap()
}

/// Starts `role` and waits for its "ready".
fn start_ready(channel: &Channel, role: &str, side: Side) -> Child {
    let mut child = spawn_child(channel, role, side, None, &[]);
    let stdout = child.stdout.take().unwrap();
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(|l| l.ok())
        .any(|line| line == "ready");
    assert!(ready, "the {role} never got ready");
    child
}

fn kill(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Starts the sweeper with `point` armed and waits for it to die there; then lets this
/// process sweep.
fn sweeper_dies_at(channel: &Channel, point: &str) -> std::result::Result<(), String> {
    let sweeper = spawn_child(
        channel,
        "reaper",
        Side::Receiver,
        Some(&format!("{point}=kill")),
        &[],
    );
    let (lines, killed) = finish(sweeper);
    std::env::remove_var(NO_REAP);
    if killed {
        Ok(())
    } else {
        Err(format!("the sweeper never reached {point}: {lines:?}"))
    }
}

/// A consumer dies holding a message; the sweeper dies at `point`; this process's watcher
/// must reap both and free the message, with nobody calling anything here.
fn watcher_scenario(point: &str) -> std::result::Result<bool, String> {
    std::env::set_var(NO_REAP, "1");
    let channel = new_channel();
    channel.open_handle(Side::Sender);
    channel.open_handle(Side::Receiver);
    for _ in 0..MESSAGES {
        put(&channel).map_err(|e| format!("put: {e}"))?;
    }
    let holder = start_ready(&channel, "holder", Side::Receiver);
    kill(holder);
    sweeper_dies_at(&channel, point)?;
    let me = std::process::id();
    let started = Instant::now();
    loop {
        let stats = channel.shared_stats();
        // Only the queued messages are left: the held one came back.
        if stats.processes == [me] && stats.used_blocks == (MESSAGES - 1) as u64 {
            break;
        }
        if started.elapsed() > TIMEOUT {
            return Err(format!(
                "after {TIMEOUT:?}: processes {:?}, {} blocks in use (want only this one and {})",
                stats.processes,
                stats.used_blocks,
                MESSAGES - 1
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    channel.close_handle(Side::Sender);
    channel.close_handle(Side::Receiver);
    Ok(true)
}

/// The only sender dies; the sweeper dies having claimed the sweep; a receive blocked here
/// must end with `PeerGone`, not wait out its timeout.
fn blocked_call_scenario(point: &str) -> std::result::Result<bool, String> {
    std::env::set_var(NO_REAP, "1");
    let channel = new_channel();
    channel.open_handle(Side::Receiver);
    let sender = start_ready(&channel, "sender", Side::Sender);
    kill(sender);
    sweeper_dies_at(&channel, point)?;
    let started = Instant::now();
    let outcome = channel.receive(true, deadline(), &mut no_interrupt());
    channel.close_handle(Side::Receiver);
    match outcome {
        Err(tensorslab::Error::PeerGone(_)) => Ok(true),
        Err(error) => Err(format!(
            "the blocked receive ended after {:?} with {error}",
            started.elapsed()
        )),
        Ok(_) => Err("the blocked receive got a message nobody sent".into()),
    }
}

fn main() {
    if let Ok(role) = std::env::var("TSL_FP_ROLE") {
        child_main(&role);
        return;
    }
    let roles: &[(&str, &[&str], Scenario)] = &[
        ("sweeper", SWEEPER_POINTS, watcher_scenario),
        ("sweeper", &["sweep.claimed"], blocked_call_scenario),
    ];
    run_matrix("the shared sweep, its sweeper killed", roles);
}
