//! Placing payloads in a frame and copying them there: one `memcpy` per contiguous
//! payload, a row-wise gather for strided ones. Runs without the GIL.
//!
//! Placement avoids 4K aliasing: when a copy's destination sits a few dozen bytes past its
//! source modulo 4096, every store looks to the CPU like it may feed the next loads, and
//! the copy runs several times slower (measured here: 512 MiB at 2.0 GiB/s 112 bytes
//! past, 10.2 GiB/s 2 KiB past). So each large payload starts where
//! `(destination - source) mod 4096` is about 2 KiB, which needs the frame's address: the
//! area reserves a page per large payload and the offsets are patched into the stream.
use super::{Encoded, Payload, Source};
use crate::header::{align_payload, PAYLOAD_ALIGN};

/// Payloads at least this large get an aliasing-free placement (smaller ones copy in a
/// few cache lines, where it does not matter).
const ALIAS_MIN: usize = 16 << 10;
const PAGE: usize = 4096;

/// Bytes of payload area to reserve for a payload of `len` bytes: alignment, plus a page
/// of placement slack for large payloads. `None` past `usize`.
pub fn reserve_for(len: usize) -> Option<usize> {
    len.checked_add(PAYLOAD_ALIGN - 1 + if len >= ALIAS_MIN { PAGE } else { 0 })
}

fn source_address(source: &Source) -> usize {
    match source {
        Source::Contiguous { address, .. } | Source::Strided { address, .. } => *address as usize,
    }
}

impl Encoded {
    /// Chooses every payload's offset for a payload area starting at address `area` and
    /// writes the offsets into the value stream. `area == None` (bytes for `dumps`, where
    /// the address does not matter): offsets are packed.
    ///
    /// No sum here can overflow: each payload moves `cursor` by at most its `reserve_for`
    /// (at most 63 bytes of alignment, plus under a page of shift for a large one), and
    /// `push_payload` checked that those reservations add up to `payload_len`, which fits
    /// in the frame, which fits in memory at `area`.
    pub fn place(&mut self, area: Option<usize>) {
        let mut cursor = 0usize;
        for payload in self.payloads.iter_mut() {
            let mut offset = align_payload(cursor).unwrap_or(cursor);
            if let (Some(area), true) = (area, payload.len >= ALIAS_MIN) {
                let destination = area + offset;
                let wanted = source_address(&payload.source).wrapping_add(PAGE / 2) % PAGE;
                let shift = (wanted + PAGE - destination % PAGE) % PAGE;
                offset += shift.next_multiple_of(64);
            }
            payload.offset = offset;
            self.stream
                .patch_uvarint_fixed(payload.offset_at, offset as u64);
            cursor = offset + payload.len;
        }
        debug_assert!(cursor <= self.payload_len);
    }
}

/// Copies every payload into the payload area starting at `area`.
///
/// # Safety
/// `area` must be valid for writes of `encoded.payload_len` bytes, and every payload's
/// source must still be alive (its `keep` held) and not overlap `area`.
pub unsafe fn copy_payloads(payloads: &[Payload], area: *mut u8) {
    for payload in payloads {
        // SAFETY: the caller guarantees the area holds every payload's offset + len.
        let destination = unsafe { area.add(payload.offset) };
        match &payload.source {
            Source::Contiguous { address, len } => {
                // SAFETY: `address..+len` is the live source (kept by `keep`), disjoint
                // from the slab block we write.
                unsafe { std::ptr::copy_nonoverlapping(*address, destination, *len) };
            }
            Source::Strided {
                address,
                itemsize,
                shape,
                strides,
            } => {
                // SAFETY: as above; the strides describe the source array's own layout.
                unsafe { copy_strided(*address, destination, *itemsize, shape, strides) };
            }
        }
    }
}

/// Gathers a strided array into C order at `destination`.
///
/// # Safety
/// `source` with `shape`/`strides` must describe readable memory, `destination` must be
/// writable for `product(shape) * itemsize` bytes.
unsafe fn copy_strided(
    source: *const u8,
    destination: *mut u8,
    itemsize: usize,
    shape: &[usize],
    strides: &[isize],
) {
    if shape.contains(&0) {
        return;
    }
    let ndim = shape.len();
    // Innermost run that is contiguous: copy whole rows when the last axis is dense.
    let row_dense = ndim > 0 && strides[ndim - 1] == itemsize as isize;
    let (outer, row_len) = if row_dense {
        (ndim - 1, shape[ndim - 1] * itemsize)
    } else {
        (ndim, itemsize)
    };
    let mut index = vec![0usize; outer];
    let mut written = 0usize;
    loop {
        // Plain arithmetic: each partial sum is the offset of an element (the one with the
        // remaining indices 0), and `array_body` checked with `strided_span` that every
        // element's offset fits in `isize`; `written` stays below the payload's length.
        let offset: isize = index
            .iter()
            .zip(strides)
            .map(|(i, s)| *i as isize * s)
            .sum();
        // SAFETY: `offset` addresses an element (row) of the source by its own strides;
        // `written` stays below the destination's length.
        unsafe {
            std::ptr::copy_nonoverlapping(source.offset(offset), destination.add(written), row_len)
        };
        written += row_len;
        let mut axis = outer;
        loop {
            if axis == 0 {
                return;
            }
            axis -= 1;
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
}
