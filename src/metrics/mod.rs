//! Measurements: every recording goes to Prometheus ([`prometheus`], when the server exports
//! metrics) and, for the benchmarks, to bounded in-process samples ([`Metrics::take`]): how
//! long a paid chunk takes from its payment event to its tokens on the wire, how long engines
//! sit paused waiting for payment, how precisely a halt stops generation, and the money.

pub mod prometheus;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

use std::sync::Mutex;
use std::time::Duration;

/// Samples kept per series: the newest ones. A long-running server records forever; memory
/// must not grow with it.
pub const MAX_SAMPLES: usize = 4096;

fn push<T>(v: &mut Vec<T>, x: T) {
    if v.len() >= MAX_SAMPLES {
        // Drop the older half at once: amortised O(1), bounded at MAX_SAMPLES.
        v.drain(..MAX_SAMPLES / 2);
    }
    v.push(x);
}

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
    /// Of `paused_ms`, the pauses that began before the session's first paid chunk.
    pub paused_first_ms: f64,
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
        histogram!("satstream_payment_to_tokens_seconds")
            .record((notice + claim + deliver).as_secs_f64());
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        self.with(|s| {
            push(
                &mut s.payment_to_tokens_ms,
                ms(notice) + ms(claim) + ms(deliver),
            );
            push(&mut s.notice_ms, ms(notice));
            push(&mut s.claim_ms, ms(claim));
            push(&mut s.deliver_ms, ms(deliver));
        });
    }

    /// A session ended after `total`, its engine paused for payment `paused` of it (`first`
    /// of that before its first paid chunk).
    pub fn session(&self, total: Duration, paused: Duration, first: Duration) {
        histogram!("satstream_engine_pause_seconds").record(paused.as_secs_f64());
        self.with(|s| {
            s.session_ms += total.as_secs_f64() * 1e3;
            s.paused_ms += paused.as_secs_f64() * 1e3;
            s.paused_first_ms += first.as_secs_f64() * 1e3;
        });
    }

    pub fn halt(&self, overrun_tokens: u32, to_free: Duration) {
        counter!("satstream_halt_overrun_tokens_total").increment(overrun_tokens as u64);
        self.with(|s| {
            push(&mut s.halt_overrun_tokens, overrun_tokens);
            push(&mut s.halt_to_free_ms, to_free.as_secs_f64() * 1e3);
        });
    }

    /// Returns everything recorded so far (the newest [`MAX_SAMPLES`] per series) and starts
    /// afresh.
    pub fn take(&self) -> Snapshot {
        std::mem::take(&mut *self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A session ended (`end`: stop, length, payment_timeout, client_gone, ...).
pub fn session_ended(mode: &'static str, end: &str, generated: u32, delivered: u32, secs: f64) {
    counter!("satstream_sessions_total", "mode" => mode, "end" => end.to_string()).increment(1);
    counter!("satstream_tokens_generated_total").increment(generated as u64);
    counter!("satstream_tokens_delivered_total").increment(delivered as u64);
    counter!("satstream_tokens_beyond_paid_total")
        .increment(generated.saturating_sub(delivered) as u64);
    if secs > 0.0 && generated > 0 {
        gauge!("satstream_engine_tokens_per_second").set(generated as f64 / secs);
    }
    if end.starts_with("payment") || end == "balance_exhausted" || end.starts_with("client") {
        counter!("satstream_halts_total", "reason" => end.to_string()).increment(1);
    }
}

/// Money the ledger booked: `kind` is claimed, credited (keysend), topup, refunded, lost.
/// A connection closed at the front door: over a cap, or no handshake in time.
pub fn connection_refused(why: &'static str) {
    counter!("satstream_connections_refused_total", "why" => why).increment(1);
}

/// The largest channel monitor as ldk-node last stored it.
pub fn channel_monitor_bytes(bytes: u64) {
    gauge!("satstream_channel_monitor_bytes").set(bytes as f64);
}

/// A splice started to compact a channel's monitor (`direction`: in, out).
pub fn monitor_compaction(direction: &'static str) {
    counter!("satstream_monitor_compactions_total", "direction" => direction).increment(1);
}

pub fn money(kind: &'static str, msat: u64) {
    counter!("satstream_msat_total", "kind" => kind).increment(msat);
}

/// Gauges refreshed from the store and the node (the watchdog, every few seconds).
pub struct Gauges {
    pub invoices_by_state: Vec<(&'static str, u64)>,
    pub inbound_liquidity_msat: u64,
    pub refundable_msat: u64,
    pub live_sessions: u32,
    pub engine_queue_depth: u32,
    pub engine_running: u32,
}

pub fn set_gauges(g: &Gauges) {
    for (state, n) in &g.invoices_by_state {
        gauge!("satstream_invoices", "state" => *state).set(*n as f64);
    }
    let held = g
        .invoices_by_state
        .iter()
        .find(|(s, _)| *s == "held")
        .map_or(0, |(_, n)| *n);
    gauge!("satstream_htlcs_held").set(held as f64);
    gauge!("satstream_inbound_liquidity_msat").set(g.inbound_liquidity_msat as f64);
    gauge!("satstream_refundable_msat").set(g.refundable_msat as f64);
    gauge!("satstream_live_sessions").set(g.live_sessions as f64);
    gauge!("satstream_engine_queue_depth").set(g.engine_queue_depth as f64);
    gauge!("satstream_engine_running").set(g.engine_running as f64);
}

/// A remote engine replica's health as last checked (1 healthy, 0 not).
pub fn upstream_health(model: &str, url: &str, healthy: bool) {
    gauge!("satstream_upstream_healthy", "model" => model.to_string(), "url" => url.to_string())
        .set(if healthy { 1.0 } else { 0.0 });
}

/// A request to a remote engine ended: `outcome` is ok, cancelled (the gateway stopped reading:
/// a pause or a halt), failed (mid-stream) or unreachable.
pub fn upstream_request(model: &str, url: &str, outcome: &'static str) {
    counter!("satstream_upstream_requests_total", "model" => model.to_string(),
        "url" => url.to_string(), "outcome" => outcome)
    .increment(1);
}

/// The upstream's own `usage.completion_tokens` disagreed with the tokens the gateway counted.
pub fn upstream_count_mismatch(model: &str) {
    counter!("satstream_upstream_token_count_mismatch_total", "model" => model.to_string())
        .increment(1);
}

/// Help texts, once at install.
fn describe() {
    describe_gauge!(
        "satstream_upstream_healthy",
        "Remote engine replica health (1 = its last check passed)"
    );
    describe_counter!(
        "satstream_upstream_requests_total",
        "Requests to remote engine replicas by outcome"
    );
    describe_counter!(
        "satstream_upstream_token_count_mismatch_total",
        "Streams whose upstream usage count disagreed with the gateway's token count"
    );
    describe_counter!(
        "satstream_connections_refused_total",
        "Connections closed at the front door, by why: total, per_client (over a cap), handshake_timeout"
    );
    describe_counter!(
        "satstream_sessions_total",
        "Sessions ended, by payment mode and end reason"
    );
    describe_counter!(
        "satstream_tokens_generated_total",
        "Tokens the engine generated"
    );
    describe_counter!(
        "satstream_tokens_delivered_total",
        "Tokens delivered to paying clients"
    );
    describe_counter!(
        "satstream_tokens_beyond_paid_total",
        "Tokens generated and never delivered (lookahead cut off by a halt or an end)"
    );
    describe_counter!(
        "satstream_halt_overrun_tokens_total",
        "Tokens generated beyond those paid when a payment timeout halted a session"
    );
    describe_counter!(
        "satstream_halts_total",
        "Sessions halted before their end, by reason"
    );
    describe_counter!(
        "satstream_msat_total",
        "Money booked, msat, by kind: claimed (invoices), credited (keysend), topup, refunded, lost"
    );
    describe_histogram!(
        "satstream_payment_to_tokens_seconds",
        "Payment event handled -> the chunk's tokens written to the stream"
    );
    describe_histogram!(
        "satstream_engine_pause_seconds",
        "Per session: time the engine sat paused waiting for payment (its _sum is the total)"
    );
    describe_gauge!(
        "satstream_engine_tokens_per_second",
        "Tokens per second of the last session to end"
    );
    describe_gauge!("satstream_invoices", "Invoices by state");
    describe_gauge!(
        "satstream_htlcs_held",
        "HTLCs held, waiting for a claim or a fail"
    );
    describe_gauge!(
        "satstream_inbound_liquidity_msat",
        "What the node can receive over usable channels"
    );
    describe_gauge!(
        "satstream_refundable_msat",
        "Owed to customers: refundable session and account balances"
    );
    describe_gauge!(
        "satstream_channel_monitor_bytes",
        "The largest channel monitor as ldk-node last stored it (compacted by a splice past lightning.compact_monitor_bytes)"
    );
    describe_counter!(
        "satstream_monitor_compactions_total",
        "Splices started to drop a channel monitor's history"
    );
    describe_gauge!("satstream_live_sessions", "Live Generate sessions");
    describe_gauge!(
        "satstream_engine_queue_depth",
        "Generations waiting for an engine slot"
    );
    describe_gauge!(
        "satstream_engine_running",
        "Generations holding an engine slot"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_stay_bounded() {
        let m = Metrics::default();
        for i in 0..(3 * MAX_SAMPLES as u32) {
            m.halt(i, Duration::from_millis(1));
        }
        let s = m.take();
        assert!(s.halt_overrun_tokens.len() <= MAX_SAMPLES);
        assert_eq!(
            *s.halt_overrun_tokens.last().unwrap(),
            3 * MAX_SAMPLES as u32 - 1,
            "the newest are kept"
        );
    }
}
