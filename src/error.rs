//! The one error enum of the core. The binding maps each variant to one Python
//! exception class in `py::exceptions`; nothing here knows about Python.
use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The channel has no room (ring full or slab exhausted) within the timeout.
    #[error("{0}")]
    Full(String),
    /// Nothing to receive within the timeout.
    #[error("{0}")]
    Empty(String),
    /// Every peer on the other side has closed or exited.
    #[error("{0}")]
    Closed(String),
    /// Every peer on the other side is gone, and the last of them died without closing.
    #[error("{0}")]
    PeerGone(String),
    /// A limit of the channel's layout was reached (processes attached at once).
    #[error("{0}")]
    Limit(String),
    /// This handle was closed by its owner.
    #[error("{0}")]
    HandleClosed(String),
    /// A blocking wait was interrupted by a signal handler that raised.
    #[error("interrupted")]
    Interrupted,
    /// A call made in a quick scope (see `wait::quick_scope`) would have had to wait, grow
    /// the slab or map a segment; nothing it did stays done (a block it allocated is freed,
    /// or its free deferred), and the caller retries it normally.
    /// Never reaches Python.
    #[error("the call would have to wait")]
    WouldBlock,
    /// Bytes that do not follow the wire format.
    #[error("{0}")]
    Decode(String),
    /// A value that cannot be encoded.
    #[error("{0}")]
    Encode(String),
    /// A caller-supplied argument is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// Shared memory from another build of tensorslab, or corrupt.
    #[error("{0}")]
    Incompatible(String),
    /// The operating system refused (mapping, reserving, opening a segment).
    #[error("{context}: {source}")]
    Os {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub fn os(context: impl Into<String>, source: io::Error) -> Self {
        Error::Os {
            context: context.into(),
            source,
        }
    }

    /// The OS error of the last failed libc call, with what was being done.
    pub fn last_os(context: impl Into<String>) -> Self {
        Error::os(context, io::Error::last_os_error())
    }
}
