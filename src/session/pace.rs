//! Adaptive lookahead: how far the engine may run ahead of payment, and how many tokens one
//! invoice covers.
//!
//! A prompt payer should never wait: while chunk k's payment travels, generation goes on, so
//! the lookahead must cover the payment's latency at the engine's rate (tokens ≥ rate × recent
//! p95 of invoice → HTLC held). `window_chunks` chunks are the minimum; the operator's cap on
//! unpaid exposure (`payments.max_unpaid_msat`) is the maximum, so at most that many tokens
//! (+ the one in flight) are ever generated beyond what is paid.
//!
//! Where even that cannot keep up (a fast engine on a slow payment path: one stream settles
//! ~16–19 payments/s), one invoice covers more tokens: when the invoices the engine would need
//! per second exceed what this session's payments settle per second, the tokens per invoice
//! double (each invoice still priced exactly for the tokens it covers), up to half the cap.
//!
//! A session's own latencies are few (a 128-token stream makes 8 payments) and its first
//! payment, with none to plan from, is the one most likely to stall a fast engine (the window
//! alone is 0.2 s of llama.cpp output, about one payment's latency). So a session plans with
//! the slower of its own recent p95 and the node's ([`Recent`]: the last payments of every
//! session, LDK's periodic persistence stalls among them). A slow payer elsewhere lengthens
//! the lookahead of the others; the operator's cap still bounds every one, and before a
//! session's own first payment the prior counts for at most [`FIRST_PAYMENT_WINDOWS`] windows
//! (so a slow payer cannot make every newcomer's free lookahead the cap).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Recent payment latencies kept.
const SAMPLES: usize = 32;

/// Before a session's first payment, the node's prior lengthens its lookahead to at most this
/// many windows. The prior is other sessions' latency (one slow payer raises it for everyone),
/// and what a session generates before paying anything is compute given away.
pub const FIRST_PAYMENT_WINDOWS: u32 = 2;

/// The last [`SAMPLES`] payment latencies of every session on this node: a new session's
/// prior. It only lengthens a lookahead the operator's cap still bounds.
#[derive(Debug, Default)]
pub struct Recent(Mutex<VecDeque<Duration>>);

impl Recent {
    /// Adds `latency`; the p95 with it.
    fn record(&self, latency: Duration) -> Option<Duration> {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() == SAMPLES {
            v.pop_front();
        }
        v.push_back(latency);
        p95(&v)
    }

    fn p95(&self) -> Option<Duration> {
        p95(&self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn p95(latencies: &VecDeque<Duration>) -> Option<Duration> {
    if latencies.is_empty() {
        return None;
    }
    let mut v: Vec<_> = latencies.iter().copied().collect();
    v.sort();
    Some(
        v[((v.len() as f64 * 0.95).ceil() as usize)
            .saturating_sub(1)
            .min(v.len() - 1)],
    )
}

#[derive(Debug, Clone)]
pub struct Pace {
    /// Adapt at all (off: the fixed `window_chunks × chunk_tokens` of earlier versions).
    adaptive: bool,
    window_chunks: u32,
    /// Tokens per invoice now (starts at the model's `chunk_tokens`).
    chunk_tokens: u32,
    /// Most tokens generated beyond what is paid.
    cap_tokens: u32,
    latencies: VecDeque<Duration>,
    /// Exponentially weighted seconds per generated token (pauses excluded).
    secs_per_token: Option<f64>,
    last_token: Option<Instant>,
    /// Payments held, with when: their recent rate is what the path settles.
    held_at: VecDeque<Instant>,
    /// The node's recent latencies: this session's payments are added to them.
    recent: Option<Arc<Recent>>,
    /// Their p95 as of this session's start or its last payment (the node's record is
    /// shared: read when it changes hands, not whenever the lookahead is planned).
    node_p95: Option<Duration>,
}

impl Pace {
    /// `cap_tokens`: the operator's cap on unpaid tokens (≥ one chunk).
    pub fn new(adaptive: bool, window_chunks: u32, chunk_tokens: u32, cap_tokens: u32) -> Pace {
        Pace {
            adaptive,
            window_chunks: window_chunks.max(1),
            chunk_tokens,
            cap_tokens: cap_tokens.max(chunk_tokens),
            latencies: VecDeque::new(),
            secs_per_token: None,
            last_token: None,
            held_at: VecDeque::new(),
            recent: None,
            node_p95: None,
        }
    }

    /// Plans with the node's recent payments too, and adds this session's to them.
    pub fn with_node(mut self, recent: Arc<Recent>) -> Pace {
        self.node_p95 = recent.p95();
        self.recent = Some(recent);
        self
    }

    /// Tokens the next invoice covers.
    pub fn chunk_tokens(&self) -> u32 {
        self.chunk_tokens
    }

    /// The most tokens one invoice may ever cover (told to the client).
    pub fn max_chunk_tokens(&self) -> u32 {
        if self.adaptive {
            (self.cap_tokens / 2).max(self.chunk_tokens)
        } else {
            self.chunk_tokens
        }
    }

    /// A token was generated.
    pub fn on_token(&mut self, now: Instant) {
        if let Some(last) = self.last_token {
            let dt = now.duration_since(last).as_secs_f64();
            self.secs_per_token = Some(match self.secs_per_token {
                Some(s) => 0.9 * s + 0.1 * dt,
                None => dt,
            });
        }
        self.last_token = Some(now);
    }

    /// The engine paused (waiting for payment): the next gap is not generation time.
    pub fn on_pause(&mut self) {
        self.last_token = None;
    }

    /// An invoice issued `latency` ago was paid (its HTLC held).
    pub fn on_paid(&mut self, latency: Duration, now: Instant) {
        if self.latencies.len() == SAMPLES {
            self.latencies.pop_front();
        }
        self.latencies.push_back(latency);
        if let Some(recent) = &self.recent {
            self.node_p95 = recent.record(latency);
        }
        if self.held_at.len() == SAMPLES {
            self.held_at.pop_front();
        }
        self.held_at.push_back(now);
        self.grow_chunks();
    }

    fn rate(&self) -> Option<f64> {
        self.secs_per_token.filter(|s| *s > 0.0).map(|s| 1.0 / s)
    }

    /// The latency to plan for: the slower of this session's recent p95 and the node's.
    fn p95(&self) -> Option<Duration> {
        p95(&self.latencies).max(self.node_p95)
    }

    /// Payments this session settled per second lately.
    fn settle_rate(&self) -> Option<f64> {
        let (first, last) = (self.held_at.front()?, self.held_at.back()?);
        let span = last.duration_since(*first).as_secs_f64();
        (self.held_at.len() >= 3 && span > 0.0).then(|| (self.held_at.len() - 1) as f64 / span)
    }

    /// More tokens per invoice when the engine needs more invoices per second than settle:
    /// straight to the size that keeps the needed rate under 70 % of what settles (a power of
    /// two times the model's chunk, at most `max_chunk_tokens`).
    fn grow_chunks(&mut self) {
        if !self.adaptive {
            return;
        }
        let (Some(rate), Some(settled)) = (self.rate(), self.settle_rate()) else {
            return;
        };
        if rate / self.chunk_tokens as f64 <= 0.8 * settled {
            return;
        }
        let want = (rate / (0.7 * settled)).ceil() as u32;
        let mut c = self.chunk_tokens;
        while c < want && c * 2 <= self.max_chunk_tokens() {
            c *= 2;
        }
        if c > self.chunk_tokens {
            self.chunk_tokens = c;
            // A new regime: measure its settle rate afresh.
            self.held_at.clear();
        }
    }

    /// Tokens the engine may run ahead of what is paid.
    pub fn lookahead(&self) -> u32 {
        let window = self.window_chunks * self.chunk_tokens;
        if !self.adaptive {
            return window;
        }
        let needed = match (self.rate(), self.p95()) {
            (Some(r), Some(l)) => (r * l.as_secs_f64()).ceil() as u32 + self.chunk_tokens,
            _ => 0,
        };
        let mut cap = self.cap_tokens.max(self.chunk_tokens);
        if self.latencies.is_empty() {
            cap = cap.min(window * FIRST_PAYMENT_WINDOWS);
        }
        window.max(needed).min(cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_tokens(p: &mut Pace, n: u32, every: Duration, t: &mut Instant) {
        for _ in 0..n {
            *t += every;
            p.on_token(*t);
        }
    }

    #[test]
    fn fixed_window_when_not_adaptive() {
        let p = Pace::new(false, 2, 16, 1024);
        assert_eq!((p.lookahead(), p.max_chunk_tokens()), (32, 16));
    }

    #[test]
    fn lookahead_covers_rate_times_p95_within_the_cap() {
        let mut p = Pace::new(true, 2, 16, 256);
        let mut t = Instant::now();
        // 100 tok/s, payments taking 500 ms: 50 tokens in flight + a chunk.
        feed_tokens(&mut p, 50, Duration::from_millis(10), &mut t);
        for _ in 0..10 {
            t += Duration::from_millis(100);
            p.on_paid(Duration::from_millis(500), t);
        }
        assert_eq!(
            p.chunk_tokens(),
            16,
            "10 payments/s settle what 100 tok/s needs"
        );
        let l = p.lookahead();
        assert!((66..=68).contains(&l), "{l}");
        // Slow payments: the cap bounds the unpaid tokens.
        for _ in 0..40 {
            t += Duration::from_millis(100);
            p.on_paid(Duration::from_secs(10), t);
        }
        assert_eq!(p.lookahead(), 256);
    }

    #[test]
    fn a_session_plans_with_the_slower_of_its_own_and_the_nodes_recent_latency() {
        let recent = Arc::new(Recent::default());
        let mut t = Instant::now();
        // An earlier session on the node: payments took 400 ms.
        let mut earlier = Pace::new(true, 2, 16, 256).with_node(recent.clone());
        for _ in 0..5 {
            t += Duration::from_millis(100);
            earlier.on_paid(Duration::from_millis(400), t);
        }
        // A new one at 100 tok/s, before its first payment: 40 tokens in flight + a chunk,
        // where without the node's record it would have only its 2-chunk window.
        let mut new = Pace::new(true, 2, 16, 256).with_node(recent.clone());
        let mut alone = Pace::new(true, 2, 16, 256);
        feed_tokens(&mut new, 20, Duration::from_millis(10), &mut t);
        feed_tokens(&mut alone, 20, Duration::from_millis(10), &mut t);
        assert_eq!(alone.lookahead(), 32);
        assert!((56..=58).contains(&new.lookahead()), "{}", new.lookahead());
        // One fast payment of its own (100 ms) does not shrink it below what the node's
        // payments take: the next one may be as slow as theirs.
        t += Duration::from_millis(100);
        new.on_paid(Duration::from_millis(100), t);
        assert!((56..=58).contains(&new.lookahead()), "{}", new.lookahead());
        // Its own slower payments (600 ms) count as soon as they come.
        for _ in 0..3 {
            t += Duration::from_millis(100);
            new.on_paid(Duration::from_millis(600), t);
        }
        assert!((76..=78).contains(&new.lookahead()), "{}", new.lookahead());
        // A slow node (one slow payer is enough): before a session's own first payment, the
        // prior lengthens its lookahead to FIRST_PAYMENT_WINDOWS windows, not to the cap.
        for _ in 0..40 {
            recent.record(Duration::from_secs(30));
        }
        let mut slow = Pace::new(true, 2, 16, 256).with_node(recent);
        feed_tokens(&mut slow, 20, Duration::from_millis(10), &mut t);
        assert_eq!(slow.lookahead(), 32 * FIRST_PAYMENT_WINDOWS);
        // Once it pays, its own payments count and the cap bounds it.
        t += Duration::from_millis(100);
        slow.on_paid(Duration::from_millis(100), t);
        assert_eq!(slow.lookahead(), 256);
    }

    #[test]
    fn invoices_grow_when_payments_cannot_keep_up() {
        let mut p = Pace::new(true, 2, 4, 1024);
        let mut t = Instant::now();
        // 3 000 tok/s on a path settling 20 payments/s: 750 invoices/s needed at 4 tokens.
        feed_tokens(&mut p, 100, Duration::from_micros(333), &mut t);
        for _ in 0..40 {
            t += Duration::from_millis(50);
            p.on_paid(Duration::from_millis(100), t);
        }
        assert!(p.chunk_tokens() > 4, "grew to {}", p.chunk_tokens());
        assert!(p.chunk_tokens() <= p.max_chunk_tokens());
        assert_eq!(p.max_chunk_tokens(), 512);
        assert!(p.lookahead() <= 1024);
    }
}
