//! Fault injection for the crash tests. TEST-ONLY: never set `SATSTREAM_FAULT` in production.
//!
//! The money paths call [`Faults::point`] at the places a crash would hurt most (between LDK's claim
//! and our commit, while an HTLC is held, while a keysend credit is booked, ...). With
//! `SATSTREAM_FAULT=<name>:<n>` in the environment at start, the process kills itself with
//! SIGKILL the n-th time it passes point `<name>` (n defaults to 1): exactly what `kill -9` or
//! the OOM killer does, with no destructor, no flush, no graceful anything. Several points can
//! be armed at once, separated by commas.
//!
//! In-process tests can instead arm a point to return an error ([`Faults::arm_error`]), to exercise
//! the handling of a failing claim, commit or send without killing the test process.
//!
//! Points: `invoice_in_ldk` (LDK issued a chunk invoice, not yet in SQLite), `held` (an HTLC
//! is held and committed, the session not yet told), `after_claim` (LDK claimed, the
//! delivery not yet committed), `after_commit` (delivery committed, the tokens not yet
//! written to the client), `keysend_credit` (a keysend payment arrived, its credit not yet
//! committed), `refund_reserved` (a refund's amount is reserved in SQLite, its payment not yet
//! handed to LDK), `refund_sent` (LDK took the refund's payment, the caller not yet told),
//! `claim` (error only: LDK refuses the claim), `send_invoice` (error only: the
//! client is gone as its invoice is sent), `event` (error only: an event handler fails).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Kill,
    Error,
}

struct Armed {
    action: Action,
    /// Fires when the counter reaches this; errors keep firing for `repeat` passes.
    at: u32,
    repeat: u32,
    passes: AtomicU32,
}

/// The armed fault points of one server. Kill points come from `SATSTREAM_FAULT` (read by
/// [`Faults::from_env`]); error points are armed by in-process tests on their own server only.
#[derive(Default)]
pub struct Faults {
    armed: Mutex<HashMap<String, Armed>>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults").finish_non_exhaustive()
    }
}

impl Faults {
    /// Reads `SATSTREAM_FAULT` (`name[:n],...`).
    pub fn from_env() -> Faults {
        let mut m = HashMap::new();
        if let Ok(spec) = std::env::var("SATSTREAM_FAULT") {
            for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (name, n) = match part.split_once(':') {
                    Some((name, n)) => (name, n.parse().unwrap_or(1)),
                    None => (part, 1),
                };
                tracing::warn!(point = name, at = n, "fault injection armed (test-only)");
                m.insert(
                    name.to_string(),
                    Armed {
                        action: Action::Kill,
                        at: n.max(1),
                        repeat: 1,
                        passes: AtomicU32::new(0),
                    },
                );
            }
        }
        Faults {
            armed: Mutex::new(m),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Armed>> {
        self.armed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Passes fault point `name`: kills the process or returns an injected error when armed.
    pub fn point(&self, name: &str) -> Result<(), Injected> {
        let m = self.lock();
        let Some(a) = m.get(name) else {
            return Ok(());
        };
        let n = a.passes.fetch_add(1, Ordering::SeqCst) + 1;
        if n < a.at || n >= a.at + a.repeat {
            return Ok(());
        }
        match a.action {
            Action::Kill => {
                tracing::warn!(point = name, "fault injection: SIGKILL");
                // SIGKILL: no unwinding, no buffered writes, exactly a hard kill.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
                unreachable!("SIGKILL returned")
            }
            Action::Error => Err(Injected(name.to_string())),
        }
    }

    /// Makes point `name` return an error on its next `times` passes.
    pub fn arm_error(&self, name: &str, times: u32) {
        self.lock().insert(
            name.to_string(),
            Armed {
                action: Action::Error,
                at: 1,
                repeat: times,
                passes: AtomicU32::new(0),
            },
        );
    }

    pub fn disarm(&self, name: &str) {
        self.lock().remove(name);
    }
}

/// An error a fault point injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("injected fault at {0}")]
pub struct Injected(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn armed_errors_fire_exactly_the_given_number_of_times() {
        let f = Faults::default();
        f.arm_error("p", 2);
        assert!(f.point("p").is_err());
        assert!(f.point("p").is_err());
        assert!(f.point("p").is_ok());
        assert!(f.point("other").is_ok());
        f.arm_error("p", 1);
        f.disarm("p");
        assert!(f.point("p").is_ok());
    }
}
