//! What a channel says about itself: statistics, and the text of `Full` errors (what is
//! full, and who holds the memory).
use super::{Channel, SharedStats};
use crate::error::Error;
use crate::procs::Side;
use crate::shm::format_bytes;
use crate::slab::block::{
    owner_kind, owner_slot, OWNER_ALLOC, OWNER_ORPHAN, OWNER_QUEUED, OWNER_RECEIVER,
};
use crate::sync::Ordering;

impl Channel {
    pub fn shared_stats(&self) -> SharedStats {
        let control = self.control();
        let (mapped_bytes, used_bytes, used_blocks) = self.slab.usage();
        SharedStats {
            mapped_bytes,
            used_bytes,
            used_blocks,
            queued: self.ring().len(),
            capacity: self.ring().capacity(),
            max_slab_bytes: self.slab.max_slab_bytes(),
            segments: control.heap.segment_count.load(Ordering::Relaxed),
            senders: control.open(Side::Sender),
            receivers: control.open(Side::Receiver),
            outstanding: control.processes[usize::from(self.slot())]
                .outstanding
                .load(Ordering::Relaxed),
            processes: control.pids(None),
            liveness_sweeps: control.sweep.count.load(Ordering::Relaxed),
        }
    }

    pub fn queued(&self) -> u64 {
        self.ring().len()
    }

    pub fn capacity(&self) -> u64 {
        self.ring().capacity()
    }

    pub fn has_space(&self, len: usize) -> bool {
        !self.ring().is_full() && self.slab.has_space(len)
    }

    pub(super) fn ring_full_error(&self) -> Error {
        Error::Full(format!(
            "channel full: {} messages queued (capacity {}); receivers are not keeping up",
            self.ring().len(),
            self.ring().capacity()
        ))
    }

    pub(super) fn slab_full_error(&self, len: usize) -> Error {
        let (mapped, used, _) = self.slab.usage();
        let max = self.slab.max_slab_bytes();
        Error::Full(format!(
            "slab exhausted: a message of {} does not fit; {} of {} mapped (max_slab_bytes {}) is held by {}; raise max_slab_bytes, drop received tensors sooner, or drop alloc buffers that will not be sent",
            format_bytes(len as u64),
            format_bytes(used),
            format_bytes(mapped),
            format_bytes(max),
            self.describe_holders(),
        ))
    }

    /// Who holds the slab's memory, for error messages: "3 unreleased messages still queued, 2 messages
    /// held by receivers (pids 41, 42), 5 alloc buffers (pids 40)".
    fn describe_holders(&self) -> String {
        let mut queued = 0;
        let mut kinds: [(usize, Vec<u32>); 3] = Default::default();
        // Not under the heap lock: a failing `put_nowait` in a loop must not stall frees.
        for (_, owner) in self.slab.used_blocks_for_report() {
            let kind = match owner_kind(owner) {
                OWNER_QUEUED => {
                    queued += 1;
                    continue;
                }
                OWNER_RECEIVER => 0,
                OWNER_ALLOC | OWNER_ORPHAN => 1,
                _ => 2,
            };
            kinds[kind].0 += 1;
            if let Some(pid) = self
                .control()
                .processes
                .get(usize::from(owner_slot(owner).index))
                .and_then(|slot| slot.pid())
            {
                if !kinds[kind].1.contains(&pid) {
                    kinds[kind].1.push(pid);
                }
            }
        }
        let mut parts = vec![format!("{queued} unreleased messages still queued")];
        for ((count, pids), what) in kinds.iter().zip([
            "messages held by receivers",
            "alloc buffers",
            "puts in progress",
        ]) {
            if *count > 0 {
                let pids = pids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                parts.push(format!("{count} {what} (pids {pids})"));
            }
        }
        parts.join(", ")
    }
}
