//! Paid sessions: one task per Generate stream (the meter) that turns engine tokens into
//! priced chunks, issues their invoices (or draws on a keysend balance), releases each chunk
//! when it is paid, paces the engine by its allowance and halts when payment stops.
//!
//! [`open`] is the one way in (every front door calls it with a validated request); [`Live`]
//! admits sessions under the caps; [`Resumable`] holds the mailboxes `Resume` attaches
//! through; [`replay`] serves an ended session's delivered chunks again.

pub mod ending;
mod meter;
pub mod open;
pub mod pace;
pub mod receipt;
pub mod replay;
pub mod secret;

pub use meter::{run, Mode, SessionSpec};
pub use open::{open, OpenError, Opened, Opening};
pub use pace::Pace;

/// A request to attach a new client stream to a running session (`Resume`).
pub struct Attach {
    pub out: tokio::sync::mpsc::Sender<Result<crate::wire::proto::GenerateEvent, tonic::Status>>,
    pub from_chunk: u32,
    /// The meter's answer: attached, or why not (FailedPrecondition).
    pub reply: tokio::sync::oneshot::Sender<Result<(), tonic::Status>>,
}

/// Running sessions that a client may reattach to: one mailbox per session, for its meter's
/// lifetime.
#[derive(Default)]
pub struct Resumable {
    mailboxes: Mutex<HashMap<[u8; 16], Mailbox>>,
}

#[derive(Clone)]
struct Mailbox {
    attach: tokio::sync::mpsc::Sender<Attach>,
    /// The owner ended the session (`EndSession`).
    end: tokio_util::sync::CancellationToken,
    /// The meter committed the session's end (its mailbox is gone).
    closed: tokio_util::sync::CancellationToken,
}

impl Resumable {
    pub(crate) fn open(
        &self,
        sid: [u8; 16],
    ) -> (
        tokio::sync::mpsc::Receiver<Attach>,
        tokio_util::sync::CancellationToken,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let end = tokio_util::sync::CancellationToken::new();
        self.lock().insert(
            sid,
            Mailbox {
                attach: tx,
                end: end.clone(),
                closed: tokio_util::sync::CancellationToken::new(),
            },
        );
        (rx, end)
    }

    /// Tells a running session its owner ended it; false when it is not running.
    pub fn end(&self, sid: &[u8; 16]) -> bool {
        match self.lock().get(sid) {
            Some(m) => {
                m.end.cancel();
                true
            }
            None => false,
        }
    }

    /// The meter's end is committed: anyone waiting in [`Resumable::closed`] goes on.
    pub(crate) fn close(&self, sid: &[u8; 16]) {
        if let Some(m) = self.lock().remove(sid) {
            m.closed.cancel();
        }
    }

    /// Resolves once the session's meter has committed its end (at once if it is not running).
    pub fn closed(&self, sid: &[u8; 16]) -> impl std::future::Future<Output = ()> + 'static {
        let token = self.lock().get(sid).map(|m| m.closed.clone());
        async move {
            if let Some(t) = token {
                t.cancelled().await
            }
        }
    }

    /// Hands `a` to the session's meter; Err(a) when the session is not running.
    pub fn attach(&self, sid: &[u8; 16], a: Attach) -> Result<(), Attach> {
        let tx = self.lock().get(sid).map(|m| m.attach.clone());
        match tx {
            Some(tx) => tx.try_send(a).map_err(|e| e.into_inner()),
            None => Err(a),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 16], Mailbox>> {
        self.mailboxes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Counts live sessions, and those not paid yet (in all, and per client key: an address
/// prefix, see [`crate::net::ClientKeys`]); a slot is freed when its guard drops (however the
/// session ends).
#[derive(Default)]
pub struct Live {
    n: Arc<AtomicU32>,
    emptied: Arc<Notify>,
    unpaid: Arc<Mutex<Unpaid>>,
}

#[derive(Default)]
struct Unpaid {
    total: u32,
    per_client: HashMap<IpAddr, u32>,
}

pub struct LiveGuard {
    n: Arc<AtomicU32>,
    emptied: Arc<Notify>,
    unpaid: Arc<Mutex<Unpaid>>,
    /// While this session has not paid anything: counted as unpaid (under this client, if
    /// known).
    unpaid_as: Option<Option<IpAddr>>,
}

/// Why a session could not be admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// All `limits.max_sessions` slots are taken.
    Full(u32),
    /// The slots sessions that have not paid may hold are taken (the rest are kept for
    /// sessions that have paid).
    UnpaidFull(u32),
    /// This client already holds `limits.max_unpaid_sessions_per_client` unpaid sessions.
    UnpaidPerClient(u32),
}

/// What a new session may take.
#[derive(Debug, Clone, Copy)]
pub struct SessionCaps {
    /// Live sessions in all.
    pub max: u32,
    /// Of them, slots kept for sessions that have paid.
    pub reserved_paid: u32,
    /// Unpaid sessions one client may hold.
    pub max_unpaid_per_client: u32,
}

impl SessionCaps {
    pub fn from_config(l: &crate::config::LimitsConfig) -> SessionCaps {
        SessionCaps {
            max: l.max_sessions,
            reserved_paid: l.reserved_paid_sessions,
            max_unpaid_per_client: l.max_unpaid_sessions_per_client,
        }
    }
}

impl Live {
    /// Takes a slot if fewer than `max` are taken (paid, no client: no other cap).
    pub fn try_enter(&self, max: u32) -> Option<LiveGuard> {
        let a = SessionCaps {
            max,
            reserved_paid: 0,
            max_unpaid_per_client: u32::MAX,
        };
        self.enter(&a, None, true).ok()
    }

    /// Takes a slot for `client` if fewer than `a.max` are taken and, for a session that has
    /// not paid (`paid`: it brings money already, a funded PREPAID account), fewer than
    /// `a.max - a.reserved_paid` unpaid ones are live and the client holds fewer than
    /// `a.max_unpaid_per_client`.
    pub fn enter(
        &self,
        a: &SessionCaps,
        client: Option<IpAddr>,
        paid: bool,
    ) -> Result<LiveGuard, Refused> {
        let mut unpaid = self.unpaid.lock().unwrap_or_else(|p| p.into_inner());
        if !paid {
            if let Some(ip) = client {
                if unpaid.per_client.get(&ip).copied().unwrap_or(0) >= a.max_unpaid_per_client {
                    return Err(Refused::UnpaidPerClient(a.max_unpaid_per_client));
                }
            }
            let unpaid_max = a.max.saturating_sub(a.reserved_paid).max(1);
            if unpaid.total >= unpaid_max {
                return Err(Refused::UnpaidFull(unpaid_max));
            }
        }
        self.n
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                (v < a.max).then_some(v + 1)
            })
            .map_err(|_| Refused::Full(a.max))?;
        if !paid {
            unpaid.total += 1;
            if let Some(ip) = client {
                *unpaid.per_client.entry(ip).or_default() += 1;
            }
        }
        Ok(LiveGuard {
            n: self.n.clone(),
            emptied: self.emptied.clone(),
            unpaid: self.unpaid.clone(),
            unpaid_as: (!paid).then_some(client),
        })
    }

    /// Unpaid live sessions of `client`.
    pub fn unpaid_of(&self, client: IpAddr) -> u32 {
        let m = self.unpaid.lock().unwrap_or_else(|p| p.into_inner());
        m.per_client.get(&client).copied().unwrap_or(0)
    }

    pub fn count(&self) -> u32 {
        self.n.load(Ordering::SeqCst)
    }

    /// Resolves once no session is live.
    pub async fn wait_empty(&self) {
        loop {
            let notified = self.emptied.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl LiveGuard {
    /// The session paid something: it no longer counts against its client's unpaid cap.
    pub fn paid(&mut self) {
        if let Some(client) = self.unpaid_as.take() {
            let mut m = self.unpaid.lock().unwrap_or_else(|p| p.into_inner());
            m.total -= 1;
            if let Some(ip) = client {
                if let Some(n) = m.per_client.get_mut(&ip) {
                    *n -= 1;
                    if *n == 0 {
                        m.per_client.remove(&ip);
                    }
                }
            }
        }
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.paid();
        if self.n.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.emptied.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpaid_sessions_never_take_the_slots_kept_for_paid_ones() {
        let live = Live::default();
        let caps = SessionCaps {
            max: 4,
            reserved_paid: 1,
            max_unpaid_per_client: 2,
        };
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = live.enter(&caps, Some(a), false).unwrap();
        let _a2 = live.enter(&caps, Some(a), false).unwrap();
        assert_eq!(
            live.enter(&caps, Some(a), false).err(),
            Some(Refused::UnpaidPerClient(2))
        );
        let _b1 = live.enter(&caps, Some(b), false).unwrap();
        // 3 unpaid: the 4th slot is kept for a session that has paid.
        assert_eq!(
            live.enter(&caps, Some(b), false).err(),
            Some(Refused::UnpaidFull(3))
        );
        let paid = live.enter(&caps, Some(b), true).unwrap();
        assert_eq!(live.enter(&caps, None, true).err(), Some(Refused::Full(4)));
        // A session that pays leaves the unpaid pool: a new unpaid one fits again.
        let mut a1 = a1;
        a1.paid();
        assert_eq!(live.unpaid_of(a), 1);
        drop(paid);
        let _b2 = live.enter(&caps, Some(b), false).unwrap();
        assert_eq!(live.count(), 4);
    }
}
