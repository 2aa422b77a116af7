//! What travels in a pickled handle: enough for another process to find and attach the
//! channel's control segment, and the pending entry that keeps the channel open until it
//! does.
use crate::error::{Error, Result};
use crate::procs::Side;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub channel_id: u64,
    pub control_len: u64,
    pub device: u64,
    pub inode: u64,
    pub side: Side,
    /// Pending entry in the control block, redeemed once on attach.
    pub pending: u64,
    /// (pid, descriptor) of processes holding the control segment, best first.
    pub candidates: Vec<(u32, i32)>,
}

const TICKET_MAGIC: u32 = u32::from_le_bytes(*b"TSTK");

impl Ticket {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.candidates.len() * 8);
        out.extend_from_slice(&TICKET_MAGIC.to_le_bytes());
        out.push(match self.side {
            Side::Sender => 0,
            Side::Receiver => 1,
        });
        for value in [
            self.channel_id,
            self.control_len,
            self.device,
            self.inode,
            self.pending,
        ] {
            out.extend_from_slice(&value.to_le_bytes());
        }
        out.extend_from_slice(&(self.candidates.len() as u32).to_le_bytes());
        for (pid, fd) in &self.candidates {
            out.extend_from_slice(&pid.to_le_bytes());
            out.extend_from_slice(&fd.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Ticket> {
        let bad = || Error::Decode("not a tensorslab handle (corrupt pickle state)".into());
        let mut reader = bytes;
        let mut take = |n: usize| -> Result<&[u8]> {
            if reader.len() < n {
                return Err(bad());
            }
            let (head, rest) = reader.split_at(n);
            reader = rest;
            Ok(head)
        };
        let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
        if u32_at(take(4)?) != TICKET_MAGIC {
            return Err(bad());
        }
        let side = match take(1)?[0] {
            0 => Side::Sender,
            1 => Side::Receiver,
            _ => return Err(bad()),
        };
        let mut words = [0u64; 5];
        for word in words.iter_mut() {
            *word = u64_at(take(8)?);
        }
        let count = u32_at(take(4)?) as usize;
        if count > 4096 {
            return Err(bad());
        }
        let mut candidates = Vec::with_capacity(count);
        for _ in 0..count {
            let pid = u32_at(take(4)?);
            let fd = u32_at(take(4)?) as i32;
            candidates.push((pid, fd));
        }
        Ok(Ticket {
            channel_id: words[0],
            control_len: words[1],
            device: words[2],
            inode: words[3],
            side,
            pending: words[4],
            candidates,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let ticket = Ticket {
            channel_id: 7,
            control_len: 8192,
            device: 1,
            inode: 2,
            side: Side::Receiver,
            pending: 99,
            candidates: vec![(10, 3), (11, 4)],
        };
        assert_eq!(Ticket::from_bytes(&ticket.to_bytes()).unwrap(), ticket);
        let bytes = ticket.to_bytes();
        for cut in 0..bytes.len() {
            assert!(Ticket::from_bytes(&bytes[..cut]).is_err());
        }
    }
}
