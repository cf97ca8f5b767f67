//! Paid sessions: one task per Generate stream (the meter) that turns engine tokens into
//! priced chunks, issues their invoices (or draws on a keysend balance), releases each chunk
//! when it is paid, paces the engine by its allowance and halts when payment stops.

pub mod cipher;
mod meter;

pub use meter::{run, Mode, SessionSpec};

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Counts live sessions; a slot is freed when its guard drops (however the session ends).
#[derive(Default)]
pub struct Live {
    n: Arc<AtomicU32>,
}

pub struct LiveGuard {
    n: Arc<AtomicU32>,
}

impl Live {
    /// Takes a slot if fewer than `max` are taken.
    pub fn try_enter(&self, max: u32) -> Option<LiveGuard> {
        self.n
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                (v < max).then_some(v + 1)
            })
            .ok()
            .map(|_| LiveGuard { n: self.n.clone() })
    }

    pub fn count(&self) -> u32 {
        self.n.load(Ordering::SeqCst)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.n.fetch_sub(1, Ordering::SeqCst);
    }
}
