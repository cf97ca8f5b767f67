//! In-process measurements the benchmarks read (and a server could export): how long a
//! paid chunk takes from its payment event to its tokens on the wire, how long engines sit
//! paused waiting for payment, and how precisely a halt stops generation.

use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// PaymentClaimable handled by the event loop → that chunk's Tokens written to the stream.
    pub payment_to_tokens_ms: Vec<f64>,
    /// Its parts: the held notice reaching the session; the claim (LDK's `claim_for_hash`,
    /// which persists a channel-monitor update, plus one ledger commit of the claim and the
    /// delivery); the write to the stream.
    pub notice_ms: Vec<f64>,
    pub claim_ms: Vec<f64>,
    pub deliver_ms: Vec<f64>,
    /// Sum over sessions of the time their engine was paused waiting for payment.
    pub paused_ms: f64,
    /// Sum over sessions of their whole duration.
    pub session_ms: f64,
    /// Per payment-timeout halt: tokens generated beyond those paid for.
    pub halt_overrun_tokens: Vec<u32>,
    /// Per payment-timeout halt: the timeout firing → the engine's slot free.
    pub halt_to_free_ms: Vec<f64>,
}

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Snapshot>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn payment_to_tokens(&self, notice: Duration, claim: Duration, deliver: Duration) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        self.with(|s| {
            s.payment_to_tokens_ms
                .push(ms(notice) + ms(claim) + ms(deliver));
            s.notice_ms.push(ms(notice));
            s.claim_ms.push(ms(claim));
            s.deliver_ms.push(ms(deliver));
        });
    }

    pub fn session(&self, total: Duration, paused: Duration) {
        self.with(|s| {
            s.session_ms += total.as_secs_f64() * 1e3;
            s.paused_ms += paused.as_secs_f64() * 1e3;
        });
    }

    pub fn halt(&self, overrun_tokens: u32, to_free: Duration) {
        self.with(|s| {
            s.halt_overrun_tokens.push(overrun_tokens);
            s.halt_to_free_ms.push(to_free.as_secs_f64() * 1e3);
        });
    }

    /// Returns everything recorded so far and starts afresh.
    pub fn take(&self) -> Snapshot {
        std::mem::take(&mut *self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
