//! What both failpoint matrices (`failpoints.rs`, `failpoints_fanout.rs`) share: child
//! processes started from the same binary with a ticket and a failpoint, their output, and
//! message payloads that carry their sequence number.
#![allow(dead_code)] // each matrix uses its own part
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tensorslab::channel::Channel;
use tensorslab::procs::Side;
use tensorslab::wait::Deadline;
use tensorslab::Result;

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub fn no_interrupt() -> impl FnMut() -> Result<()> {
    || Ok(())
}

pub fn deadline() -> Deadline {
    Deadline::after(Some(TIMEOUT))
}

pub fn fill_byte(seq: u32, salt: u32) -> u8 {
    ((seq * 31 + salt) % 251) as u8
}

pub fn uvarint(mut value: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn hex_decode(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// Starts this binary again as a child in `role`, with a ticket for `side` (and
/// `extra` environment), SIGKILLed or stalled at `failpoint` if given.
pub fn spawn_child(
    channel: &Channel,
    role: &str,
    side: Side,
    failpoint: Option<&str>,
    extra: &[(&str, String)],
) -> Child {
    let ticket = channel.ticket(side).unwrap();
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .env("TSL_FP_ROLE", role)
        .env("TSL_FP_TICKET", hex_encode(&ticket.to_bytes()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in extra {
        command.env(name, value);
    }
    match failpoint {
        Some(spec) => command.env("TENSORSLAB_FAILPOINT", spec),
        None => command.env_remove("TENSORSLAB_FAILPOINT"),
    };
    if role == "reaper" {
        command.env_remove("TENSORSLAB_FAILPOINT_NO_REAP");
    }
    command.spawn().unwrap()
}

/// Waits for the child (bounded); returns its output lines (stdout unless taken, then
/// stderr) and
/// whether SIGKILL ended it.
pub fn finish(mut child: Child) -> (Vec<String>, bool) {
    let stderr = child.stderr.take();
    let errors = std::thread::spawn(move || {
        stderr.map_or_else(Vec::new, |stderr| {
            BufReader::new(stderr)
                .lines()
                .map_while(|l| l.ok())
                .collect::<Vec<String>>()
        })
    });
    // A caller may have read (and taken) stdout already.
    let mut lines: Vec<String> = child.stdout.take().map_or_else(Vec::new, |stdout| {
        BufReader::new(stdout)
            .lines()
            .map_while(|l| l.ok())
            .collect()
    });
    lines.extend(errors.join().unwrap_or_default());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > 2 * TIMEOUT {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (lines, status.signal() == Some(libc::SIGKILL))
}

pub fn numbers(lines: &[String], word: &str) -> Vec<u32> {
    lines
        .iter()
        .filter_map(|line| line.strip_prefix(word)?.trim().parse().ok())
        .collect()
}

/// Reaps until no process but this one is attached.
pub fn reap_all(channel: &Channel) -> std::result::Result<(), String> {
    let started = Instant::now();
    let me = std::process::id();
    loop {
        channel.reap_now();
        let others: Vec<u32> = channel
            .control()
            .pids(None)
            .into_iter()
            .filter(|&p| p != me)
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        if started.elapsed() > TIMEOUT {
            return Err(format!(
                "processes {others:?} still attached after {TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs every point of every role; prints the matrix and exits non-zero on a failure.
/// A scenario returns whether the process was killed (or stalled) there, or what broke.
pub type Scenario = fn(&str) -> std::result::Result<bool, String>;

pub fn run_matrix(title: &str, roles: &[(&str, &[&str], Scenario)]) {
    // This process reaps only when a scenario says so (`reap_now`), so the reaper role
    // really is the process that reaps.
    std::env::set_var("TENSORSLAB_FAILPOINT_NO_REAP", "1");
    let mut failures = vec![];
    println!("{title}");
    println!("{:<30} {:<14} result", "point", "role");
    for &(role, points, scenario) in roles {
        for point in points {
            let started = Instant::now();
            let outcome = match scenario(point) {
                Ok(true) => "pass".to_string(),
                Ok(false) => format!("FAIL: the {role} never reached {point}"),
                Err(error) => format!("FAIL: {error}"),
            };
            println!(
                "{point:<30} {role:<14} {outcome} ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
            if outcome != "pass" {
                failures.push(format!("{point} as {role}: {outcome}"));
            }
        }
    }
    if !failures.is_empty() {
        eprintln!(
            "{} of the matrix failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
        std::process::exit(1);
    }
    println!("every point passed in every role");
}
