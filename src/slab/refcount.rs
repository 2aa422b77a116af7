//! The transitions of an `alloc` block's `refs` word (see `slab::refs` for the protocol),
//! each a function of the block's header alone so that the loom model below runs the very
//! code the slab runs. Every one is called with the heap lock held: `refs` of an `alloc`
//! block only ever changes under it.
use super::block::{owner_word, BlockHeader, OWNER_ORPHAN};
use super::refs::CREATOR;
use crate::sync::Ordering;

// Relaxed throughout: the heap lock's Acquire/Release orders every access to `refs` and
// `owner` of an `alloc` block.

/// One more complete message references the block (`Slab::commit_message`).
pub(super) fn count_message(header: &BlockHeader) {
    header.refs.fetch_add(1, Ordering::Relaxed);
}

/// The creator's hold is to be dropped: false if its bit was dropped already (there is
/// nothing to do); otherwise records that only messages hold the block now (for reports;
/// the [`CREATOR`] bit is what counts) and the caller drops the bit.
pub(super) fn orphan(header: &BlockHeader) -> bool {
    if header.refs.load(Ordering::Relaxed) & CREATOR == 0 {
        return false;
    }
    header.owner.store(
        owner_word(OWNER_ORPHAN, Default::default()),
        Ordering::Relaxed,
    );
    true
}

/// Subtracts `amount` (a message's entries, or [`CREATOR`]) from `refs`, saturating:
/// recounting repairs what a corrupt count would need. True when nobody holds the block
/// any more, and the caller frees it.
pub(super) fn drop_reference(header: &BlockHeader, amount: u32) -> bool {
    let refs = header.refs.load(Ordering::Relaxed);
    let left = if amount == CREATOR {
        refs & !CREATOR
    } else {
        (refs & !CREATOR).saturating_sub(amount) | (refs & CREATOR)
    };
    header.refs.store(left, Ordering::Relaxed);
    left == 0
}
