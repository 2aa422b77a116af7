//! Process identity: a pid plus its start time, so a pid reused by the kernel is never
//! mistaken for a live peer.

/// A process as recorded in shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
    pub start_time: u64,
}

impl ProcessId {
    pub fn current() -> ProcessId {
        let pid = current_pid();
        ProcessId {
            pid,
            start_time: process_start_time(pid).unwrap_or(0),
        }
    }

    /// True while the process exists and is the same process (not a reused pid).
    /// Zombies count as dead: they hold no memory any more.
    pub fn is_alive(&self) -> bool {
        match read_stat(self.pid) {
            Some((state, start_time)) => {
                state != 'Z' && state != 'X' && start_time == self.start_time
            }
            None => false,
        }
    }
}

pub fn current_pid() -> u32 {
    std::process::id()
}

pub fn process_start_time(pid: u32) -> Option<u64> {
    read_stat(pid).map(|(_, start)| start)
}

/// (state, start time) from `/proc/<pid>/stat`. The command name may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn read_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state come fields 4..; the start time is field 22, i.e. 19 further on.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_alive_and_a_stale_start_time_is_not() {
        let me = ProcessId::current();
        assert!(me.start_time > 0);
        assert!(me.is_alive());
        assert!(!ProcessId {
            start_time: me.start_time + 1,
            ..me
        }
        .is_alive());
    }

    #[test]
    fn exited_child_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessId {
            pid: child.id(),
            start_time: process_start_time(child.id()).unwrap_or(0),
        };
        child.wait().unwrap();
        assert!(!id.is_alive());
    }
}
