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
//! start time was checked) and cached, so later checks need no `/proc` read and no pid
//! reuse can fool them. A sweep over every peer of a channel takes a [`Census`] first: one
//! `poll` over every cached pidfd, after which each cached peer is answered from memory, so
//! a sweep costs a constant number of system calls however many peers there are (plus one
//! look-up per peer never seen before). The census also closes the pidfds of processes
//! that exited, so peers that came and went do not fill the cache. The cache holds up to
//! one pidfd per process slot ([`layout::MAX_PROCESSES`](crate::layout::MAX_PROCESSES)),
//! less where `RLIMIT_NOFILE` is low (a quarter of it, so the cache never takes the
//! descriptors the program needs); past it, or without pidfds, each check reads `/proc`.
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

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

/// Pidfds kept open for peers at most, where `RLIMIT_NOFILE` allows (see `cache_limit`).
const PIDFD_CACHE_MAX: usize = crate::layout::MAX_PROCESSES;

static PIDFDS: Mutex<Option<HashMap<ProcessId, Pidfd>>> = Mutex::new(None);

/// A cached pidfd, with the identity (device, inode) its descriptor had when opened: the
/// number may be closed behind the cache's back (a program closing descriptors it does not
/// own) and reused for another file, which `poll` calls readable ("exited") or invalid. A
/// decision taken on a pidfd's word (dead; close it) is first checked against the identity,
/// so a reused number neither reaps a live peer nor closes the program's file. (Pidfds have
/// an inode each from Linux 6.9, pidfs; before, every anonymous-inode file shares one.)
#[derive(Clone, Copy)]
struct Pidfd {
    fd: i32,
    identity: (u64, u64),
}

impl Pidfd {
    fn new(fd: i32) -> Option<Pidfd> {
        Some(Pidfd {
            fd,
            identity: fd_identity(fd)?,
        })
    }

    /// Whether the number still holds the descriptor this was made from.
    fn still_ours(&self) -> bool {
        fd_identity(self.fd) == Some(self.identity)
    }
}

fn fd_identity(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: `stat` is plain old data that fstat fills.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat only writes the live `stat`; a closed number answers EBADF.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 {
        return None;
    }
    Some((stat.st_dev as u64, stat.st_ino as u64))
}

/// This process's start time, once read, under the pid it was read for (a fork child has
/// another pid, so it reads its own). The start time is stored first (Release on the pid).
static OWN_PID: AtomicU32 = AtomicU32::new(0);
static OWN_START_TIME: AtomicU64 = AtomicU64::new(0);

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
            return self.own_liveness();
        }
        if let Some(answer) = cached_pidfd_liveness(self) {
            return answer;
        }
        self.look_up()
    }

    /// This process, unless the record is of an earlier process that had this pid (then
    /// that one is gone). Could not look: this process, never reaped.
    fn own_liveness(&self) -> Liveness {
        match own_start_time(self.pid) {
            Some(start_time) if start_time != self.start_time => Liveness::Dead,
            _ => Liveness::Alive,
        }
    }

    /// A peer with no cached pidfd: opens one (and caches it) or reads `/proc`.
    fn look_up(&self) -> Liveness {
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

/// One look at every cached pidfd, for a sweep over many peers (see the module docs).
pub struct Census {
    me: u32,
    alive: HashSet<ProcessId>,
    exited: HashSet<ProcessId>,
    /// Peers asked about that the census had not seen (each then looked up on its own).
    unseen: Cell<usize>,
}

impl Census {
    /// Polls every cached pidfd once, closing those whose process exited. A cache that
    /// cannot be taken (a fork child inherited it locked) makes an empty census: every
    /// peer is then looked up as by [`ProcessId::liveness`].
    pub fn take() -> Census {
        let mut census = Census {
            me: current_pid(),
            alive: HashSet::new(),
            exited: HashSet::new(),
            unseen: Cell::new(0),
        };
        let Some(mut guard) = lock_cache() else {
            return census;
        };
        let Some(cache) = guard.as_mut() else {
            return census;
        };
        let ids: Vec<ProcessId> = cache.keys().copied().collect();
        let mut entries: Vec<libc::pollfd> = ids
            .iter()
            .map(|id| libc::pollfd {
                fd: cache[id].fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `entries` is a live array of `entries.len()` pollfds; zero timeout.
        let ready = unsafe { libc::poll(entries.as_mut_ptr(), entries.len() as libc::nfds_t, 0) };
        if ready < 0 {
            return census; // EINTR, ENOMEM: look each peer up instead
        }
        for (id, entry) in ids.iter().zip(&entries) {
            if entry.revents == 0 {
                census.alive.insert(*id);
            } else if !cache[id].still_ours() {
                // Closed behind the cache (POLLNVAL), perhaps reused: not a word about the
                // process. Forgotten, not closed; `liveness` looks the process up afresh.
                cache.remove(id);
            } else if entry.revents & (libc::POLLIN | libc::POLLHUP) != 0 {
                census.exited.insert(*id);
                if let Some(pidfd) = cache.remove(id) {
                    close(pidfd.fd);
                }
            }
            // POLLERR: neither; `liveness` asks that one again on its own.
        }
        census
    }

    /// [`ProcessId::liveness`], answered from the census for the peers it saw.
    pub fn liveness(&self, id: &ProcessId) -> Liveness {
        if id.pid == self.me {
            id.own_liveness()
        } else if self.alive.contains(id) {
            Liveness::Alive
        } else if self.exited.contains(id) {
            Liveness::Dead
        } else {
            self.unseen.set(self.unseen.get() + 1);
            id.liveness()
        }
    }

    /// How many peers asked about were not in the census (see `unseen`).
    pub fn unseen(&self) -> usize {
        self.unseen.get()
    }
}

fn own_start_time(pid: u32) -> Option<u64> {
    // Acquire: pairs with the Release store of the pid below, so the start time read is
    // the one stored for this pid.
    if OWN_PID.load(Ordering::Acquire) == pid {
        return Some(OWN_START_TIME.load(Ordering::Relaxed));
    }
    let (_, start_time) = read_stat(pid).ok()?;
    OWN_START_TIME.store(start_time, Ordering::Relaxed);
    OWN_PID.store(pid, Ordering::Release);
    Some(start_time)
}

/// The pidfd cache, unless it stays taken: a fork child may inherit it locked by a thread
/// that does not exist there, so this never waits for long (callers then read `/proc`).
fn lock_cache() -> Option<MutexGuard<'static, Option<HashMap<ProcessId, Pidfd>>>> {
    for _ in 0..64 {
        match PIDFDS.try_lock() {
            Ok(guard) => return Some(guard),
            Err(std::sync::TryLockError::Poisoned(poison)) => return Some(poison.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => std::thread::yield_now(),
        }
    }
    None
}

/// How many pidfds the cache may hold: one per process slot, or a quarter of the soft
/// `RLIMIT_NOFILE` where that is less.
fn cache_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        // SAFETY: `rlimit` is plain old data that getrlimit fills.
        let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
        // SAFETY: a valid resource and a pointer to a live `rlimit`.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
            || limit.rlim_cur == libc::RLIM_INFINITY
        {
            return PIDFD_CACHE_MAX;
        }
        PIDFD_CACHE_MAX.min((limit.rlim_cur / 4) as usize)
    })
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

fn cached_pidfd_liveness(id: &ProcessId) -> Option<Liveness> {
    let mut guard = lock_cache()?;
    let cache = guard.as_mut()?;
    let pidfd = *cache.get(id)?;
    let answer = poll_exited(pidfd.fd);
    if answer != Liveness::Alive && !pidfd.still_ours() {
        // Closed behind the cache, perhaps reused (see `Pidfd`): forget it, close nothing.
        cache.remove(id);
        return None;
    }
    if answer == Liveness::Dead {
        cache.remove(id);
        close(pidfd.fd);
    }
    Some(answer)
}

fn cache_pidfd(id: &ProcessId, fd: i32) -> bool {
    let Some(mut guard) = lock_cache() else {
        return false;
    };
    let cache = guard.get_or_insert_with(HashMap::new);
    if cache.len() >= cache_limit() || cache.contains_key(id) {
        return false;
    }
    let Some(pidfd) = Pidfd::new(fd) else {
        return false;
    };
    cache.insert(*id, pidfd);
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
        let (mut child, id) = sleeper();
        assert_eq!(id.liveness(), Liveness::Alive);
        child.kill().unwrap();
        // Still a zombie until waited for: dead all the same.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(id.liveness(), Liveness::Dead);
        child.wait().unwrap();
        assert_eq!(id.liveness(), Liveness::Dead);
    }

    fn sleeper() -> (std::process::Child, ProcessId) {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let id = ProcessId {
            pid: child.id(),
            start_time: process_start_time(child.id()).unwrap(),
        };
        (child, id)
    }

    fn cached(id: &ProcessId) -> bool {
        lock_cache()
            .unwrap()
            .as_ref()
            .is_some_and(|cache| cache.contains_key(id))
    }

    #[test]
    fn a_census_knows_every_peer_seen_before_however_many() {
        // More peers than the 64 pidfds the cache held once (then every sweep looked the
        // rest up in /proc again); fewer than it holds now, with room for other tests'.
        let count = 100;
        if cache_limit() < count + 32 {
            eprintln!(
                "skipped: RLIMIT_NOFILE leaves room for {} pidfds",
                cache_limit()
            );
            return;
        }
        let (mut children, ids): (Vec<_>, Vec<_>) = (0..count).map(|_| sleeper()).unzip();
        let first = Census::take();
        assert!(ids.iter().all(|id| first.liveness(id) == Liveness::Alive));
        let second = Census::take();
        let answers: Vec<Liveness> = ids.iter().map(|id| second.liveness(id)).collect();
        for child in &mut children {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        assert!(answers.iter().all(|&answer| answer == Liveness::Alive));
        assert_eq!(
            second.unseen(),
            0,
            "{count} peers, cache limit {}",
            cache_limit()
        );
        // And once they exit, the next census knows them dead.
        let third = Census::take();
        assert!(ids.iter().all(|id| third.liveness(id) == Liveness::Dead));
        assert_eq!(third.unseen(), 0);
    }

    #[test]
    fn a_census_closes_the_pidfds_of_processes_that_exited() {
        let (mut child, id) = sleeper();
        assert_eq!(Census::take().liveness(&id), Liveness::Alive);
        assert!(cached(&id));
        child.kill().unwrap();
        child.wait().unwrap();
        // Nobody asks about it (its slot was freed cleanly, say): its pidfd goes all the same.
        drop(Census::take());
        assert!(!cached(&id));
    }

    fn cached_fd(id: &ProcessId) -> i32 {
        lock_cache().unwrap().as_ref().unwrap()[id].fd
    }

    #[test]
    fn a_cached_pidfd_closed_behind_the_cache_is_not_taken_at_its_word() {
        // The program closes a descriptor it does not own (the cache's pidfd) and the number
        // is reused by a file that poll calls readable: the live peer was called dead (and
        // would have been reaped), and the program's file closed by the cache.
        let (mut child, id) = sleeper();
        assert_eq!(Census::take().liveness(&id), Liveness::Alive);
        let fd = cached_fd(&id);
        let file = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: replaces descriptor `fd` (the cache's) by a duplicate of `file`.
        let reused = unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&file), fd) };
        assert_eq!(reused, fd);
        assert_eq!(Census::take().liveness(&id), Liveness::Alive);
        assert_eq!(id.liveness(), Liveness::Alive);
        assert!(
            fd_identity(fd).is_some(),
            "the cache closed the program's file"
        );
        // And with the number closed (POLLNVAL), a peer that died is still found dead, where
        // it was "could not look" forever, so never reaped.
        let (mut other, other_id) = sleeper();
        assert_eq!(Census::take().liveness(&other_id), Liveness::Alive);
        close(cached_fd(&other_id));
        other.kill().unwrap();
        other.wait().unwrap();
        assert_eq!(Census::take().liveness(&other_id), Liveness::Dead);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(id.liveness(), Liveness::Dead);
        // SAFETY: `fd` is the duplicate made above, owned by this test.
        unsafe { libc::close(fd) };
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
