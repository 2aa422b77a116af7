//! tensorslab: move tensors and arrays between processes on one machine through
//! shared memory that stays mapped and is recycled.
//!
//! The crate is a Rust core with no Python in it, plus a thin binding behind the
//! `python` feature. Layers point one way:
//!
//! ```text
//! shm (OS segments) -> layout, lock, heap, ring, procs (structures over offsets), shared
//!                   -> header (wire format) -> channel (composes them) -> py (binding)
//! ```
//!
//! Nothing below `channel` knows about Python; `cargo test` exercises it directly.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod error;
#[macro_use]
pub mod failpoint;
pub mod header;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
pub mod channel;
pub mod layout;
pub mod lock;
pub mod procs;
pub mod ring;
pub mod shared;
pub mod shm;
pub mod slab;
pub mod sync;
pub mod wait;
