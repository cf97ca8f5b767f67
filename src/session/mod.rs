//! Paid sessions: one task per Generate stream (the meter) that turns engine tokens into
//! priced chunks, issues their invoices (or draws on a keysend balance), releases each chunk
//! when it is paid, paces the engine by its allowance and halts when payment stops.

mod meter;
pub mod pace;
pub mod receipt;
pub mod replay;

pub use meter::{run, Mode, SessionSpec};
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

/// Counts live sessions, and per client address those not paid yet; a slot is freed when its
/// guard drops (however the session ends).
#[derive(Default)]
pub struct Live {
    n: Arc<AtomicU32>,
    emptied: Arc<Notify>,
    unpaid: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

pub struct LiveGuard {
    n: Arc<AtomicU32>,
    emptied: Arc<Notify>,
    unpaid: Arc<Mutex<HashMap<IpAddr, u32>>>,
    /// The client, while this session has not paid anything.
    unpaid_client: Option<IpAddr>,
}

/// Why a session could not be admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// All `limits.max_sessions` slots are taken.
    Full(u32),
    /// This client already holds `limits.max_unpaid_sessions_per_client` unpaid sessions.
    UnpaidPerClient(u32),
}

impl Live {
    /// Takes a slot if fewer than `max` are taken (without a client address: no per-client
    /// cap).
    pub fn try_enter(&self, max: u32) -> Option<LiveGuard> {
        self.enter(max, None, u32::MAX).ok()
    }

    /// Takes a slot for `client` if fewer than `max` are taken and the client holds fewer
    /// than `max_unpaid` sessions that have not paid yet.
    pub fn enter(
        &self,
        max: u32,
        client: Option<IpAddr>,
        max_unpaid: u32,
    ) -> Result<LiveGuard, Refused> {
        let mut unpaid = self.unpaid.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ip) = client {
            if unpaid.get(&ip).copied().unwrap_or(0) >= max_unpaid {
                return Err(Refused::UnpaidPerClient(max_unpaid));
            }
        }
        self.n
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                (v < max).then_some(v + 1)
            })
            .map_err(|_| Refused::Full(max))?;
        if let Some(ip) = client {
            *unpaid.entry(ip).or_default() += 1;
        }
        Ok(LiveGuard {
            n: self.n.clone(),
            emptied: self.emptied.clone(),
            unpaid: self.unpaid.clone(),
            unpaid_client: client,
        })
    }

    /// Unpaid live sessions of `client`.
    pub fn unpaid_of(&self, client: IpAddr) -> u32 {
        let m = self.unpaid.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&client).copied().unwrap_or(0)
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
        if let Some(ip) = self.unpaid_client.take() {
            let mut m = self.unpaid.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
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
