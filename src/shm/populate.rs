//! Reserving and faulting in the pages of a new segment, in a few threads.
//!
//! A new segment's pages must exist before anyone touches them: a page the system cannot
//! supply at first touch is a `SIGBUS`, which kills the process, where a failed growth is a
//! Python error. `MADV_POPULATE_WRITE` (Linux 5.14) allocates and maps every page of a range
//! or returns an error, and never raises `SIGBUS` ("If populating fails, a SIGBUS signal is
//! not generated; instead, an error is returned", madvise(2)); the pages it allocates belong
//! to the file from then on, as `fallocate`'s do, so processes that map the segment later
//! find them. It is also what makes growth fast: `fallocate` allocates under the file's
//! lock, one thread for the whole segment, and `MAP_POPULATE` faults the pages in one thread
//! after it, where populating disjoint ranges in a few threads allocates, zeroes and maps
//! them in parallel (2 GiB on an idle 2-core VM: 1.2 s → 0.6 s; none of it when other work
//! holds the cores: the work is the same, only spread).
//!
//! Where the kernel lacks it (`EINVAL`), the segment is reserved with `fallocate` and its
//! pages are faulted in by touching one byte per page, in the same threads.
//!
//! Threads: at most [`MAX_THREADS`] (fewer on fewer cores), scoped, so every one has ended
//! when [`prepare`] returns; a thread that cannot be spawned leaves its range to the caller.
//! No lock of the channel is held here: `Slab::allocate` grows outside the heap lock.
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// Most threads that prepare one segment (the calling thread included).
pub const MAX_THREADS: usize = 4;
/// Least bytes worth a thread of its own: below it, spawning costs more than it saves.
const MIN_BYTES_PER_THREAD: usize = 64 << 20;

/// The system's page size: `madvise` wants page-aligned starts, and pages are 16 or 64 KiB
/// on some aarch64 kernels (NVIDIA Grace's, Asahi's), where ranges cut at 4 KiB failed
/// every growth (and every channel's creation) with `EINVAL`.
fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(page)
            .ok()
            .filter(|page| page.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// How a segment's pages are reserved and faulted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// `MADV_POPULATE_WRITE` over disjoint ranges, falling back to the other on `EINVAL`.
    PopulateWrite,
    /// `fallocate`, then one byte read per page (kernels before 5.14).
    FallocateAndTouch,
}

/// Reserves and faults in every page of the `len` bytes mapped at `base` from `fd`, with
/// `strategy`. An error leaves the pages allocated so far to the file: the caller drops the
/// segment, which frees them.
///
/// # Safety
/// `base..base + len` must be a live shared, writable mapping of `fd` from offset 0, of a
/// file at least `len` bytes long, that nobody else reads or writes yet.
pub unsafe fn prepare(
    fd: &OwnedFd,
    base: *mut u8,
    len: usize,
    strategy: Strategy,
) -> io::Result<()> {
    // Shared-memory huge pages, where the system allows them for this mapping
    // (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` at `advise`, `within_size` or
    // `always`): a 2 MiB page is one allocation and one mapping for 512 small ones. Only
    // advice: where it is `never` the kernel ignores it, and an error changes nothing.
    // SAFETY: advice on a mapping this segment owns; it moves or frees nothing.
    unsafe { libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE) };
    let page = page_size();
    if strategy == Strategy::PopulateWrite {
        // One page first, on this thread: a kernel without MADV_POPULATE_WRITE says EINVAL
        // at once, before any thread is spawned.
        let probe = page.min(len);
        // SAFETY: the first page (or all of a shorter mapping) lies inside the mapping.
        match unsafe { populate_write(base as usize, probe) } {
            Ok(()) => {
                // SAFETY: as the caller promised; the ranges are disjoint and inside it.
                return in_threads(
                    base as usize + probe,
                    len - probe,
                    page,
                    |start, end| unsafe { populate_write(start, end - start) },
                );
            }
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {}
            Err(error) => return Err(error),
        }
    }
    // SAFETY: plain syscall on a descriptor the caller owns. posix_fallocate returns the
    // error number instead of setting errno.
    let result = unsafe { libc::posix_fallocate(fd.as_raw_fd(), 0, len as libc::off_t) };
    if result != 0 {
        return Err(io::Error::from_raw_os_error(result));
    }
    in_threads(base as usize, len, page, |start, end| {
        for address in (start..end).step_by(page) {
            // SAFETY: inside the mapping, whose pages `fallocate` has just reserved, so the
            // read faults the page in and cannot raise SIGBUS.
            unsafe { std::ptr::read_volatile(address as *const u8) };
        }
        Ok(())
    })
}

/// `MADV_POPULATE_WRITE` over `start..start + len`, retried where a signal interrupted it
/// (the pages done so far stay done).
///
/// # Safety
/// The range must lie inside a shared mapping that nobody reads or writes yet.
unsafe fn populate_write(start: usize, len: usize) -> io::Result<()> {
    loop {
        // SAFETY: per the caller; populating writes no byte (shared pages start zeroed).
        if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) } == 0
        {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINTR) => continue,
            // The kernel reports a page it could not supply (a full tmpfs: ENOSPC inside)
            // as the SIGBUS the access would have raised: EFAULT, "Bad address", which
            // would mislead whoever reads the message.
            Some(libc::EFAULT) => return Err(io::Error::from_raw_os_error(libc::ENOSPC)),
            _ => return Err(error),
        }
    }
}

/// How many threads prepare `len` bytes: one per [`MIN_BYTES_PER_THREAD`], at most
/// [`MAX_THREADS`] and the cores this process may run on.
pub fn thread_count(len: usize) -> usize {
    if len < 2 * MIN_BYTES_PER_THREAD {
        return 1; // without asking the system for its cores (a few reads of /sys)
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (len / MIN_BYTES_PER_THREAD).clamp(1, MAX_THREADS.min(cores))
}

/// Runs `work` over `start..start + len` (`start` a multiple of `page`) cut into disjoint
/// ranges that start on `page` boundaries, one per thread; the first error wins.
fn in_threads(
    start: usize,
    len: usize,
    page: usize,
    work: impl Fn(usize, usize) -> io::Result<()> + Sync,
) -> io::Result<()> {
    let threads = thread_count(len);
    let share = (len / threads).next_multiple_of(page);
    let ranges: Vec<(usize, usize)> = (0..threads)
        .map(|index| {
            let from = start + (index * share).min(len);
            let to = start + ((index + 1) * share).min(len);
            (
                from,
                if index + 1 == threads {
                    start + len
                } else {
                    to
                },
            )
        })
        .filter(|(from, to)| from < to)
        .collect();
    let Some((&mine, others)) = ranges.split_first() else {
        return Ok(());
    };
    let work = &work;
    std::thread::scope(|scope| {
        let spawned: Vec<_> = others
            .iter()
            .map(|&(from, to)| {
                let handle = if refuse_threads() {
                    Err(io::Error::other("no thread (test)"))
                } else {
                    // A system call and a loop: a small stack is plenty.
                    std::thread::Builder::new()
                        .name("tensorslab-populate".into())
                        .stack_size(64 << 10)
                        .spawn_scoped(scope, move || work(from, to))
                };
                (from, to, handle)
            })
            .collect();
        let mut result = work(mine.0, mine.1);
        for (from, to, handle) in spawned {
            let outcome = match handle {
                Ok(handle) => handle.join().unwrap_or_else(|_| {
                    Err(io::Error::other(
                        "a thread populating shared memory panicked",
                    ))
                }),
                // No thread to be had (a process at its limit): this thread does it.
                Err(_) => work(from, to),
            };
            if result.is_ok() {
                result = outcome;
            }
        }
        result
    })
}

/// Tests make every spawn fail here, as a process at its thread limit sees.
#[cfg(test)]
static REFUSE_THREADS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn refuse_threads() -> bool {
    #[cfg(test)]
    return REFUSE_THREADS.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(test))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calling_thread_does_the_ranges_no_thread_could_be_spawned_for() {
        use std::sync::Mutex;
        let len = 1 << 30;
        let caller = std::thread::current().id();
        let seen = Mutex::new(Vec::new());
        REFUSE_THREADS.store(true, std::sync::atomic::Ordering::Relaxed);
        let result = in_threads(0, len, page_size(), |from, to| {
            seen.lock()
                .unwrap()
                .push((from, to, std::thread::current().id()));
            Ok(())
        });
        REFUSE_THREADS.store(false, std::sync::atomic::Ordering::Relaxed);
        result.unwrap();
        let mut seen = seen.into_inner().unwrap();
        seen.sort_by_key(|&(from, _, _)| from);
        assert_eq!(seen.len(), thread_count(len));
        assert!(seen.iter().all(|&(_, _, thread)| thread == caller));
        assert_eq!((seen[0].0, seen[seen.len() - 1].1), (0, len));
    }

    #[test]
    fn ranges_cover_everything_once() {
        use std::sync::Mutex;
        // 4 KiB pages (x86-64), 16 and 64 KiB (some aarch64 kernels): every range must
        // start on a page, or madvise fails with EINVAL.
        for (page, len) in [4096, 16 << 10, 64 << 10].into_iter().flat_map(|page| {
            [page, 3 * page, 64 << 20, (200 << 20) + page, 1 << 30].map(|len| (page, len))
        }) {
            let seen = Mutex::new(Vec::new());
            in_threads(1 << 40, len, page, |from, to| {
                assert_eq!(from % page, 0, "{page}-byte pages");
                seen.lock().unwrap().push((from, to));
                Ok(())
            })
            .unwrap();
            let mut seen = seen.into_inner().unwrap();
            seen.sort();
            assert!(seen.len() <= MAX_THREADS);
            assert_eq!(seen.first().unwrap().0, 1 << 40);
            assert_eq!(seen.last().unwrap().1, (1 << 40) + len);
            assert!(
                seen.windows(2).all(|pair| pair[0].1 == pair[1].0),
                "{seen:?}"
            );
        }
    }

    #[test]
    fn the_first_error_is_returned_after_every_thread_ended() {
        let error = in_threads(0, 1 << 30, page_size(), |from, _| {
            if from == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(libc::ENOMEM))
            }
        });
        if thread_count(1 << 30) > 1 {
            assert_eq!(error.unwrap_err().raw_os_error(), Some(libc::ENOMEM));
        }
    }
}
