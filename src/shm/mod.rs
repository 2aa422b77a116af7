//! Shared-memory segments: creating, reserving, mapping and attaching them.
//!
//! A segment is an *anonymous* shared file: by default a `memfd` (named `tensorslab-...`
//! in `/proc/<pid>/fd` and `/proc/<pid>/maps`), or, when `TENSORSLAB_SHM_DIR` is set, a
//! file created in that directory and unlinked at once. Either way no name survives in a
//! file system, so a crash cannot leak a segment: the kernel frees it when the last process
//! that maps it or holds its descriptor is gone. A memfd is also not bound by the size of
//! the `/dev/shm` mount (64 MB in containers), only by memory.
//!
//! Other processes attach by opening `/proc/<pid>/fd/<fd>` of any live process of the
//! channel that holds the segment (see [`Segment::attach`]); the file identity (device,
//! inode) recorded at creation guards against a reused pid or descriptor number.
//!
//! Every page is reserved and faulted in when a segment is created (`MADV_POPULATE_WRITE`
//! in a few threads, or `fallocate` where the kernel lacks it: see `populate.rs`), so
//! running out of memory is an error at growth time, never a `SIGBUS` at first touch.
mod populate;
mod process;

pub use populate::Strategy as PopulateStrategy;

pub use process::{current_pid, process_start_time, Census, Liveness, ProcessId};

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::ptr::NonNull;

use crate::error::{Error, Result};

/// Environment variable naming a directory (a tmpfs) to create segments in instead of memfd.
pub const SHM_DIR_ENV: &str = "TENSORSLAB_SHM_DIR";
/// Prefix of every segment name, so they can be found in `/proc/*/fd` and `/proc/*/maps`.
pub const NAME_PREFIX: &str = "tensorslab-";

/// Device and inode of a segment's file: what proves an attached descriptor is the right one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    pub device: u64,
    pub inode: u64,
}

/// A mapped shared-memory segment. Unmapped and closed on drop.
#[derive(Debug)]
pub struct Segment {
    fd: OwnedFd,
    base: NonNull<u8>,
    len: usize,
    identity: FileIdentity,
}

// SAFETY: the mapping is plain shared memory owned by this value; concurrent access goes
// through atomics or through ranges handed out by the allocator, never through `&mut`.
unsafe impl Send for Segment {}
// SAFETY: as above; `Segment` exposes only the base pointer and immutable metadata.
unsafe impl Sync for Segment {}

/// Where segments are created: a memfd, or a directory given by `TENSORSLAB_SHM_DIR`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    Memfd,
    Directory(PathBuf),
}

impl Backing {
    pub fn from_env() -> Backing {
        match std::env::var_os(SHM_DIR_ENV) {
            Some(dir) if !dir.is_empty() => Backing::Directory(PathBuf::from(dir)),
            _ => Backing::Memfd,
        }
    }

    /// Human-readable place, for error messages.
    pub fn describe(&self) -> String {
        match self {
            Backing::Memfd => "memfd (anonymous shared memory)".to_string(),
            Backing::Directory(dir) => dir.display().to_string(),
        }
    }

    /// Bytes this backing can still hand out, as far as the system tells.
    pub fn available_bytes(&self) -> u64 {
        match self {
            Backing::Memfd => available_memory(),
            Backing::Directory(dir) => free_space(dir).unwrap_or(0),
        }
    }

    fn open_file(&self, name: &str) -> Result<OwnedFd> {
        match self {
            Backing::Memfd => {
                let cname = CString::new(name).expect("segment names have no NUL");
                // SAFETY: `cname` is a valid NUL-terminated string for the call.
                let fd = unsafe {
                    libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
                };
                if fd < 0 {
                    return Err(Error::last_os(format!("memfd_create({name})")));
                }
                // SAFETY: `fd` was just returned by memfd_create and is owned by no one else.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // memfds start 0777; the /proc attach path is already limited to the same
                // user, but keep the documented 0600 everywhere.
                // SAFETY: plain syscall on a descriptor we own.
                if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } != 0 {
                    return Err(Error::last_os(format!("fchmod({name})")));
                }
                Ok(fd)
            }
            Backing::Directory(dir) => {
                let path = dir.join(name);
                let cpath = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
                    Error::InvalidArgument(format!("{SHM_DIR_ENV} contains a NUL byte"))
                })?;
                let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
                // SAFETY: `cpath` is NUL-terminated; mode is passed as the variadic argument.
                let fd = unsafe { libc::open(cpath.as_ptr(), flags, 0o600 as libc::c_uint) };
                if fd < 0 {
                    return Err(Error::last_os(format!("creating {}", path.display())));
                }
                // SAFETY: `fd` was just opened and is owned by no one else.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // Unlink at once: from here on the file has no name that could leak.
                // SAFETY: `cpath` is NUL-terminated.
                unsafe { libc::unlink(cpath.as_ptr()) };
                Ok(fd)
            }
        }
    }
}

impl Segment {
    /// Creates a segment of `len` bytes with every page reserved and faulted in, and maps it.
    pub fn create(backing: &Backing, name: &str, len: usize) -> Result<Segment> {
        Segment::create_with(backing, name, len, PopulateStrategy::PopulateWrite)
    }

    /// [`Segment::create`] with the given way of reserving the pages (tests use the
    /// fallback for old kernels here too).
    pub fn create_with(
        backing: &Backing,
        name: &str,
        len: usize,
        strategy: PopulateStrategy,
    ) -> Result<Segment> {
        let fd = backing.open_file(name)?;
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(Error::last_os(format!("sizing {name}")));
        }
        if matches!(backing, Backing::Memfd) {
            seal_size(&fd)
                .map_err(|source| Error::os(format!("sealing the size of {name}"), source))?;
        }
        // Mapped before its pages exist: nothing touches them until `prepare` reserved them.
        let segment = Segment::map(fd, len, false)?;
        crate::failpoint!("segment.populating");
        // SAFETY: the segment maps its whole file (`len` bytes, just sized) shared and
        // writable, and no one else can reach it yet.
        let prepared = unsafe { populate::prepare(&segment.fd, segment.base(), len, strategy) };
        if let Err(source) = prepared {
            // Give back what was reserved before saying how much is free: the pages of the
            // failed segment are not space anyone can have.
            drop(segment);
            return Err(Error::os(
                format!(
                    "reserving {} of shared memory in {} ({} free)",
                    format_bytes(len as u64),
                    backing.describe(),
                    format_bytes(backing.available_bytes())
                ),
                source,
            ));
        }
        Ok(segment)
    }

    /// Maps the segment held as descriptor `fd` by process `pid`, checking that it is the
    /// file with `identity` (a reused pid or descriptor number is refused) and that it holds
    /// the `len` bytes to map.
    ///
    /// Every argument comes from shared memory or a ticket, so none is trusted: the
    /// descriptor is first opened as a bare path (`O_PATH`, which neither reads nor writes
    /// the file, so naming some other process's tty, device or FIFO has no effect) and
    /// checked there; only the checked file is then opened for mapping, through that very
    /// `O_PATH` descriptor (looking with `stat` and then opening the path could open a file
    /// the process put under that number in between). A `len` past the end of the file
    /// would map pages with nothing behind them, and the first access to one would be a
    /// `SIGBUS`.
    pub fn attach(pid: u32, fd: RawFd, len: usize, identity: FileIdentity) -> Result<Segment> {
        let path = format!("/proc/{pid}/fd/{fd}");
        let located = open(&path, libc::O_PATH).map_err(|source| {
            Error::os(format!("attaching shared memory through {path}"), source)
        })?;
        let stat = file_stat(&located)?;
        if identity_from(&stat) != identity {
            return Err(Error::Incompatible(format!(
                "{path} is not the expected segment (the process reused the descriptor)"
            )));
        }
        let size = stat.st_size as u64;
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG || size < len as u64 {
            return Err(Error::Incompatible(format!(
                "{path} holds {size} bytes but the channel's records say its segment has {len} \
                 (corrupt shared memory?)"
            )));
        }
        // Reopening our own O_PATH descriptor opens that very file, whatever `path` names now.
        let fd = open(
            &format!("/proc/self/fd/{}", located.as_raw_fd()),
            libc::O_RDWR,
        )
        .map_err(|source| Error::os(format!("opening shared memory found at {path}"), source))?;
        Segment::map(fd, len, true)
    }

    /// Maps `len` bytes of `fd`, faulting every page in now when `populate` (the pages
    /// must exist: only for segments some process has prepared).
    fn map(fd: OwnedFd, len: usize, populate: bool) -> Result<Segment> {
        let identity = identity_of(&fd)?;
        if len == 0 {
            return Err(Error::InvalidArgument("a segment cannot be empty".into()));
        }
        // MAP_POPULATE faults every page in now, once per process, so steady-state copies
        // never take page faults.
        let flags = libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 };
        // SAFETY: mapping a descriptor we own with a length the file was sized to; the
        // kernel picks the address.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(Error::last_os(format!(
                "mapping {} of shared memory",
                format_bytes(len as u64)
            )));
        }
        let base = NonNull::new(address.cast::<u8>()).expect("mmap never returns null on success");
        Ok(Segment {
            fd,
            base,
            len,
            identity,
        })
    }

    pub fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn identity(&self) -> FileIdentity {
        self.identity
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` describe the mapping made in `map`; nothing borrows it any
        // more (owners keep the `Segment` alive for as long as they hand out pointers).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Forbids changing a memfd's size from now on, for every process that can reach it: a
/// peer that truncated a segment (by mistake, or hostile) would make every other process
/// touching the lost pages die of SIGBUS. The seal on sealing keeps it that way.
fn seal_size(fd: &OwnedFd) -> io::Result<()> {
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: plain fcntl on a descriptor we own.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens `path` (close-on-exec) with `flags`.
fn open(path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let cpath = CString::new(path).expect("no NUL in a /proc path");
    // SAFETY: `cpath` is NUL-terminated; no mode is needed without O_CREAT.
    let raw = unsafe { libc::open(cpath.as_ptr(), flags | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just opened and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn file_stat(fd: &OwnedFd) -> Result<libc::stat> {
    // SAFETY: `stat` is plain old data; fstat fills it completely on success.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor (O_PATH ones included) and a pointer to a live `stat`.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
        return Err(Error::last_os("fstat on a shared-memory segment"));
    }
    Ok(stat)
}

fn identity_from(stat: &libc::stat) -> FileIdentity {
    FileIdentity {
        device: stat.st_dev,
        inode: stat.st_ino,
    }
}

fn identity_of(fd: &OwnedFd) -> Result<FileIdentity> {
    file_stat(fd).map(|stat| identity_from(&stat))
}

fn free_space(dir: &std::path::Path) -> Option<u64> {
    let cpath = CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `statvfs` is plain old data, filled on success.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: NUL-terminated path and a pointer to a live `statvfs`.
    if unsafe { libc::statvfs(cpath.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Memory this process may still use: `MemAvailable`, lowered by a cgroup v2 limit if any.
fn available_memory() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .unwrap_or(1 << 30);
    let read = |name: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{name}"))
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
    };
    match (read("memory.max"), read("memory.current")) {
        (Some(max), Some(current)) => available.min(max.saturating_sub(current)),
        _ => available,
    }
}

/// `1.5 GiB`, `64 KiB`, `12 B`: sizes in error messages and stats.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// 64 random bits for ids and names (`getrandom`); unique enough, not secret.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: writes at most 8 bytes into the buffer it is given.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), 8, 0) };
    if got != 8 {
        // Not security relevant past uniqueness: fall back to time and pid.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return now.as_nanos() as u64 ^ (u64::from(current_pid()) << 40);
    }
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_attach_share_bytes() {
        let segment = Segment::create(&Backing::Memfd, "tensorslab-test", 1 << 20).unwrap();
        // SAFETY: the segment is 1 MiB and mapped.
        unsafe { segment.base().write(42) };
        let other =
            Segment::attach(current_pid(), segment.raw_fd(), 1 << 20, segment.identity()).unwrap();
        // SAFETY: both map the same file; byte 0 was written above.
        assert_eq!(unsafe { other.base().read() }, 42);
        assert_ne!(other.base(), segment.base());
    }

    /// Bytes of the segment's file that have pages behind them.
    fn allocated_bytes(segment: &Segment) -> u64 {
        let stat = file_stat(&segment.fd).unwrap();
        stat.st_blocks as u64 * 512
    }

    #[test]
    fn every_page_is_reserved_at_creation_whichever_the_strategy() {
        // Large enough for several populating threads where there are cores for them.
        let len = 3 * (64 << 20) + 4096;
        for strategy in [
            PopulateStrategy::PopulateWrite,
            PopulateStrategy::FallocateAndTouch,
        ] {
            let segment =
                Segment::create_with(&Backing::Memfd, "tensorslab-prep", len, strategy).unwrap();
            assert!(
                allocated_bytes(&segment) >= len as u64,
                "{strategy:?}: only {} of {len} bytes reserved",
                allocated_bytes(&segment)
            );
            // Each thread's range, its ends included, holds what was written, seen through
            // a second mapping of the same file.
            let other =
                Segment::attach(current_pid(), segment.raw_fd(), len, segment.identity()).unwrap();
            let offsets = [
                0,
                4095,
                4096,
                64 << 20,
                (128 << 20) + 1,
                len - 4096,
                len - 1,
            ];
            for (value, &offset) in offsets.iter().enumerate() {
                // SAFETY: every offset is inside the `len`-byte mapping.
                unsafe { segment.base().add(offset).write(value as u8 + 1) };
            }
            for (value, &offset) in offsets.iter().enumerate() {
                // SAFETY: as above, through the other mapping.
                assert_eq!(unsafe { other.base().add(offset).read() }, value as u8 + 1);
            }
            // SAFETY: inside both mappings; never written, so zero (fresh pages).
            assert_eq!(unsafe { other.base().add(1 << 20).read() }, 0);
        }
    }

    #[test]
    fn no_process_can_shrink_or_grow_a_memfd_segment() {
        let segment = Segment::create(&Backing::Memfd, "tensorslab-sealed", 8192).unwrap();
        // What a hostile or careless peer holding the descriptor would try.
        // SAFETY: plain syscalls on a descriptor the segment owns (expected to fail).
        let shrunk = unsafe { libc::ftruncate(segment.raw_fd(), 4096) };
        assert_eq!(
            shrunk, -1,
            "a peer could truncate the segment under its users"
        );
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::ftruncate(segment.raw_fd(), 1 << 20) }, -1);
        // SAFETY: the segment is 8 KiB and mapped: the last byte is still there.
        unsafe { segment.base().add(8191).write(1) };
    }

    #[test]
    fn attach_refuses_other_file() {
        let a = Segment::create(&Backing::Memfd, "tensorslab-a", 4096).unwrap();
        let b = Segment::create(&Backing::Memfd, "tensorslab-b", 4096).unwrap();
        let error = Segment::attach(current_pid(), a.raw_fd(), 4096, b.identity()).unwrap_err();
        assert!(
            error.to_string().contains("not the expected segment"),
            "{error}"
        );
    }

    #[test]
    fn attach_refuses_a_length_past_the_end_of_the_file() {
        let segment = Segment::create(&Backing::Memfd, "tensorslab-short", 4096).unwrap();
        // Mapping 1 MiB of a 4 KiB file succeeds, and the first touch past 4 KiB is a SIGBUS.
        let error = Segment::attach(current_pid(), segment.raw_fd(), 1 << 20, segment.identity())
            .expect_err("attached 1 MiB of a 4 KiB segment");
        assert!(matches!(error, Error::Incompatible(_)), "{error}");
        assert!(error.to_string().contains("4096"), "{error}");
        // The exact length still attaches.
        Segment::attach(current_pid(), segment.raw_fd(), 4096, segment.identity()).unwrap();
    }

    #[test]
    fn directory_backing_leaves_no_name() {
        let dir = std::env::temp_dir().join(format!("tensorslab-shm-test-{}", current_pid()));
        std::fs::create_dir_all(&dir).unwrap();
        let backing = Backing::Directory(dir.clone());
        let segment = Segment::create(&backing, "tensorslab-dir-test", 8192).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        drop(segment);
        std::fs::remove_dir(&dir).unwrap();
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_bytes(12), "12 B");
        assert_eq!(format_bytes(64 << 10), "64.0 KiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
    }
}
