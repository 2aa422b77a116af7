//! Named failpoints for crash-consistency tests (the idea of TiKV's fail-rs), compiled in
//! only with the `failpoints` cargo feature: without it [`failpoint!`] expands to nothing.
//!
//! `TENSORSLAB_FAILPOINT=<name>=<action>` (read once per process) arms one point in the
//! process that has it in its environment; actions are `kill` (SIGKILL this process when
//! the point is reached), `kill@N` (on the Nth time it is reached, from 1) and `stall:MS`
//! (sleep MS milliseconds there, every time; the first stall says so on stderr). [`arm`]
//! sets the same at run time, for
//! in-process tests. Each point sits between two steps of a protocol; the matrix test in
//! `tests/failpoints.rs` kills a process at each one and checks the invariants after.

/// Marks a step of a protocol. With the `failpoints` feature, runs the action armed for
/// `$name`; without it, nothing at all.
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoint::hit($name);
    };
}

#[cfg(feature = "failpoints")]
mod armed {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Action {
        Kill { on_hit: u64 },
        Stall(Duration),
    }

    static ARMED: Mutex<Option<Option<(String, Action)>>> = Mutex::new(None);
    static HITS: AtomicU64 = AtomicU64::new(0);

    fn parse(spec: &str) -> Option<(String, Action)> {
        let (name, action) = spec.split_once('=')?;
        let action = if action == "kill" {
            Action::Kill { on_hit: 1 }
        } else if let Some(count) = action.strip_prefix("kill@") {
            Action::Kill {
                on_hit: count.parse().ok()?,
            }
        } else {
            Action::Stall(Duration::from_millis(
                action.strip_prefix("stall:")?.parse().ok()?,
            ))
        };
        Some((name.to_string(), action))
    }

    /// Arms `spec` (`name=action`, as in the environment variable) in this process, or
    /// disarms every point with `None`. Panics on a malformed spec: it is a test's bug.
    pub fn arm(spec: Option<&str>) {
        let parsed =
            spec.map(|spec| parse(spec).unwrap_or_else(|| panic!("bad failpoint {spec:?}")));
        *ARMED.lock().unwrap_or_else(|p| p.into_inner()) = Some(parsed);
        HITS.store(0, Ordering::Relaxed);
    }

    pub fn hit(name: &str) {
        let action = {
            let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
            let armed = armed.get_or_insert_with(|| {
                std::env::var("TENSORSLAB_FAILPOINT")
                    .ok()
                    .and_then(|spec| parse(&spec))
            });
            match armed {
                Some((armed_name, action)) if armed_name == name => action.clone(),
                _ => return,
            }
        };
        match action {
            Action::Kill { on_hit } => {
                if HITS.fetch_add(1, Ordering::Relaxed) + 1 >= on_hit {
                    // SAFETY: raising a signal in this process has no memory-safety effect.
                    unsafe { libc::raise(libc::SIGKILL) };
                }
            }
            Action::Stall(duration) => {
                if HITS.fetch_add(1, Ordering::Relaxed) == 0 {
                    // Tells the matrix the point was reached (a stall leaves no other trace).
                    eprintln!("tensorslab failpoint {name}: stalling {duration:?}");
                }
                std::thread::sleep(duration)
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn specs_parse() {
            assert_eq!(
                parse("a.b=kill"),
                Some(("a.b".into(), Action::Kill { on_hit: 1 }))
            );
            assert_eq!(
                parse("a=kill@3"),
                Some(("a".into(), Action::Kill { on_hit: 3 }))
            );
            assert_eq!(
                parse("a=stall:20"),
                Some(("a".into(), Action::Stall(Duration::from_millis(20))))
            );
            assert_eq!(parse("a=explode"), None);
            assert_eq!(parse("nothing"), None);
        }
    }
}

#[cfg(feature = "failpoints")]
pub use armed::{arm, hit};
