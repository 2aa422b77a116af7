//! Shared segments: the memory `tensorslab.share` moves tensors and arrays into, which every
//! process it reaches maps and writes in place, for as long as any of them holds it.
//!
//! Unlike a channel's slab, a shared segment belongs to no channel and is never recycled: it
//! is one memfd (see [`crate::shm`]) made for one `share` call, sized for every tensor of
//! that call, each 64-byte aligned in it, and named `tensorslab-<random id>-0` (the form of
//! a channel's first slab segment, so `tensorslab.testing` finds a leaked one like any
//! other). The kernel frees it when the last process that maps it or holds its descriptor
//! is gone; nothing of it is named in a file system, so a crash (SIGKILL included) cannot
//! leak it.
//!
//! Each process holds a shared segment through one [`Shared`] (one descriptor, one mapping)
//! however many tensors view it: a process-local registry finds the `Shared` of an address
//! (what the encoder asks before exporting a tensor) and of a file identity (what attaching
//! asks, so a segment received a thousand times is mapped once). The registry holds only
//! weak references: when the last view of a segment dies in a process, its `Shared` drops
//! and closes the descriptor and unmaps, and the registry forgets it.
//!
//! Another process attaches through `/proc/<pid>/fd/<fd>` of a live holder
//! ([`Segment::attach`], checked by device and inode). A [`Reference`] names the process
//! that made it and up to [`MAX_HOLDERS`]` - 1` processes it knows held the segment before
//! (in a fork child, the process it inherited the descriptor from; then the creator), so a reference still attaches after the process that sent it has
//! dropped the segment, as long as one of them still holds it. When none does, attaching
//! fails with [`Error::PeerGone`] naming them: the memory may be gone with them.
//!
//! What this module must never do: keep a descriptor or mapping after the last `Shared` of
//! a segment is dropped in this process (that would keep the memory alive past its users).
use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::error::{Error, Result};
use crate::shm::{
    current_pid, format_bytes, random_u64, Backing, FileIdentity, Segment, NAME_PREFIX,
};

/// Alignment of every tensor inside a shared segment, and of the segment's length.
pub const ALIGN: usize = 64;
/// Processes a [`Reference`] names as holders.
pub const MAX_HOLDERS: usize = 4;

/// What another process needs to map a shared segment: who holds it, and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// `(pid, descriptor)` of processes known to hold the segment, the sender first.
    pub holders: Vec<(u32, RawFd)>,
    pub len: usize,
    pub identity: FileIdentity,
}

/// One process's hold on a shared segment: its descriptor and mapping.
#[derive(Debug)]
pub struct Shared {
    segment: Segment,
    /// The process that opened `segment`'s descriptor (created or attached it). A fork
    /// child inherits this `Shared`, descriptor number included, without opening anything:
    /// its references name this process too, which holds the segment as long as it lives.
    opened_by: u32,
    /// Other processes known to hold it (the creator first), for [`Shared::reference`].
    others: Vec<(u32, RawFd)>,
}

/// Where each of `sizes` bytes lies in one segment (64-byte aligned), and the segment's
/// length (a multiple of 64, at least 64). Sizes come from Python: every sum is checked.
pub fn layout(sizes: &[usize]) -> Result<(Vec<usize>, usize)> {
    let too_large = || {
        Error::InvalidArgument(format!(
            "{} tensors of {} bytes in all do not fit in one address space",
            sizes.len(),
            sizes.iter().fold(0u128, |sum, &size| sum + size as u128)
        ))
    };
    let mut offsets = Vec::with_capacity(sizes.len());
    let mut end = 0usize;
    for &size in sizes {
        offsets.push(end);
        end = end
            .checked_add(size)
            .and_then(round_up)
            .ok_or_else(too_large)?;
    }
    // `isize::MAX` bounds every allocation Rust and mmap accept.
    if end > isize::MAX as usize {
        return Err(too_large());
    }
    Ok((offsets, end.max(ALIGN)))
}

fn round_up(size: usize) -> Option<usize> {
    size.checked_add(ALIGN - 1)
        .map(|padded| padded & !(ALIGN - 1))
}

impl Shared {
    /// A new segment of at least `len` bytes (rounded up to a multiple of 64), registered.
    pub fn create(len: usize) -> Result<Arc<Shared>> {
        Ok(Shared::map_new(len)?.register())
    }

    /// [`Shared::create`] without the registering: the slow part (reserving and mapping),
    /// which takes no lock, so a binding may run it without the GIL and register with it
    /// held. Then no thread holds the registry's lock while another forks (a fork child
    /// whose copy of the lock stayed locked would hang at its first shared segment).
    pub fn map_new(len: usize) -> Result<Unregistered> {
        let len = round_up(len.max(1))
            .filter(|&len| len <= isize::MAX as usize)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("a shared segment of {len} bytes is too large"))
            })?;
        let name = format!("{NAME_PREFIX}{:016x}-0", random_u64());
        let segment = Segment::create(&Backing::from_env(), &name, len)?;
        Ok(Unregistered(Shared {
            segment,
            opened_by: current_pid(),
            others: Vec::new(),
        }))
    }

    /// This process's `Shared` of the segment `reference` names: the one it holds already
    /// (same file identity), or a new mapping attached through the first holder that still
    /// holds it.
    pub fn attach(reference: &Reference) -> Result<Arc<Shared>> {
        if let Some(held) = Shared::held(reference.identity) {
            return Ok(held);
        }
        Ok(Shared::map_attached(reference)?.register())
    }

    /// This process's `Shared` of the segment with `identity`, if it maps it already.
    pub fn held(identity: FileIdentity) -> Option<Arc<Shared>> {
        find_identity(identity)
    }

    /// [`Shared::attach`]'s mapping, without looking for one held already or registering
    /// (see [`Shared::map_new`] for why a binding splits them).
    pub fn map_attached(reference: &Reference) -> Result<Unregistered> {
        let mut failures = Vec::new();
        for &(pid, fd) in reference.holders.iter().take(MAX_HOLDERS) {
            match Segment::attach(pid, fd, reference.len, reference.identity) {
                Ok(segment) => {
                    let others = reference
                        .holders
                        .iter()
                        .copied()
                        .filter(|&(holder, _)| holder != current_pid())
                        .take(MAX_HOLDERS - 1)
                        .collect();
                    return Ok(Unregistered(Shared {
                        segment,
                        opened_by: current_pid(),
                        others,
                    }));
                }
                Err(error) => failures.push(format!("pid {pid}: {error}")),
            }
        }
        Err(Error::PeerGone(format!(
            "cannot map the shared segment of {} (tensorslab.share): no process known to \
             hold it holds it any more ({}); the sender must keep the tensor (or module) \
             until the receiver has it",
            format_bytes(reference.len as u64),
            if failures.is_empty() {
                "the reference names none".to_string()
            } else {
                failures.join("; ")
            }
        )))
    }

    /// How another process maps this segment: this process first, then (in a fork child)
    /// the process it inherited the descriptor from, then those it knows.
    pub fn reference(&self) -> Reference {
        let me = current_pid();
        let fd = self.segment.raw_fd();
        let mut holders = vec![(me, fd)];
        if self.opened_by != me {
            holders.push((self.opened_by, fd));
        }
        let room = MAX_HOLDERS - holders.len();
        holders.extend(
            self.others
                .iter()
                .copied()
                .filter(|&(pid, _)| pid != me && pid != self.opened_by)
                .take(room),
        );
        Reference {
            holders,
            len: self.segment.len(),
            identity: self.segment.identity(),
        }
    }

    pub fn base(&self) -> *mut u8 {
        self.segment.base()
    }

    pub fn len(&self) -> usize {
        self.segment.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segment.is_empty()
    }

    pub fn identity(&self) -> FileIdentity {
        self.segment.identity()
    }

    /// The `Shared` whose mapping holds `address..address + len` in this process, and the
    /// offset of `address` in it. One relaxed load when this process holds none.
    pub fn find(address: usize, len: usize) -> Option<(Arc<Shared>, usize)> {
        if live() == 0 {
            return None;
        }
        let end = address.checked_add(len)?;
        let registry = registry();
        let (&start, entry) = registry.by_address.range(..=address).next_back()?;
        if end > entry.end {
            return None;
        }
        // The guard outlives the upgraded Arc only when it is returned, so a last strong
        // reference is never dropped (running `Drop`, which locks) while it is held.
        let shared = entry.shared.upgrade()?;
        drop(registry);
        Some((shared, address - start))
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Forget this mapping before `segment` unmaps it (after this body), so no lookup
        // can return it once it is going. Only our own entries: a concurrent attach of the
        // same file may have registered its own `Shared` under the same identity.
        let this: *const Shared = self;
        let mut registry = registry();
        let base = self.segment.base() as usize;
        if registry
            .by_address
            .get(&base)
            .is_some_and(|entry| std::ptr::eq(entry.shared.as_ptr(), this))
        {
            registry.by_address.remove(&base);
        }
        let key = identity_key(self.segment.identity());
        if registry
            .by_identity
            .get(&key)
            .is_some_and(|weak| std::ptr::eq(weak.as_ptr(), this))
        {
            registry.by_identity.remove(&key);
        }
        // Relaxed: a count for `find`'s fast path; the registry's lock orders the rest.
        LIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Shared segments this process maps now.
pub fn live() -> usize {
    // Relaxed: a hint for the fast path; a stale value only costs a lock.
    LIVE.load(Ordering::Relaxed)
}

// ---- the registry ----

/// A mapped segment not yet in the registry: [`Unregistered::register`] makes it findable.
pub struct Unregistered(Shared);

impl Unregistered {
    /// Registers the mapping. If this process mapped the same segment meanwhile (two
    /// threads attaching one reference), both mappings stay valid and are freed each on its
    /// own; lookups by identity find the later one.
    pub fn register(self) -> Arc<Shared> {
        register(self.0)
    }
}

struct Entry {
    end: usize,
    shared: Weak<Shared>,
}

struct Registry {
    by_address: BTreeMap<usize, Entry>,
    by_identity: BTreeMap<(u64, u64), Weak<Shared>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    by_address: BTreeMap::new(),
    by_identity: BTreeMap::new(),
});
static LIVE: AtomicUsize = AtomicUsize::new(0);

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn identity_key(identity: FileIdentity) -> (u64, u64) {
    (identity.device, identity.inode)
}

fn register(shared: Shared) -> Arc<Shared> {
    let base = shared.segment.base() as usize;
    // A mapping of `len` bytes at `base` exists, so the sum fits.
    let end = base + shared.segment.len();
    let key = identity_key(shared.segment.identity());
    let shared = Arc::new(shared);
    // Relaxed: see `live`.
    LIVE.fetch_add(1, Ordering::Relaxed);
    let mut registry = registry();
    registry.by_address.insert(
        base,
        Entry {
            end,
            shared: Arc::downgrade(&shared),
        },
    );
    registry.by_identity.insert(key, Arc::downgrade(&shared));
    shared
}

fn find_identity(identity: FileIdentity) -> Option<Arc<Shared>> {
    let registry = registry();
    let shared = registry
        .by_identity
        .get(&identity_key(identity))?
        .upgrade()?;
    drop(registry);
    Some(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_aligns_every_tensor() {
        let (offsets, len) = layout(&[1, 64, 0, 65, 3]).unwrap();
        assert_eq!(offsets, vec![0, 64, 128, 128, 256]);
        assert_eq!(len, 320);
        assert_eq!(layout(&[]).unwrap(), (vec![], 64));
    }

    #[test]
    fn layout_refuses_sizes_that_overflow() {
        let error = layout(&[usize::MAX - 10, 100]).unwrap_err();
        assert!(matches!(error, Error::InvalidArgument(_)), "{error}");
        assert!(layout(&[isize::MAX as usize, 64]).is_err());
        assert!(Shared::create(usize::MAX - 3).is_err());
    }

    #[test]
    fn attach_maps_a_segment_once_and_sees_writes() {
        let shared = Shared::create(100).unwrap();
        assert_eq!(shared.len(), 128);
        // SAFETY: 128 bytes are mapped.
        unsafe { shared.base().add(5).write(7) };
        let again = Shared::attach(&shared.reference()).unwrap();
        assert!(
            Arc::ptr_eq(&shared, &again),
            "mapped the same segment twice"
        );
        let (found, offset) = Shared::find(shared.base() as usize + 5, 10).unwrap();
        assert!(Arc::ptr_eq(&found, &shared));
        assert_eq!(offset, 5);
        assert!(Shared::find(shared.base() as usize + 120, 9).is_none());
    }

    #[test]
    fn dropping_the_last_hold_forgets_the_segment() {
        let shared = Shared::create(64).unwrap();
        let reference = shared.reference();
        let base = shared.base() as usize;
        drop(shared);
        assert!(Shared::find(base, 1).is_none());
        // The descriptor the reference names is closed (or reused by another file).
        let error = Shared::attach(&reference).unwrap_err();
        assert!(matches!(error, Error::PeerGone(_)), "{error}");
        assert!(error.to_string().contains("no process known"), "{error}");
    }
}
