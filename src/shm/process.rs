//! Process identity and liveness: a pid plus its start time, so a pid reused by the kernel
//! is never mistaken for a live peer, and a three-way answer to "is it alive?".
//!
//! Only a definite answer means dead: `pidfd_open` or `/proc/<pid>/stat` saying the
//! process does not exist (`ESRCH`/`ENOENT`), a pidfd reporting exit, a zombie, or another
//! start time under the same pid. A process that cannot look (out of file descriptors, a
//! seccomp filter, `/proc` not mounted) gets [`Liveness::Unknown`] and must try again
//! later: treating "could not look" as "dead" once made a consumer at `RLIMIT_NOFILE`
//! reap its live producer.
//!
//! Where the kernel has pidfds (Linux 5.3+), a peer's pidfd is opened once (after its
//! start time was checked) and cached, so later checks are one `poll` that no pid reuse
//! can fool. The cache is bounded; past it, or without pidfds, each check reads `/proc`.
use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

/// A process as recorded in shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcessId {
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
    pub start_time: u64,
}

/// The answer to "is this process alive?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// Definitely gone (or a different process under the same pid).
    Dead,
    /// Could not look; ask again later. Never a reason to reap.
    Unknown,
}

/// Pidfds kept open for peers; past this, checks fall back to reading `/proc`.
const PIDFD_CACHE_LIMIT: usize = 64;

static PIDFDS: Mutex<Option<HashMap<ProcessId, i32>>> = Mutex::new(None);

impl ProcessId {
    /// This process. Fails when its start time cannot be read: a claim recorded with a
    /// wrong start time would make this process look dead to every peer.
    pub fn current() -> io::Result<ProcessId> {
        let pid = current_pid();
        let (_, start_time) = read_stat(pid)?;
        Ok(ProcessId { pid, start_time })
    }

    /// Whether the process exists and is the same process (not a reused pid). Zombies count
    /// as dead: they hold no memory any more. This process is alive to itself (a record of
    /// an earlier process that had its pid, with another start time, is not).
    pub fn liveness(&self) -> Liveness {
        if self.pid == current_pid() {
            // This process, unless the record is of an earlier process that had this pid
            // (then that one is gone). Could not look: this process, never reaped.
            return match read_stat(self.pid) {
                Ok((_, start_time)) if start_time != self.start_time => Liveness::Dead,
                _ => Liveness::Alive,
            };
        }
        if let Some(answer) = cached_pidfd_liveness(self) {
            return answer;
        }
        match open_pidfd(self.pid) {
            Ok(fd) => {
                let answer = from_stat(self, read_stat(self.pid));
                if answer == Liveness::Alive {
                    let answer = poll_exited(fd);
                    if answer == Liveness::Alive && cache_pidfd(self, fd) {
                        return answer;
                    }
                    close(fd);
                    return answer;
                }
                close(fd);
                answer
            }
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => Liveness::Dead,
            // No pidfds here (old kernel, seccomp) or no descriptor to spare: look in /proc.
            Err(_) => from_stat(self, read_stat(self.pid)),
        }
    }

    /// Shorthand for `liveness() == Alive` (tests and non-critical reporting).
    pub fn is_alive(&self) -> bool {
        self.liveness() == Liveness::Alive
    }
}

fn from_stat(id: &ProcessId, stat: io::Result<(char, u64)>) -> Liveness {
    match stat {
        Ok((state, start_time)) => {
            if state == 'Z' || state == 'X' || start_time != id.start_time {
                Liveness::Dead
            } else {
                Liveness::Alive
            }
        }
        Err(error) => match error.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ESRCH) => Liveness::Dead,
            _ => Liveness::Unknown,
        },
    }
}

fn open_pidfd(pid: u32) -> io::Result<i32> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd as i32)
}

/// A pidfd is readable once its process has exited (zombies included).
fn poll_exited(fd: i32) -> Liveness {
    let mut entry = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let ready = unsafe { libc::poll(&mut entry, 1, 0) };
    match ready {
        0 => Liveness::Alive,
        1 if entry.revents & (libc::POLLIN | libc::POLLHUP) != 0 => Liveness::Dead,
        _ => Liveness::Unknown,
    }
}

fn close(fd: i32) {
    // SAFETY: `fd` is a pidfd this module opened and nobody else uses.
    unsafe { libc::close(fd) };
}

/// `try_lock`: a fork child may inherit the cache locked by a thread that does not exist
/// there; it then reads `/proc` instead of waiting forever.
fn cached_pidfd_liveness(id: &ProcessId) -> Option<Liveness> {
    let mut guard = PIDFDS.try_lock().ok()?;
    let cache = guard.as_mut()?;
    let fd = *cache.get(id)?;
    let answer = poll_exited(fd);
    if answer == Liveness::Dead {
        cache.remove(id);
        close(fd);
    }
    Some(answer)
}

fn cache_pidfd(id: &ProcessId, fd: i32) -> bool {
    let Ok(mut guard) = PIDFDS.try_lock() else {
        return false;
    };
    let cache = guard.get_or_insert_with(HashMap::new);
    if cache.len() >= PIDFD_CACHE_LIMIT || cache.contains_key(id) {
        return false;
    }
    cache.insert(*id, fd);
    true
}

/// This process's pid, cached: `getpid` is a system call (glibc stopped caching it), and
/// every channel operation asks. Zero means "not known": a fork child starts with its
/// parent's value, so a `pthread_atfork` child handler (registered before the first value
/// is cached) clears it before `fork` returns there.
static PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

extern "C" fn forget_pid_in_child() {
    PID.store(0, std::sync::atomic::Ordering::Relaxed);
}

pub fn current_pid() -> u32 {
    use std::sync::atomic::Ordering::Relaxed;
    // Relaxed: the value is this process's own, written by this process only (or cleared
    // in a fork child by the only thread there).
    let cached = PID.load(Relaxed);
    if cached != 0 {
        return cached;
    }
    static HANDLER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: registers a handler that only stores to an atomic (async-signal-safe, as a
    // fork child handler must be); no pointer is passed.
    let registered = *HANDLER.get_or_init(
        || unsafe { libc::pthread_atfork(None, None, Some(forget_pid_in_child)) } == 0,
    );
    let pid = std::process::id();
    // Without the handler a cached pid could outlive a fork: then never cache.
    if registered {
        PID.store(pid, Relaxed);
    }
    pid
}

pub fn process_start_time(pid: u32) -> Option<u64> {
    read_stat(pid).ok().map(|(_, start)| start)
}

/// (state, start time) from `/proc/<pid>/stat`. The command name may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn read_stat(pid: u32) -> io::Result<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed /proc stat line");
    let rest = &text[text.rfind(')').ok_or_else(malformed)? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields
        .next()
        .and_then(|field| field.chars().next())
        .ok_or_else(malformed)?;
    // After the state come fields 4..; the start time is field 22, i.e. 19 further on.
    let start = fields
        .nth(18)
        .and_then(|field| field.parse().ok())
        .ok_or_else(malformed)?;
    Ok((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_alive_and_a_stale_start_time_is_not() {
        let me = ProcessId::current().unwrap();
        assert!(me.start_time > 0);
        assert_eq!(me.liveness(), Liveness::Alive);
        // Our parent is alive; with another start time it is another process.
        let parent = ProcessId {
            // SAFETY: getppid cannot fail.
            pid: unsafe { libc::getppid() } as u32,
            start_time: 0,
        };
        let parent = ProcessId {
            start_time: process_start_time(parent.pid).unwrap(),
            ..parent
        };
        assert_eq!(parent.liveness(), Liveness::Alive);
        assert_eq!(
            ProcessId {
                start_time: parent.start_time + 1,
                ..parent
            }
            .liveness(),
            Liveness::Dead
        );
    }

    #[test]
    fn exited_child_is_dead_through_a_cached_pidfd_too() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let id = ProcessId {
            pid: child.id(),
            start_time: process_start_time(child.id()).unwrap(),
        };
        assert_eq!(id.liveness(), Liveness::Alive);
        child.kill().unwrap();
        // Still a zombie until waited for: dead all the same.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(id.liveness(), Liveness::Dead);
        child.wait().unwrap();
        assert_eq!(id.liveness(), Liveness::Dead);
    }

    #[test]
    fn failure_to_look_is_unknown_not_dead() {
        let id = ProcessId {
            pid: 1,
            start_time: 1,
        };
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(from_stat(&id, Err(emfile)), Liveness::Unknown);
        let enoent = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(from_stat(&id, Err(enoent)), Liveness::Dead);
        assert_eq!(from_stat(&id, Ok(('S', 1))), Liveness::Alive);
        assert_eq!(from_stat(&id, Ok(('Z', 1))), Liveness::Dead);
        assert_eq!(from_stat(&id, Ok(('S', 2))), Liveness::Dead);
    }
}
